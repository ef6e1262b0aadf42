"""The gateway's routing table (serving.config._routes_for): which model names a tenant's requests may reach."""

from __future__ import annotations

from serving.config import load_snapshot
from serving.models import AdapterDeployment
from serving.views import model_names_for
from tests.serving.test_gateway_support import deploy_adapter, make_base_model, make_pool, set_model_config

ADAPTER = "ft:tiny-chat:acme::a1"


def routes(tenant) -> set[str]:
    return set(load_snapshot().tenants[tenant.pk].models)


def test_adapter_routes_only_while_its_base_model_is_allowed(world):
    base, other = make_base_model("tiny-chat"), make_base_model("other-chat")
    deploy_adapter(world.tenant, ADAPTER, base, make_pool("shared", base, ["http://b:1"], adapters=[ADAPTER]))
    make_pool("other", other, ["http://b:2"])
    assert routes(world.tenant) == {"tiny-chat", "other-chat", ADAPTER}

    assert set(model_names_for(world.tenant)) == routes(world.tenant)  # the console lists what the gateway routes

    set_model_config(world.tenant, allowed_models=["other-chat"])
    assert routes(world.tenant) == {"other-chat"}  # staff took tiny-chat away: its adapters go with it
    assert set(model_names_for(world.tenant)) == {"other-chat"}


def test_adapter_of_a_base_model_no_longer_available_is_not_routed(world):
    base = make_base_model("tiny-chat")
    deploy_adapter(world.tenant, ADAPTER, base, make_pool("shared", base, ["http://b:1"], adapters=[ADAPTER]))
    base.available_to_all = False
    base.save()
    assert routes(world.tenant) == set() == set(model_names_for(world.tenant))


def test_adapter_on_the_tenants_dedicated_pool_routes_whatever_the_shared_rules(world):
    base = make_base_model("tiny-chat", available_to_all=False)
    deploy_adapter(world.tenant, ADAPTER, base, make_pool("acme-own", base, ["http://b:1"], adapters=[ADAPTER], dedicated=world.tenant))
    assert routes(world.tenant) == {"tiny-chat", ADAPTER}


def test_a_deployment_row_naming_another_tenants_adapter_routes_nowhere(world):
    base = make_base_model("tiny-chat")
    pool = make_pool("shared", base, ["http://b:1"], adapters=[ADAPTER])
    adapter = deploy_adapter(world.tenant, ADAPTER, base, pool)
    # e.g. made by hand in the admin: globex's deployment of acme's adapter
    AdapterDeployment.all_tenants.filter(adapter=adapter).update(tenant=world.other_tenant)
    assert ADAPTER not in routes(world.other_tenant)
    assert ADAPTER not in routes(world.tenant)  # not acme's deployment either: nothing routes it
