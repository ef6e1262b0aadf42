"""Issue 15's "done when": a merged model serves on a dedicated pool with the same greedy answers as base + adapter.

End to end, slow: acme's adapter answers through the gateway as a LoRA on the shared pool's dev backend; a worker
merges it (the Celery task, eagerly); a dev backend of acme's dedicated pool is started on the merged folder (the
transformers engine, no LoRA); staff serve it; the same prompts through the gateway now come from the dedicated pool
(the ledger says so, and the shared backend is stopped by then) with the same answers. Another tenant gets 404."""

from __future__ import annotations

import pytest

from finetune import deploy, merge
from serving.models import Adapter, Backend, BackendPool, BaseModel, MergedModel
from tenants import services as tenant_services
from tenants.services import SYSTEM, Actor
from tests.support.gateway import usage_records, wait_for

PROMPTS = ["the cat sees a book", "Hello 👋 how are you? 🌍🚀", "你好，世界！今天天气怎么样？", "The answer is 42."]


def _lora(base, out):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_a_merged_model_on_the_dedicated_pool_answers_as_base_plus_adapter_on_the_shared_pool(
        transactional_db, dead_threads_connections_closed, world, tiny_model_path, tmp_path, settings):
    from openai import NotFoundError, OpenAI

    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread
    from serving.admission import reset_admission
    from serving.budgets import reset_budgets
    from serving.gateway.app import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.scheduler import reset_scheduler
    from tests.support.gateway import GatewayServer

    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024)
    shared = BackendPool.objects.create(name="shared-tiny", base_model=base, kind="dev")
    shared_url, stop_shared = run_in_thread(BackendConfig(model=str(tiny_model_path), port=0, flavor="dev"))
    stops = [stop_shared]
    server = None
    try:
        Backend.objects.create(pool=shared, url=shared_url)
        adapter = Adapter.objects.for_tenant(world.tenant).create(
            name="ft:tiny-chat:acme:merged:1", base_model=base, path=str(_lora(tiny_model_path, tmp_path / "lora")), rank=4)
        assert deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM).state == "active"  # LoRA, shared pool
        _, secret = tenant_services.api_key_create(tenant=world.tenant, name="k", scopes=["inference"], actor=Actor(user=world.owner))
        _, foreign = tenant_services.api_key_create(tenant=world.other_tenant, name="g", scopes=["inference"],
                                                    actor=Actor(user=world.outsider))
        reset_admission(), reset_scheduler(), reset_budgets()
        server = GatewayServer(GatewayApp(settings=GatewaySettings(health_interval_s=0.2, config_poll_s=0.1,
                                                                  connect_timeout_s=1.0, read_timeout_s=60))).start()
        client = OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)

        def answers() -> list[str]:
            return [client.chat.completions.create(model=adapter.name, messages=[{"role": "user", "content": p}],
                                                   max_tokens=24, temperature=0).choices[0].message.content for p in PROMPTS]

        with_lora = answers()
        plain = [client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": p}],
                                                max_tokens=24, temperature=0).choices[0].message.content for p in PROMPTS]
        assert all(with_lora) and with_lora != plain  # the adapter changes the answers

        dedicated = BackendPool.objects.create(name="acme-tiny", base_model=base, kind="dev", dedicated_tenant=world.tenant)
        merged = merge.merged_model_request(tenant=world.tenant, adapter=adapter, actor=Actor(user=world.admin))  # runs on commit
        merged.refresh_from_db()
        assert merged.state == "ready", merged.error
        merged_url, stop_merged = run_in_thread(BackendConfig(model=merged.path, port=0, flavor="dev"))  # the restart
        stops.append(stop_merged)
        Backend.objects.create(pool=dedicated, url=merged_url)
        merge.merged_model_serve(merged=MergedModel.objects.for_tenant(world.tenant).select_related("adapter", "pool", "tenant")
                                 .get(pk=merged.pk), actor=SYSTEM)
        assert wait_for(lambda: server.app.store.snapshot.tenants[world.tenant.pk].models[adapter.name].pool_id == dedicated.pk,
                        timeout=10)
        assert wait_for(lambda: len(usage_records(world.tenant)) == 2 * len(PROMPTS))
        stop_shared()  # from here on only the dedicated pool's backend, on the merged weights, can answer it
        stops.remove(stop_shared)

        assert answers() == with_lora
        assert wait_for(lambda: len(usage_records(world.tenant)) == 3 * len(PROMPTS))
        last = usage_records(world.tenant)[-len(PROMPTS):]
        assert {(r.pool_id, r.model, r.adapter, r.status) for r in last} == {(dedicated.pk, adapter.name, adapter.name, "ok")}
        with pytest.raises(NotFoundError):  # another tenant cannot call it
            OpenAI(base_url=f"{server.url}/v1", api_key=foreign, max_retries=0).chat.completions.create(
                model=adapter.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    finally:
        if server is not None:
            server.stop()
        for stop in stops:
            stop()
