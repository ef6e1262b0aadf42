"""Merged models against real vLLM (docs/finetuning.md, "Merged models"): the folder finetune/merge.py writes is served
by a second vLLM server (`--model <folder> --served-model-name <ft: name>`) as an isolated tenant's dedicated pool, and
answers through the gateway as the same adapter does as a LoRA on the session's server (the shared pool)."""

from __future__ import annotations

from pathlib import Path

from openai import OpenAI

from finetune import deploy, merge
from serving.models import Adapter, Backend, BackendPool, MergedModel
from tenants.services import SYSTEM, Actor
from tests.realvllm.server import VLLMServer, served_models
from tests.support.gateway import usage_records, wait_for

PROMPTS = ["the cat sees", "Hello 👋 world 🌍", "你好，世界", "The answer is"]


def test_a_merged_folder_served_by_vllm_on_the_dedicated_pool_answers_as_the_lora_on_the_shared_pool(
        world, platform, random_adapter, settings, tmp_path, _no_broker):
    settings.STORAGE_DIR = tmp_path / "storage"
    vllm, base = platform["vllm"], platform["base"]
    adapter = Adapter.objects.for_tenant(world.tenant).create(name="ft:tiny-chat:acme:merged:1", base_model=base,
                                                              path=str(random_adapter[4]), rank=4)
    assert deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM).state == "active"  # LoRA on vLLM
    gw = platform["start"]()
    acme = OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"]["acme"], max_retries=0)
    assert wait_for(lambda: any(m.id == adapter.name for m in acme.models.list().data))

    def answers(model: str) -> list[str]:
        return [acme.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in PROMPTS]

    with_lora, plain = answers(adapter.name), answers("tiny-chat")
    assert with_lora != plain

    dedicated = BackendPool.objects.create(name="acme-vllm", base_model=base, kind="vllm", dedicated_tenant=world.tenant)
    merged = merge.merged_model_request(tenant=world.tenant, adapter=adapter, actor=Actor(user=world.admin))
    merged.refresh_from_db()
    assert merged.state == "ready", merged.error
    server = VLLMServer(Path(merged.path), adapter.name, tmp_path / "merged-vllm.log")
    try:
        server.start()
        assert served_models(server.url) == [adapter.name]  # the merged weights are the server's model, no LoRA
        Backend.objects.create(pool=dedicated, url=server.url, max_concurrency=8)
        merge.merged_model_serve(merged=MergedModel.objects.for_tenant(world.tenant).select_related("adapter", "pool", "tenant")
                                 .get(pk=merged.pk), actor=SYSTEM)
        assert wait_for(lambda: gw.app.store.snapshot.tenants[world.tenant.pk].models[adapter.name].pool_id == dedicated.pk,
                        timeout=10)
        count = len(PROMPTS) * 2
        assert wait_for(lambda: len(usage_records(world.tenant)) == count)
        assert answers(adapter.name) == with_lora
        assert wait_for(lambda: len(usage_records(world.tenant)) == count + len(PROMPTS))
        assert {(r.pool_id, r.adapter, r.status) for r in usage_records(world.tenant)[-len(PROMPTS):]} == {
            (dedicated.pk, adapter.name, "ok")}
    finally:
        server.stop()
        deploy.adapter_undeploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    assert adapter.name not in served_models(vllm.url)
