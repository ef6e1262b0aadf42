"""The session's vLLM server killed in the middle of an answer, then started again (last in the module: a restart
takes a minute or more on a CPU). Skipped against a user's own vLLM (PLATFORM_TEST_VLLM_URL)."""

from __future__ import annotations

import json
import time

import requests

from finetune import deploy
from serving.models import Adapter, UsageRecord
from tenants.services import SYSTEM
from tests.realvllm.server import served_models
from tests.support.gateway import post, wait_for

PROMPT = "the cat sees"


def test_killed_mid_stream_then_restarted_health_and_adapters_back_within_seconds(world, platform, own_server, random_adapter):
    vllm, key = platform["vllm"], platform["keys"]["acme"]
    auth = {"authorization": f"Bearer {key}"}
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme:rand:9", base_model=platform["base"],
                                         path=str(random_adapter[4]), rank=4)
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    gw = platform["start"](health_interval_s=0.5)

    # Killed mid-stream: the client gets a clean in-band error, the ledger what was delivered.
    asked = vllm.context_length - 16  # far more than a fast machine generates before the kill lands
    body = {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": asked, "temperature": 0, "stream": True}
    events = []
    with requests.post(f"{gw.url}/v1/completions", json=body, headers=auth, stream=True, timeout=120) as streamed:
        assert streamed.status_code == 200  # the gateway starts answering with the first token: the answer is under way
        own_server.kill()  # SIGKILL to the server and its engine processes at once
        events = [line[6:] for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events and events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "backend_interrupted")
    assert vllm.url not in error["message"]
    delivered = sum(1 for e in events[:-1] if json.loads(e)["choices"][0]["text"])
    records = UsageRecord.objects.for_tenant(world.tenant)
    assert wait_for(lambda: records.filter(status="interrupted").exists())
    record = records.get(status="interrupted")
    assert record.output_tokens == delivered and 1 <= delivered < asked

    # Down: refused at once, not hung.
    r = post(f"{gw.url}/v1/completions", {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 2}, auth)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_backend", r.text

    # Restarted (same address): health and the runtime-loaded adapter back within seconds of vLLM answering.
    own_server.start()
    ready = time.monotonic()

    def serves(model: str) -> bool:
        return post(f"{gw.url}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2}, auth).status_code == 200

    assert wait_for(lambda: serves("tiny-chat"), timeout=30)
    assert wait_for(lambda: serves(adapter.name), timeout=30)
    back = time.monotonic() - ready
    assert adapter.name in served_models(vllm.url)  # reloaded by the gateway's health monitor, not a minute's beat
    assert back < 10, f"the adapter answered {back:.1f} s after vLLM was up again"
    print(f"\nreal vLLM restart: base model and adapter answered {back:.1f} s after vLLM was up again")
