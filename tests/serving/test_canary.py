"""Adapter versions and canary rollout (finetune/rollout.py): the split through the gateway, rollback and promotion,
the ledger's record of the version served, the comparison, audit, the API and console, and tenant isolation."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from rest_framework.test import APIClient

from finetune import rollout as ro
from serving.gateway.plan import pick_version
from serving.models import AdapterRollout, UsageRecord
from serving.routing import tenant_routes
from tenants.models import AuditEvent
from tenants.services import SYSTEM, Actor
from tests.support.finetune import signed_in
from tests.support.gateway import deploy_adapter, make_base_model, make_key, make_pool, post, usage_records, wait_for

V1 = "ft:tiny-chat:acme:support:1"
V2 = "ft:tiny-chat:acme:support:2"
V3 = "ft:other-chat:acme:support:3"
OTHERS = "ft:tiny-chat:globex:theirs:4"


@pytest.fixture
def versions(world, sim_url):
    """acme's two versions of one adapter (deployed and loaded on a simulated dev backend) and globex's adapter."""
    base = make_base_model()
    pool = make_pool("shared-tiny", base, [sim_url], adapters=[V1, V2, OTHERS])
    v1 = deploy_adapter(world.tenant, V1, base, pool)
    v2 = deploy_adapter(world.tenant, V2, base, pool)
    theirs = deploy_adapter(world.other_tenant, OTHERS, base, pool)
    for name in (V1, V2, OTHERS):  # loaded before the gateway starts: its first health round has nothing to reload
        loaded = post(sim_url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "/unused"})
        assert loaded.status_code == 200, loaded.text
    return {"base": base, "pool": pool, "v1": v1, "v2": v2, "theirs": theirs}


def _served(tenant) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in usage_records(tenant):
        counts[row.adapter] = counts.get(row.adapter, 0) + 1
    return counts


def _call(gw_url: str, key: str, n: int) -> list[int]:
    body = {"model": V1, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"authorization": f"Bearer {key}"}
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: _status(post(gw_url + "/v1/chat/completions", body, headers)), range(n)))


def _status(response) -> int:
    if response.status_code != 200:
        print(response.status_code, response.text)
    return response.status_code


@pytest.mark.slow
def test_a_canary_at_20_percent_serves_20_percent_of_500_requests_and_rollback_restores_100_at_once(world, versions, gateway_factory):
    ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=20)
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    assert set(_call(gw.url, key, 500)) == {200}
    assert wait_for(lambda: len(usage_records(world.tenant)) == 500)
    served = _served(world.tenant)
    assert 75 <= served[V2] <= 125 and served[V1] + served[V2] == 500, served  # 20 % ± 5 % of 500
    assert {r.model for r in usage_records(world.tenant)} == {V1}  # the name the client called; `adapter` the version

    rollout = ro.canary_rollback(tenant=world.tenant, actor=SYSTEM, rollout=AdapterRollout.objects.for_tenant(world.tenant).get())
    # At once: the rollback bumps the config version, and from the next snapshot the name has no canary.
    assert wait_for(lambda: gw.app.store.snapshot.tenants[world.tenant.pk].models[V1].canary is None, timeout=5)
    UsageRecord.objects.for_tenant(world.tenant).delete()
    assert set(_call(gw.url, key, 50)) == {200}
    assert wait_for(lambda: len(usage_records(world.tenant)) == 50)
    assert _served(world.tenant) == {V1: 50}
    assert rollout.canary is None and rollout.canary_percent == 0


def test_the_split_is_the_share_exactly_and_spread_evenly(world, versions):
    ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=20)
    route = tenant_routes(world.tenant)[V1]
    assert (route.adapter, route.canary.adapter, route.canary.name, route.canary_percent) == (V1, V2, V1, 20)
    pools = {versions["pool"].pk: _pool_entry(versions["pool"], loaded={V1, V2})}
    picks = [pick_version(route, world.tenant.pk, pools).adapter for _ in range(500)]
    assert picks.count(V2) == 100
    assert all(picks[i:i + 5].count(V2) == 1 for i in range(0, 500, 5))  # every fifth, not 100 in a row


def test_a_canary_no_backend_holds_yet_takes_no_requests(world, versions):
    ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=100)
    route = tenant_routes(world.tenant)[V1]
    pools = {versions["pool"].pk: _pool_entry(versions["pool"], loaded={V1})}
    assert {pick_version(route, world.tenant.pk, pools).adapter for _ in range(10)} == {V1}


def _pool_entry(pool, *, loaded):
    from types import SimpleNamespace

    return SimpleNamespace(id=pool.pk, backends=[SimpleNamespace(loaded_adapters=frozenset(loaded))])


def test_promotion_makes_the_canary_the_version_the_name_serves(world, versions):
    rollout = ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=20)
    ro.canary_promote(tenant=world.tenant, actor=SYSTEM, rollout=rollout)
    routes = tenant_routes(world.tenant)
    assert (routes[V1].adapter, routes[V1].canary, routes[V1].name) == (V2, None, V1)
    assert routes[V2].adapter == V2  # the new version still answers to its own name
    actions = list(AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="finetune.canary_")
                   .order_by("id").values_list("action", flat=True))
    assert actions == ["finetune.canary_started", "finetune.canary_promoted"]


def test_every_change_is_audited_with_the_versions_and_share(world, versions):
    actor = Actor(user=world.admin)
    rollout = ro.canary_start(tenant=world.tenant, actor=actor, model=V1, canary=V2, percent=10)
    ro.canary_start(tenant=world.tenant, actor=actor, model=V1, canary=V2, percent=30)
    ro.canary_rollback(tenant=world.tenant, actor=actor, rollout=rollout)
    events = list(AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="finetune.canary_").order_by("id"))
    assert [(e.action, e.data["canary_percent"], e.actor_id) for e in events] == [
        ("finetune.canary_started", 10, world.admin.pk), ("finetune.canary_changed", 30, world.admin.pk),
        ("finetune.canary_rolled_back", 0, world.admin.pk)]
    assert events[1].data["previous_percent"] == 10 and events[2].data["dropped"] == V2
    assert all(e.target_type == "AdapterRollout" and e.target_id == str(rollout.pk) for e in events)


def test_the_comparison_reads_each_versions_requests_errors_tokens_and_latency_from_the_ledger(world, versions):
    rollout = ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=50)
    rows = [(V1, "ok", 10, 2, 100), (V1, "ok", 10, 3, 200), (V1, "error", 10, 0, 300), (V2, "ok", 5, 1, 50),
            (V2, "ok", 5, 1, 70), ("", "ok", 99, 99, 9)]  # the last: the base model, not the rollout's
    for i, (adapter, status, tin, tout, ms) in enumerate(rows):
        UsageRecord.all_tenants.create(tenant=world.tenant, request_id=f"r{i}", endpoint="chat", model=V1 if adapter else "tiny-chat",
                                       adapter=adapter, input_tokens=tin, output_tokens=tout, status=status, duration_ms=ms)
    current, canary = ro.comparison(rollout)
    assert (current.adapter, current.requests, current.errors, current.input_tokens, current.output_tokens,
            current.p50_ms, current.p95_ms) == (V1, 3, 1, 30, 5, 200, 300)
    assert (canary.adapter, canary.requests, canary.errors, canary.error_rate, canary.p50_ms, canary.p95_ms) == (V2, 2, 0, 0.0, 50, 70)


def test_a_canary_must_be_the_tenants_own_deployed_adapter_on_the_same_base_model(world, versions):
    with pytest.raises(ro.RolloutError) as other:
        ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=versions["theirs"].pk, percent=20)
    assert other.value.status == 404
    with pytest.raises(ro.RolloutError) as their_name:
        ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=OTHERS, canary=V2, percent=20)
    assert their_name.value.status == 404  # another tenant's model name is not a rollout acme may make
    from serving.models import Adapter

    other_base = make_base_model("other-chat")
    v3 = Adapter.all_tenants.create(tenant=world.tenant, name=V3, base_model=other_base, path="/unused")
    with pytest.raises(ro.RolloutError) as base:
        ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=v3.pk, percent=20)
    assert base.value.status == 400 and "same base model" in base.value.message
    undeployed = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:support:5", base_model=versions["base"], path="/x")
    with pytest.raises(ro.RolloutError) as not_deployed:
        ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=undeployed.pk, percent=20)
    assert not_deployed.value.status == 409
    for bad in (0, 101, "x"):
        with pytest.raises(ro.RolloutError) as share:
            ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=bad)
        assert share.value.status == 400
    assert not AdapterRollout.all_tenants.exists()


def test_a_deleted_canary_adapter_leaves_the_current_version_at_100_percent(world, versions):
    rollout = ro.canary_start(tenant=world.tenant, actor=SYSTEM, model=V1, canary=V2, percent=20)
    versions["v2"].delete()
    rollout.refresh_from_db()
    assert tenant_routes(world.tenant)[V1].canary is None
    assert (ro.rollout_dict(rollout)["canary"], ro.rollout_dict(rollout)["canary_percent"]) == (None, 0)


def test_a_rollout_row_naming_another_tenants_adapter_never_routes_it(world, versions):
    # A hand-made row: routing itself refuses another tenant's version, whatever the table holds.
    AdapterRollout.all_tenants.create(tenant=world.tenant, name=V1, current=versions["v1"], canary=versions["theirs"], canary_percent=100)
    AdapterRollout.all_tenants.create(tenant=world.tenant, name="tiny-chat", current=versions["v1"])
    AdapterRollout.all_tenants.create(tenant=world.other_tenant, name=V2, current=versions["theirs"])
    routes = tenant_routes(world.tenant)
    assert routes[V1].canary is None
    assert routes["tiny-chat"].adapter is None  # never in place of a base model
    assert routes[V2].adapter == V2  # another tenant's rollout row never renames acme's model


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def test_the_management_api_starts_compares_promotes_and_rolls_back_admins_only(world, versions):
    body = {"model": V1, "canary": versions["v2"].pk, "percent": 20}
    for role in ("developer", "viewer"):
        assert _api(world.user(role)).post("/api/tenants/acme/rollouts/", body, format="json").status_code == 403
    assert _api(world.outsider).post("/api/tenants/acme/rollouts/", body, format="json").status_code == 404
    admin = _api(world.admin)
    r = admin.post("/api/tenants/acme/rollouts/", {**body, "canary": versions["theirs"].pk}, format="json")
    assert r.status_code == 404 and r.json()["param"] == "canary"
    r = admin.post("/api/tenants/acme/rollouts/", body, format="json")
    assert r.status_code == 201, r.content
    started = r.json()
    assert (started["model"], started["current"], started["canary"], started["canary_percent"]) == (V1, V1, V2, 20)
    assert [v["role"] for v in started["versions"]] == ["current", "canary"]
    rid = started["id"]
    assert _api(world.viewer).get(f"/api/tenants/acme/rollouts/{rid}/").json()["canary"] == V2  # members read
    assert _api(world.outsider).get(f"/api/tenants/globex/rollouts/{rid}/").status_code == 404
    assert _api(world.developer).post(f"/api/tenants/acme/rollouts/{rid}/rollback/").status_code == 403
    assert _api(world.outsider).post(f"/api/tenants/globex/rollouts/{rid}/promote/").status_code == 404
    rolled = admin.post(f"/api/tenants/acme/rollouts/{rid}/rollback/").json()
    assert (rolled["current"], rolled["canary"], rolled["canary_percent"]) == (V1, None, 0)
    assert admin.post(f"/api/tenants/acme/rollouts/{rid}/rollback/").status_code == 409  # nothing left to roll back
    admin.post("/api/tenants/acme/rollouts/", body, format="json")
    promoted = admin.post(f"/api/tenants/acme/rollouts/{rid}/promote/").json()
    assert (promoted["current"], promoted["canary"]) == (V2, None)
    assert [r["model"] for r in admin.get("/api/tenants/acme/rollouts/").json()] == [V1]


def test_the_console_page_shows_the_comparison_and_only_admins_change_it(world, versions):
    assert signed_in(world.developer).post("/t/acme/finetune/rollouts/", {"model": V1, "canary": versions["v2"].pk, "percent": 20}).status_code == 403
    assert signed_in(world.outsider).get("/t/acme/finetune/rollouts/").status_code == 404
    admin = signed_in(world.admin)
    assert admin.post("/t/acme/finetune/rollouts/", {"model": V1, "canary": versions["theirs"].pk, "percent": 20}).status_code == 404
    assert admin.post("/t/acme/finetune/rollouts/", {"model": V1, "canary": versions["v2"].pk, "percent": 20}).status_code == 302
    rollout = AdapterRollout.objects.for_tenant(world.tenant).get()
    assert (rollout.canary_id, rollout.canary_percent) == (versions["v2"].pk, 20)
    page = admin.get("/t/acme/finetune/rollouts/").content.decode()
    assert "20 %" in page and V2 in page and "data-confirm=\"Promote" in page and "data-confirm=\"Roll back" in page
    viewer_page = signed_in(world.viewer).get("/t/acme/finetune/rollouts/").content.decode()
    assert V2 in viewer_page and "Promote" not in viewer_page and "Start canary" not in viewer_page
    assert signed_in(world.developer).post(f"/t/acme/finetune/rollouts/{rollout.pk}/promote/").status_code == 403
    assert signed_in(world.outsider).post(f"/t/globex/finetune/rollouts/{rollout.pk}/rollback/").status_code == 404
    assert admin.post(f"/t/acme/finetune/rollouts/{rollout.pk}/rollback/").status_code == 302
    assert AdapterRollout.objects.for_tenant(world.tenant).get().canary_id is None
    assert json.loads(json.dumps(ro.rollout_dict(rollout, with_figures=False), default=str))["model"] == V1


def test_a_tenant_chosen_name_serves_its_version_and_canaries_move_it(world, versions):
    rollout = ro.rollout_create(tenant=world.tenant, actor=Actor(user=world.admin), name="support-bot", current=V1)
    route = tenant_routes(world.tenant)["support-bot"]
    assert (route.name, route.adapter, route.canary) == ("support-bot", V1, None)
    ro.canary_start(tenant=world.tenant, actor=SYSTEM, model="support-bot", canary=V2, percent=50)
    ro.canary_promote(tenant=world.tenant, actor=SYSTEM, rollout=rollout)
    assert tenant_routes(world.tenant)["support-bot"].adapter == V2
    assert tenant_routes(world.tenant)[V1].adapter == V1  # the versions keep their own names
    event = AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.rollout_created").get()
    assert (event.data["model"], event.data["current"], event.actor_id) == ("support-bot", V1, world.admin.pk)


@pytest.mark.parametrize("name", ["tiny-chat", "default", "ft:tiny-chat:acme:x:9", "", "-x", "a" * 65, "sp ace"])
def test_a_chosen_name_is_never_a_base_model_a_placeholder_or_an_ft_name(world, versions, name):
    with pytest.raises(ro.RolloutError) as refused:
        ro.rollout_create(tenant=world.tenant, actor=SYSTEM, name=name, current=V1)
    assert refused.value.status == 400 and refused.value.param == "model"


def test_a_chosen_name_is_one_per_tenant_and_only_for_the_tenants_own_adapter(world, versions):
    with pytest.raises(ro.RolloutError) as theirs:
        ro.rollout_create(tenant=world.tenant, actor=SYSTEM, name="bot", current=versions["theirs"].pk)
    assert (theirs.value.status, theirs.value.param) == (404, "current")
    ro.rollout_create(tenant=world.tenant, actor=SYSTEM, name="bot", current=V1)
    with pytest.raises(ro.RolloutError) as again:
        ro.rollout_create(tenant=world.tenant, actor=SYSTEM, name="bot", current=V2)
    assert again.value.status == 409
    ro.rollout_create(tenant=world.other_tenant, actor=SYSTEM, name="bot", current=OTHERS)  # globex's own "bot"
    assert tenant_routes(world.tenant)["bot"].adapter == V1


def test_the_api_names_a_version_and_starts_its_canary_in_one_call_or_neither(world, versions):
    admin = _api(world.admin)
    r = admin.post("/api/tenants/acme/rollouts/", {"model": "bot", "current": V1, "canary": V2, "percent": 200}, format="json")
    assert r.status_code == 400 and not AdapterRollout.all_tenants.exists()  # the bad share undid the name too
    r = admin.post("/api/tenants/acme/rollouts/", {"model": "bot", "current": V1, "canary": V2, "percent": 20}, format="json")
    assert r.status_code == 201 and (r.json()["model"], r.json()["current"], r.json()["canary"]) == ("bot", V1, V2)
    assert _api(world.developer).post("/api/tenants/acme/rollouts/", {"model": "b2", "current": V1}, format="json").status_code == 403
    r = admin.post("/api/tenants/acme/rollouts/", {"model": "b3", "current": versions["theirs"].pk}, format="json")
    assert r.status_code == 404


def test_the_console_names_a_version(world, versions):
    admin = signed_in(world.admin)
    assert admin.post("/t/acme/finetune/rollouts/", {"model": "support-bot", "current": versions["v1"].pk}).status_code == 302
    assert AdapterRollout.objects.for_tenant(world.tenant).get().name == "support-bot"
    assert admin.post("/t/acme/finetune/rollouts/", {"model": "x", "current": versions["theirs"].pk}).status_code == 404
    assert signed_in(world.developer).post("/t/acme/finetune/rollouts/", {"model": "y", "current": versions["v1"].pk}).status_code == 403
    assert "Name a version" in admin.get("/t/acme/finetune/rollouts/").content.decode()
