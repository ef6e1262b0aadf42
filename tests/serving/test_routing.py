"""One routing rule (serving.routing): the gateway's snapshot, the console and deployment answer "which models" and
"which pool" from the same function, so they cannot disagree."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from serving.config import load_snapshot
from serving.models import AdapterDeployment, BackendPool
from serving.routing import PoolView, routes_for, tenant_routes
from serving.views import model_names_for, served_base_models
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


def test_backend_pool_queries_for_a_tenant_never_reach_another_tenants_dedicated_pool(world):
    base = make_base_model("tiny-chat")
    shared = make_pool("shared", base, [])
    own = make_pool("acme-own", base, [], dedicated=world.tenant)
    make_pool("globex-own", base, [], dedicated=world.other_tenant)
    assert set(BackendPool.objects.reachable_by(world.tenant)) == {shared, own}


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
