"""One routing rule (serving.routing): the gateway's snapshot, the console and deployment answer "which models" and
"which pool" from the same function, so they cannot disagree."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from serving.config import load_snapshot
from serving.models import AdapterDeployment, BackendPool, MergedModel
from serving.routing import PoolView, routes_for, tenant_routes
from serving.selectors import pool_for
from serving.views import model_names_for, served_base_models
from tenants.scoping import UnscopedQueryError
from tests.support.gateway import deploy_adapter, make_base_model, make_pool

ADAPTER = "ft:tiny-chat:acme::a1"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def gateway_names(tenant) -> set[str]:
    return set(load_snapshot().tenants[tenant.pk].models)


@pytest.mark.parametrize("state", [s for s in AdapterDeployment.State])
def test_console_and_gateway_agree_on_every_deployment_state(world, state):
    base = make_base_model("tiny-chat")
    pool = make_pool("shared", base, ["http://b:1"], adapters=[ADAPTER])
    deploy_adapter(world.tenant, ADAPTER, base, pool)
    AdapterDeployment.all_tenants.update(state=state)

    console = set(model_names_for(world.tenant))
    assert console == gateway_names(world.tenant)
    assert (ADAPTER in console) == (state != AdapterDeployment.State.FAILED)  # a failed deployment is offered by neither


def test_the_snapshot_is_the_same_function_over_the_same_data(world):
    base, other = make_base_model("tiny-chat"), make_base_model("secret", available_to_all=False)
    make_pool("shared", base, ["http://b:1"], adapters=[ADAPTER])
    make_pool("globex-own", other, ["http://b:2"], dedicated=world.other_tenant)
    deploy_adapter(world.tenant, ADAPTER, base, BackendPool.objects.get(name="shared"))

    for tenant in (world.tenant, world.other_tenant):
        assert tenant_routes(tenant) == dict(load_snapshot().tenants[tenant.pk].models)
    assert "secret" not in tenant_routes(world.tenant)  # another tenant's dedicated pool never serves acme
    assert set(tenant_routes(world.other_tenant)) == {"tiny-chat", "secret"}
    assert [bm.name for bm, _ in served_base_models(world.other_tenant)] == ["secret", "tiny-chat"]


# Where the merged model's row points, and its state -> which pool serves the base model (None: none does).
MERGED_CASES = {
    "serving on the tenant's dedicated pool": ("acme-own", "serving", "shared"),
    "ready, not yet serving": ("acme-own", "ready", "acme-own"),
    "a hand-made serving row on the shared pool": ("shared", "serving", "acme-own"),
}


@pytest.mark.parametrize("on, state, serves", MERGED_CASES.values(), ids=MERGED_CASES)
def test_console_gateway_and_deployment_agree_on_a_pool_running_a_merged_model(world, on, state, serves):
    """A pool whose backends run a merged model serves nothing else (serving.routing.merged_pools): the base model
    moves to the shared pool for the gateway, the console's model list and the pool a new deployment goes to alike;
    a row the rule does not count (not serving, not on a dedicated pool) moves nothing anywhere."""
    base = make_base_model("tiny-chat")
    pools = {"shared": make_pool("shared", base, ["http://b:1"]),
             "acme-own": make_pool("acme-own", base, ["http://b:2"], dedicated=world.tenant)}
    merged = deploy_adapter(world.tenant, ADAPTER, base, pools["shared"])
    MergedModel.objects.for_tenant(world.tenant).create(adapter=merged, pool=pools[on], state=state, path="/m")

    routes = tenant_routes(world.tenant)
    assert routes == dict(load_snapshot().tenants[world.tenant.pk].models)
    assert set(model_names_for(world.tenant)) == gateway_names(world.tenant) == {"tiny-chat", ADAPTER}
    assert routes["tiny-chat"].pool_id == pools[serves].pk
    assert [pool for _, pool in served_base_models(world.tenant)] == [pools[serves]]  # the console's Models page
    assert pool_for(world.tenant, base) == pools[serves]  # where the next adapter deployment goes
    running = on == "acme-own" and state == "serving"
    assert [n for n, r in routes.items() if r.pool_id == pools["acme-own"].pk] == [ADAPTER] if running else ["tiny-chat"]


@pytest.mark.parametrize("dedicated, serves", [(True, False), (False, True)], ids=["dedicated", "shared, hand-made row"])
def test_the_only_pool_serves_the_base_model_unless_it_runs_a_merged_model(world, dedicated, serves):
    base = make_base_model("tiny-chat")
    pool = make_pool("only", base, ["http://b:2"], dedicated=world.tenant if dedicated else None)
    merged = deploy_adapter(world.tenant, ADAPTER, base, pool)
    MergedModel.objects.for_tenant(world.tenant).create(adapter=merged, pool=pool, state="serving", path="/m")
    routes = tenant_routes(world.tenant)
    assert routes == dict(load_snapshot().tenants[world.tenant.pk].models)
    assert ("tiny-chat" in routes) is serves and pool_for(world.tenant, base) == (pool if serves else None)
    assert set(model_names_for(world.tenant)) == gateway_names(world.tenant) == ({"tiny-chat"} if serves else set()) | {ADAPTER}


def test_backend_pool_queries_for_a_tenant_never_reach_another_tenants_dedicated_pool(world):
    base = make_base_model("tiny-chat")
    shared = make_pool("shared", base, [])
    own = make_pool("acme-own", base, [], dedicated=world.tenant)
    make_pool("globex-own", base, [], dedicated=world.other_tenant)
    assert set(BackendPool.objects.reachable_by(world.tenant)) == {shared, own}
    assert list(BackendPool.objects.dedicated_to(world.tenant)) == [own]
    assert list(BackendPool.objects.dedicated_to(world.tenant.pk)) == [own]


@pytest.mark.parametrize("tenant", [None, SimpleNamespace(pk=None)])
def test_dedicated_pools_of_no_tenant_are_an_error_not_the_shared_pools(world, tenant):
    make_pool("shared", make_base_model("tiny-chat"), [])
    with pytest.raises(UnscopedQueryError, match="dedicated_to\\(\\) was given no tenant"):
        BackendPool.objects.dedicated_to(tenant)


# ---- routes_for is pure: plain objects in, routes out -----------------------------------------------------------


def bm(name, available_to_all=True):
    return SimpleNamespace(name=name, available_to_all=available_to_all, created_at=T0)


def dep(adapter, pool_id, *, tenant_id=1, adapter_tenant_id=None, state=AdapterDeployment.State.ACTIVE):
    return SimpleNamespace(pool_id=pool_id, tenant_id=tenant_id, state=state,
                           adapter=SimpleNamespace(name=adapter, tenant_id=adapter_tenant_id or tenant_id, created_at=T0))


def routes(deployments=(), allowed=(), pools=None, models=None):
    pools = pools or [PoolView(1, "b-shared", "m", None, 1), PoolView(2, "a-idle", "m", None, 0)]
    return routes_for(tenant_id=1, tenant_slug="acme", allowed=allowed, base_models=models or [bm("m")],
                      pools=pools, deployments=deployments)


def test_a_pool_with_backends_wins_over_an_idle_one_and_the_tenants_own_pool_over_both():
    assert routes()["m"].pool_id == 1
    own = PoolView(3, "z-own", "m", 1, 0)
    assert routes(pools=[PoolView(1, "b-shared", "m", None, 1), own])["m"] == routes(pools=[own])["m"]
    assert routes(pools=[own])["m"].owned_by == "acme"
    assert routes(pools=[PoolView(4, "globex", "m", 2, 1)]) == {}  # another tenant's dedicated pool: no route


def test_adapters_route_only_when_deployed_owned_and_on_a_usable_base_model():
    assert routes([dep("ft:a", 1)])["ft:a"].adapter == "ft:a"
    assert "ft:a" not in routes([dep("ft:a", 1, state=AdapterDeployment.State.FAILED)])
    assert "ft:a" not in routes([dep("ft:a", 1, adapter_tenant_id=2)])  # a hand-made row naming another's adapter
    assert "ft:a" not in routes([dep("ft:a", 1, tenant_id=2)])
    assert "ft:a" not in routes([dep("ft:a", 9)])  # a pool that is gone
    assert routes([dep("ft:a", 1)], allowed=["other"], models=[bm("m"), bm("other")]).keys() == set()  # no pool for other
    assert routes([dep("m", 1)])["m"].adapter is None  # an adapter never shadows a base model of the same name
