"""The gateway against vLLM as it really answers (a scripted stand-in, tests/support/vllm_fake.py; the same against real
vLLM in tests/realvllm): adapters a restarted backend forgot, TGI token details from vLLM's own figures, backends'
words kept from tenants, metrics of the backends in rotation only."""

from __future__ import annotations

import pytest

from serving.drivers.base import ContextOverflow, context_overflow
from serving.gateway.errors import context_length_exceeded
from serving.models import Adapter, AdapterDeployment, Backend, UsageRecord
from tenants import services
from tests.support.gateway import make_base_model, make_key, make_pool, post, wait_for
from tests.support.vllm_fake import TOKEN_ID, TOKEN_LOGPROB, FakeVLLM

ADAPTER = "ft:tiny-chat:acme:a:1"


@pytest.fixture
def fakes():
    started = []

    def start() -> FakeVLLM:
        started.append(FakeVLLM())
        return started[-1]

    yield start
    for fake in started:
        fake.stop()


def _platform(world, fakes, n: int = 1):
    """A vLLM pool of `n` scripted backends, each holding the tenant's adapter (deployed, active): (fakes, pool, key)."""
    backends = [fakes() for _ in range(n)]
    base = make_base_model()
    pool = make_pool("vllm", base, [b.url for b in backends], kind="vllm", adapters=[ADAPTER])
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name=ADAPTER, base_model=base, path="/adapters/a", rank=8)
    AdapterDeployment.all_tenants.create(tenant=world.tenant, adapter=adapter, pool=pool, state="active")
    for fake in backends:
        fake.loaded[ADAPTER] = "/adapters/a"
    return backends, pool, make_key(world.tenant)[1]


def _chat(gw, key, model=ADAPTER, **extra):
    return post(f"{gw.url}/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra},
                {"authorization": f"Bearer {key}"})


def test_a_forgotten_adapter_is_a_503_with_retry_after_nothing_charged_then_reloaded_within_seconds(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=100_000, quota_mode="hard")
    gw = gateway_factory(health_interval_s=30)  # no health round in between: the request finds out
    fake.forget()  # vLLM restarted: its runtime-loaded adapters are gone

    r = _chat(gw, key)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "adapter_not_loaded") and r.headers["retry-after"] == "3"
    assert "does not exist" not in error["message"] and "platform/tiny-chat" not in error["message"]  # not vLLM's words or ids
    assert wait_for(lambda: ADAPTER in fake.loaded, timeout=5)  # reloaded off the request path, at once
    assert fake.loads[ADAPTER] == 1

    again = _chat(gw, key)
    assert again.status_code == 200, again.text
    assert again.headers["x-quota-used-tokens"] == r.headers["x-quota-used-tokens"]  # the 503 counted nothing
    records = UsageRecord.objects.for_tenant(world.tenant).order_by("created_at", "id")
    assert wait_for(lambda: records.count() == 2)
    refused = records.first()
    assert (refused.status, refused.input_tokens, refused.output_tokens) == ("error", 0, 0)


def test_another_backend_of_the_pool_serves_an_adapter_one_backend_forgot(world, fakes, gateway_factory):
    (first, second), pool, key = _platform(world, fakes, n=2)
    gw = gateway_factory(health_interval_s=30)
    first.forget()
    r = _chat(gw, key)
    assert r.status_code == 200, r.text  # failed over before the first byte
    # The forgetful backend was tried first and refused, or was already known to lack it; the other one answered.
    assert [b["model"] for b in first.bodies] in ([], [ADAPTER]) and [b["model"] for b in second.bodies] == [ADAPTER]
    assert wait_for(lambda: ADAPTER in first.loaded, timeout=5)


def test_the_health_round_notices_a_restart_and_reloads_before_any_request(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    gateway_factory(health_interval_s=0.2)
    assert wait_for(lambda: fake.loads[ADAPTER] == 0 and fake.bodies == [], timeout=1)
    fake.forget()
    assert wait_for(lambda: ADAPTER in fake.loaded, timeout=5)
    assert fake.loads[ADAPTER] == 1 and fake.bodies == []


def test_an_adapter_a_restarted_backend_refuses_is_recorded_not_retried_every_round(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    gateway_factory(health_interval_s=0.2)
    fake.refuse[ADAPTER] = (500, "LoRA rank 8 is greater than max_lora_rank 4.")  # restarted with other settings
    fake.forget()
    backend = Backend.objects.get(pool=pool)
    assert wait_for(lambda: AdapterDeployment.all_tenants.get(adapter__name=ADAPTER).failed_on == [backend.pk], timeout=5)
    deployment = AdapterDeployment.all_tenants.get(adapter__name=ADAPTER)
    assert deployment.state == "failed" and "max_lora_rank" in deployment.error_detail
    assert wait_for(lambda: Backend.objects.get(pk=backend.pk).loaded_adapters == [], timeout=5)
    import time

    time.sleep(1.5)  # several health rounds
    assert fake.loads[ADAPTER] == 1


def test_tgi_details_on_a_vllm_pool_are_vllms_own_token_ids_logprobs_and_seed(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    gw = gateway_factory()
    auth = {"authorization": f"Bearer {key}"}
    r = post(f"{gw.url}/generate", {"inputs": "the cat", "parameters": {"max_new_tokens": 3, "details": True}}, auth)
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    assert [(t["id"], t["text"], t["logprob"], t["special"]) for t in details["tokens"]] == [(TOKEN_ID, "es", TOKEN_LOGPROB, False)] * 3
    assert details["seed"] is None  # greedy: no seed, as TGI says
    assert fake.bodies[-1]["logprobs"] == 0 and fake.bodies[-1]["return_token_ids"] is True

    sampled = post(f"{gw.url}/generate", {"inputs": "the cat", "parameters": {"max_new_tokens": 2, "details": True, "do_sample": True}}, auth)
    assert sampled.json()["details"]["seed"] == fake.bodies[-1]["seed"]  # the seed it sampled with, drawn by the gateway
    seeded = post(f"{gw.url}/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "details": True, "do_sample": True,
                                                                      "seed": 2**64 - 1}}, auth)
    assert seeded.json()["details"]["seed"] == 2**64 - 1 and fake.bodies[-1]["seed"] == -1  # TGI's u64, vLLM's i64

    import json

    import requests

    with requests.post(f"{gw.url}/generate_stream", json={"inputs": "the cat", "parameters": {"max_new_tokens": 3}}, headers=auth,
                       stream=True, timeout=30) as streamed:
        events = [json.loads(line[5:]) for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == [TOKEN_ID] * 3 and {e["token"]["logprob"] for e in events} == {TOKEN_LOGPROB}
    assert events[-1]["generated_text"] == "eseses"


def test_a_stop_sequence_is_tgis_stop_sequence_and_its_cut_token_not_special(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    gw = gateway_factory()
    r = post(f"{gw.url}/generate", {"inputs": "the cat", "parameters": {"max_new_tokens": 5, "stop": ["xyz"], "details": True}},
             {"authorization": f"Bearer {key}"})
    details = r.json()["details"]
    assert details["finish_reason"] == "stop_sequence" and r.json()["generated_text"] == "es"
    assert [t["special"] for t in details["tokens"]] == [False, False]  # the last one's text was cut by the stop, not special


def test_special_tokens_are_told_by_the_models_tokenizer(world, fakes, gateway_factory, tiny_model_path):
    from serving.models import BaseModel

    (fake,), pool, key = _platform(world, fakes)
    fake.hold_first_text = True  # an empty chunk text that is not a special token
    BaseModel.objects.filter(pk=pool.base_model_id).update(local_path=str(tiny_model_path))
    gw = gateway_factory()
    r = post(f"{gw.url}/generate", {"inputs": "the cat", "parameters": {"max_new_tokens": 3, "details": True}},
             {"authorization": f"Bearer {key}"})
    assert r.json()["generated_text"] == "eseses"
    assert [t["special"] for t in r.json()["details"]["tokens"]] == [False, False, False]  # 268 is "es" in the tiny model


def test_a_backend_without_token_ids_gets_a_clear_error_not_made_up_tokens(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    fake.token_details = False  # a vLLM older than 0.10.2 ignores `return_token_ids`
    gw = gateway_factory()
    r = post(f"{gw.url}/generate", {"inputs": "the cat", "parameters": {"max_new_tokens": 3, "details": True}},
             {"authorization": f"Bearer {key}"})
    assert r.status_code == 502 and '"id": 0' not in r.text and "details" not in r.json()


def test_a_backend_failure_is_told_in_the_platforms_words(world, fakes, gateway_factory):
    (fake,), pool, key = _platform(world, fakes)
    fake.fail = (500, "EngineCore at http://10.1.2.3:8000 died: model platform/tiny-chat")
    gw = gateway_factory()
    r = _chat(gw, key, model="tiny-chat")
    assert r.status_code == 502
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "backend_error")
    assert "10.1.2.3" not in error["message"] and "platform/tiny-chat" not in error["message"] and "500" in error["message"]
    [record] = wait_for(lambda: UsageRecord.objects.for_tenant(world.tenant).all() or None)
    assert (record.status, record.input_tokens, record.output_tokens) == ("error", 0, 0)  # a failed answer is not billed


def test_metrics_report_only_the_backends_in_rotation(world, fakes, gateway_factory):
    (first, second), pool, key = _platform(world, fakes, n=2)
    gw = gateway_factory()

    def healthy_series() -> list[str]:
        text = post(f"{gw.url}/metrics", None, method="GET").text
        return [line for line in text.splitlines() if line.startswith("gateway_backend_healthy{")]

    assert len(healthy_series()) == 2
    disabled = Backend.objects.get(url=second.url)
    disabled.enabled = False
    disabled.save()
    assert wait_for(lambda: len(healthy_series()) == 1, timeout=5), healthy_series()
    assert first.url in healthy_series()[0]


@pytest.mark.parametrize("message", [
    # vLLM 0.32 on a prompt beyond the context: it stopped counting at the limit
    "This model's maximum context length is 1024 tokens. However, your prompt contains at least 1025 input tokens, which exceeds "
    "this limit even without any output tokens. Please reduce the length of the input prompt. (parameter=input_tokens, value=1025)",
])
def test_vllms_at_least_count_is_never_told_as_an_exact_one(message):
    overflow = context_overflow(message)
    assert overflow == ContextOverflow(1024, 1025, None, input_at_least=True)
    err = context_length_exceeded("completions", overflow, max_tokens=5)
    assert err.message == ("This model's maximum context length is 1024 tokens. However, your prompt resulted in at least 1025 "
                           "tokens. Please reduce the length of the prompt.")
    exact = context_overflow("This model's maximum context length is 4096 tokens. However, your request has 4100 input tokens.")
    assert not exact.input_at_least


@pytest.mark.slow
def test_tgi_details_on_a_vllm_pool_of_dev_backends_are_the_models_own_tokens(world, gateway_factory, tiny_model_path):
    # The dev backend's vllm flavor answers `logprobs` + `return_token_ids` as vLLM does; it answered neither, so TGI's
    # /generate with details on a vllm-kind pool of dev backends was a 502 ("no token ids").
    from devbackend.config import BackendConfig
    from devbackend.runner import run_in_thread
    from tests.support.devbackend import greedy_ids

    vllm_url, stop_vllm = run_in_thread(BackendConfig(model=str(tiny_model_path), flavor="vllm", port=0))
    tgi_url, stop_tgi = run_in_thread(BackendConfig(model=str(tiny_model_path), flavor="tgi", port=0))
    try:
        make_pool("vllm", make_base_model(local_path=str(tiny_model_path)), [vllm_url], kind="vllm")
        key = make_key(world.tenant)[1]
        gw = gateway_factory()
        body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 8, "do_sample": False, "details": True}}
        r = post(f"{gw.url}/generate", body, {"authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        tokens = r.json()["details"]["tokens"]
        assert [t["id"] for t in tokens] == greedy_ids(tgi_url, "Hello there")  # the same model's greedy tokens
        assert all(t["logprob"] < 0 for t in tokens) and r.json()["details"]["generated_tokens"] == len(tokens)
    finally:
        stop_vllm()
        stop_tgi()
