"""manage.py demo_setup, which scripts/up.sh runs at every start: a restarted dev backend gets its deployed adapters back."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from finetune import deploy
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel, ModelConfig
from tenants.models import Tenant
from tenants.services import SYSTEM
from tests.support.gateway import http_json, sim_backend


def _served_adapters(url: str) -> list[str]:
    _, body = http_json("GET", url + "/v1/models")
    return sorted(m["id"] for m in body["data"] if m.get("parent"))


@pytest.fixture
def demo(db, tiny_model_path):
    """The demo as up.sh sets it up, on a simulated dev backend, with one adapter deployed: (url, pool, adapter)."""
    url, stop = sim_backend()
    try:
        call_command("demo_setup", model_path=str(tiny_model_path), model_name="tiny-chat", backend_url=url, stdout=io.StringIO())
        tenant, pool = Tenant.objects.get(slug="demo"), BackendPool.objects.get(name="dev-tiny-chat")
        adapter = Adapter.all_tenants.create(tenant=tenant, name="ft:tiny-chat:demo:zebra:1", base_model=pool.base_model, path="/a/zebra")
        assert deploy.adapter_deploy(tenant=tenant, adapter=adapter, actor=SYSTEM).state == "active"
        yield url, pool, adapter
    finally:
        stop()


def test_a_restart_reloads_deployed_adapters_on_the_dev_backend(demo, tiny_model_path):
    url, pool, adapter = demo
    backend = Backend.objects.get(pool=pool)
    Backend.objects.filter(pk=backend.pk).update(loaded_adapters=[adapter.name, "ft:tiny-chat:demo:gone:2"])  # one undeployed since
    assert deploy._post(url + "/v1/unload_lora_adapter", {"lora_name": adapter.name})[0]  # what a restart does to it

    out = io.StringIO()
    call_command("demo_setup", model_path=str(tiny_model_path), model_name="tiny-chat", backend_url=url, stdout=out)  # up.sh, again
    assert "Reloaded 1 deployed adapter(s)" in out.getvalue()
    assert _served_adapters(url) == [adapter.name]  # served again, not silently answered by the base model
    assert Backend.objects.get(pk=backend.pk).loaded_adapters == [adapter.name]  # what it really holds


def test_an_adapter_that_fails_to_reload_is_not_listed(db, monkeypatch):
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat")
    pool = BackendPool.objects.create(name="dev-tiny", base_model=base, kind="dev")
    backend = Backend.objects.create(pool=pool, url="http://backend.test:8081", loaded_adapters=["ft:a", "ft:b"])
    for name in ("ft:a", "ft:b"):
        adapter = Adapter.all_tenants.create(tenant=tenant, name=name, base_model=base, path=f"/a/{name}")
        AdapterDeployment.all_tenants.create(tenant=tenant, adapter=adapter, pool=pool)
    from serving import adapter_loads

    monkeypatch.setattr(adapter_loads, "post_json", lambda url, body: (body["lora_name"] == "ft:a", "HTTP 404: no adapter_config.json"))
    assert deploy.backend_reload_adapters(backend) == ["ft:a"]
    assert Backend.objects.get(pk=backend.pk).loaded_adapters == ["ft:a"]  # ft:b now gets a clear 503, not the base model
    refused = AdapterDeployment.all_tenants.get(adapter__name="ft:b")
    assert (refused.state, refused.failed_on) == ("failed", [backend.pk])  # not asked again until a change
    assert "http://backend.test:8081: HTTP 404: no adapter_config.json" == refused.error_detail  # staff see the answer
    assert "backend.test" not in refused.error and "404" not in refused.error  # the tenant sees the platform's words


def test_the_periodic_reconcile_reloads_what_a_restarted_backend_forgot(demo):
    """finetune.tasks.reconcile_adapters (beat, every minute): production backends restart without up.sh."""
    from finetune.tasks import reconcile_adapters

    url, pool, adapter = demo
    assert reconcile_adapters() == 0  # everything deployed is served: nothing to do
    assert deploy._post(url + "/v1/unload_lora_adapter", {"lora_name": adapter.name})[0]  # what a restart does
    assert _served_adapters(url) == []

    assert reconcile_adapters() == 1
    assert _served_adapters(url) == [adapter.name]
    assert Backend.objects.get(pool=pool).loaded_adapters == [adapter.name]
    Backend.objects.filter(pool=pool).update(url="http://127.0.0.1:9")  # unreachable: left to the health checks
    assert reconcile_adapters() == 0


@pytest.mark.slow  # builds the demo model the first time (about 30 s)
def test_the_demo_serves_smollm2_with_what_fine_tuning_and_the_planner_need(db, demo_model_path):
    out = io.StringIO()
    call_command("demo_setup", model_path=str(demo_model_path), backend_url="http://127.0.0.1:9", stdout=out)
    base = BaseModel.objects.get(name="smollm2-135m-instruct")
    assert base.hf_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and base.local_path == str(demo_model_path.resolve())
    assert (base.hidden_size, base.num_layers, base.num_attention_heads, base.num_key_value_heads,
            base.intermediate_size) == (576, 30, 9, 3, 1536)
    assert base.context_length == 2048 and base.finetune_learning_rate == 2e-4
    pool = BackendPool.objects.get(base_model=base)
    assert (pool.name, pool.kind, pool.max_lora_rank) == ("dev-smollm2-135m-instruct", "dev", 16)
    assert list(pool.backends.values_list("url", "enabled")) == [("http://127.0.0.1:9", True)]
    tenant = Tenant.objects.get(slug="demo")
    config = ModelConfig.objects.for_tenant(tenant).get()
    assert config.default_model == "smollm2-135m-instruct" and config.auto_deploy_finetuned
    assert '"model": "smollm2-135m-instruct"' in out.getvalue()


def test_a_demo_set_up_on_the_tiny_model_moves_to_the_new_model(db, tiny_model_path, tmp_path):
    """An old demo database: the server at the backend's address now serves the new model, not the tiny one."""
    url = "http://127.0.0.1:9"
    call_command("demo_setup", model_path=str(tiny_model_path), model_name="tiny-chat", backend_url=url,
                 stdout=io.StringIO())
    call_command("demo_setup", model_path=str(tiny_model_path), backend_url=url, stdout=io.StringIO())
    assert list(Backend.objects.filter(url=url).order_by("pool__name").values_list("pool__name", "enabled")) == [
        ("dev-smollm2-135m-instruct", True), ("dev-tiny-chat", False)]
    tenant = Tenant.objects.get(slug="demo")
    assert ModelConfig.objects.for_tenant(tenant).get().default_model == "smollm2-135m-instruct"


@pytest.mark.parametrize("change", ["production", "own key"])
def test_demo_setup_refuses_to_create_its_published_accounts_outside_development(db, settings, tiny_model_path, change):
    from django.core.management.base import CommandError

    from tenants.models import Tenant

    if change == "production":
        settings.PRODUCTION = True
    else:
        settings.SECRET_KEY = "k" * 50
    with pytest.raises(CommandError, match="for the embedded development setup only"):
        call_command("demo_setup", model_path=str(tiny_model_path), model_name="tiny-chat", backend_url="http://127.0.0.1:9",
                     stdout=io.StringIO())
    assert not Tenant.objects.filter(slug="demo").exists()
