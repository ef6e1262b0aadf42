"""The gateway's routing table (serving.config._routes_for): which model names a tenant's requests may reach."""

from __future__ import annotations

import logging

from serving.config import load_snapshot
from serving.models import AdapterDeployment
from serving.views import model_names_for
from tests.support.gateway import closed_port_url, deploy_adapter, make_base_model, make_pool, set_model_config

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


# ---- one rule picks the pool (serving.routing.pool_choice) ---------------------------------------------------


def three_choices(tenant, base) -> tuple:
    """The pool each part picks for (tenant, base model): the gateway's route, a deployment, the console."""
    from finetune.deploy import adapter_deploy
    from serving.models import Adapter
    from serving.views import served_base_models
    from tenants.services import SYSTEM

    route = load_snapshot().tenants[tenant.pk].models.get(base.name)
    adapter = Adapter.all_tenants.create(tenant=tenant, name=f"ft:{base.name}:{tenant.slug}::{Adapter.all_tenants.count()}", base_model=base,
                                         path="/unused")
    deployment = adapter_deploy(tenant=tenant, adapter=adapter, actor=SYSTEM)
    console = dict(served_base_models(tenant)).get(base)
    return route and route.pool_id, deployment.pool_id, console and console.pk


def test_routing_deployment_and_the_console_pick_the_same_pool(world):
    from serving.models import Backend

    base = make_base_model("tiny-chat")
    idle = make_pool("a-shared-idle", base, [])  # first by name, but no enabled backend
    Backend.objects.create(pool=idle, url=closed_port_url(), enabled=False)
    serving = make_pool("b-shared", base, [closed_port_url()])
    assert three_choices(world.tenant, base) == (serving.pk, serving.pk, serving.pk)

    own = make_pool("z-acme-own", base, [], dedicated=world.tenant)  # isolated tenancy: its own pool, even idle
    assert three_choices(world.tenant, base) == (own.pk, own.pk, own.pk)
    assert three_choices(world.other_tenant, base) == (serving.pk, serving.pk, serving.pk)  # never acme's pool

    Backend.objects.filter(pool=serving).update(enabled=False)  # nothing up anywhere: first by name
    assert three_choices(world.other_tenant, base) == (idle.pk, idle.pk, idle.pk)


def test_the_pool_rule():
    from types import SimpleNamespace as P

    from serving.routing import pool_choice

    a, b = P(name="a", dedicated_tenant_id=None, enabled_backends=0), P(name="b", dedicated_tenant_id=None, enabled_backends=2)
    mine, theirs = P(name="x", dedicated_tenant_id=1, enabled_backends=0), P(name="c", dedicated_tenant_id=2, enabled_backends=5)
    assert pool_choice([a, b], tenant_id=1) is b  # backends first, then name
    assert pool_choice([a, P(name="0", dedicated_tenant_id=None, enabled_backends=0)], tenant_id=1).name == "0"
    assert pool_choice([a, b, mine, theirs], tenant_id=1) is mine  # dedicated first
    assert pool_choice([a, b, mine, theirs], tenant_id=3) is b  # another's dedicated pool never
    assert pool_choice([theirs], tenant_id=1) is None and pool_choice([], tenant_id=1) is None


# ---- the poller's logging while Redis (or the reload) fails ----------------------------------------------------


def _config_records(caplog) -> list:
    return [r for r in caplog.records if r.name == "serving.config"]


def test_a_redis_outage_is_logged_once_then_quietly_then_once_when_it_ends(db, settings, monkeypatch, caplog):
    from serving import config
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        settings.REDIS_URL = server.url
        store = config.ConfigStore()
        store.refresh(force=True)
        caplog.set_level(logging.DEBUG, logger="serving.config")
        server.kill()
        for _ in range(3):
            store.poll()
        records = _config_records(caplog)
        assert [r.levelno for r in records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
        down = records[0]
        assert down.exc_info is None  # what happened and what to do, not a traceback every half second
        message = down.getMessage()
        assert f"Redis at 127.0.0.1:{server.port}/0 is unreachable (ConnectionError" in message
        assert "keeps serving its config snapshot" in message and "revoked keys" in message
        assert "Check that Redis is running and that REDIS_URL points at it" in message

        caplog.clear()
        server.start()
        reloads = store.reloads
        store.poll()
        store.poll()
        records = _config_records(caplog)
        assert [r.levelno for r in records] == [logging.INFO]
        assert records[0].getMessage().startswith(f"Redis at 127.0.0.1:{server.port}/0 answers again after ")
        assert store.reloads == reloads + 1  # reloaded at once: a change made meanwhile could not bump the version
    finally:
        server.stop()


def test_a_failing_reload_logs_its_traceback_once(transactional_db, monkeypatch, caplog):
    """(transactional_db: the poller closes its database connection after a failure.)"""
    from serving import config

    store = config.ConfigStore()
    store.refresh(force=True)
    caplog.set_level(logging.DEBUG, logger="serving.config")
    real_read = config.config_version_read

    def broken():
        raise RuntimeError("the version table is gone")

    monkeypatch.setattr(config, "config_version_read", broken)
    for _ in range(3):
        store.poll()
    records = _config_records(caplog)
    assert [r.levelno for r in records] == [logging.ERROR, logging.DEBUG, logging.DEBUG]
    assert records[0].exc_info is not None and "serving the previous snapshot" in records[0].getMessage()
    caplog.clear()
    monkeypatch.setattr(config, "config_version_read", real_read)
    store.poll()
    assert [(r.levelno, r.getMessage().split(" after ")[0]) for r in _config_records(caplog)] == [
        (logging.INFO, "gateway config reload works again")]
