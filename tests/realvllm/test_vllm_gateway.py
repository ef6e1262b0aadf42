"""The platform's gateway against a real vLLM server (tests/realvllm/conftest.py): what a tenant gets, compared with what
vLLM itself answers for the same request; TGI's routes translated; bad input; the context rules; per-tenant cache
salt on the wire; adapters deployed at run time, forgotten, refused."""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
from openai import BadRequestError, NotFoundError, OpenAI

from finetune import deploy
from serving.config import tenant_cache_salt
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel, UsageRecord
from tenants.services import SYSTEM
from tests.realvllm.proxy import RecordingProxy
from tests.realvllm.server import get_json, post_json, served_models
from tests.support.gateway import post, wait_for

MESSAGES = [{"role": "user", "content": "Hello! How are you today?"}]
PROMPT = "the cat sees"


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _client(gw, key: str) -> OpenAI:
    return OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


def _direct(vllm) -> OpenAI:
    return OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0)


def _records(tenant, n: int):
    records = UsageRecord.objects.for_tenant(tenant).order_by("created_at", "id")
    assert wait_for(lambda: records.count() >= n), list(records.values_list("status", flat=True))
    return list(records)


def _deploy(world, platform, path, name: str = "ft:tiny-chat:acme:rand:1", rank: int = 4) -> Adapter:
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name=name, base_model=platform["base"], path=str(path), rank=rank)
    deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    return adapter


def test_chat_and_completions_answer_as_vllm_does_streamed_or_not_with_its_usage(world, platform):
    vllm, gw = platform["vllm"], platform["start"]()
    client, direct = _client(gw, platform["keys"]["acme"]), _direct(vllm)

    answer = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0)
    mine = direct.chat.completions.create(model=vllm.model, messages=MESSAGES, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == mine.choices[0].message.content
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (mine.usage.prompt_tokens, mine.usage.completion_tokens)
    assert answer.model == "tiny-chat" and answer.id.startswith("chatcmpl-") and vllm.model not in answer.id

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.model_dump() == answer.usage.model_dump()

    completion = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=6, temperature=0)
    theirs = direct.completions.create(model=vllm.model, prompt=PROMPT, max_tokens=6, temperature=0)
    assert completion.choices[0].text == theirs.choices[0].text and completion.usage.model_dump() == theirs.usage.model_dump()
    streamed = list(client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == theirs.choices[0].text
    assert streamed[-1].usage.completion_tokens == 6

    records = _records(world.tenant, 4)
    assert [(r.status, r.input_tokens, r.output_tokens) for r in records] == [
        ("ok", mine.usage.prompt_tokens, 8), ("ok", mine.usage.prompt_tokens, 8), ("ok", theirs.usage.prompt_tokens, 6),
        ("ok", theirs.usage.prompt_tokens, 6)]


def test_tgi_routes_are_translated_with_vllms_own_token_ids_and_logprobs(world, platform, hub_client_for_local_servers):
    from huggingface_hub import InferenceClient

    vllm, gw = platform["vllm"], platform["start"]()
    auth = _auth(platform["keys"]["acme"])
    status, body = post_json(vllm.url + "/v1/completions", {"model": vllm.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                                             "logprobs": 0, "return_token_ids": True})
    assert status == 200, body
    choice = json.loads(body)["choices"][0]
    ids, logprobs = choice["token_ids"], choice["logprobs"]["token_logprobs"]

    r = post(f"{gw.url}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "details": True}}, auth)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["generated_text"] == choice["text"]
    details = answer["details"]
    assert [t["id"] for t in details["tokens"]] == ids and all(t["id"] for t in details["tokens"])  # never made-up zeros
    assert all(math.isclose(t["logprob"], lp, abs_tol=1e-3) for t, lp in zip(details["tokens"], logprobs))
    assert (details["generated_tokens"], details["finish_reason"], details["seed"]) == (5, "length", None)  # greedy: no seed

    with requests.post(f"{gw.url}/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}, headers=auth,
                       stream=True, timeout=60) as streamed:
        events = [json.loads(line[5:]) for line in streamed.iter_lines(decode_unicode=True) if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == ids and events[-1]["generated_text"] == choice["text"]
    assert all(e["details"] is None for e in events)  # no details asked for

    client = InferenceClient(base_url=gw.url, token=platform["keys"]["acme"])
    sampled = client.text_generation(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.0, seed=7, details=True)
    again = client.text_generation(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.0, seed=7, details=True)
    assert sampled.details.seed == 7 and sampled.generated_text == again.generated_text
    unseeded = client.text_generation(PROMPT, max_new_tokens=3, do_sample=True, details=True)
    assert isinstance(unseeded.details.seed, int)  # the seed it really sampled with (the gateway drew it)


def test_sampling_and_stop_sequences_reach_vllm(world, platform):
    vllm, gw = platform["vllm"], platform["start"]()
    client, direct = _client(gw, platform["keys"]["acme"]), _direct(vllm)
    seeded = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7)
    ours = client.completions.create(model="tiny-chat", **seeded).choices[0].text
    assert ours == client.completions.create(model="tiny-chat", **seeded).choices[0].text
    assert ours == direct.completions.create(model=vllm.model, **seeded).choices[0].text  # the same sampling, field by field

    greedy = direct.completions.create(model=vllm.model, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = greedy[2:4]
    assert stop, f"the greedy answer {greedy!r} is too short to pick a stop sequence from"
    stopped = client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[: greedy.find(stop)] and stopped.choices[0].finish_reason == "stop"
    r = post(f"{gw.url}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "stop": [stop], "details": True}},
             _auth(platform["keys"]["acme"]))
    assert r.json()["details"]["finish_reason"] == "stop_sequence", r.text


@pytest.mark.parametrize("extra, param, code", [
    ({"temperature": 3}, "temperature", "invalid_value"),
    ({"top_p": 1.5}, "top_p", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"n": 2}, "n", None),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
])
def test_bad_parameters_are_refused_in_openais_shape_before_vllm(world, platform, extra, param, code):
    proxy = RecordingProxy(platform["vllm"].url)
    try:
        Backend.objects.filter(pk=platform["backend"].pk).update(url=proxy.url)
        gw = platform["start"]()
        with pytest.raises(BadRequestError) as refused:
            _client(gw, platform["keys"]["acme"]).chat.completions.create(model="tiny-chat", messages=MESSAGES,
                                                                           **{"max_tokens": 4, **extra})
        error = refused.value.body
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert code is None or error["code"] == code
        assert proxy.bodies("/v1/chat/completions") == []  # refused by the platform, in its words, not vLLM's
    finally:
        proxy.stop()


def test_an_unknown_model_is_a_404_in_openais_shape(world, platform):
    gw = platform["start"]()
    with pytest.raises(NotFoundError) as missing:
        _client(gw, platform["keys"]["acme"]).chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


def test_prompt_and_max_tokens_beyond_the_context_are_a_400_with_vllms_exact_figures(world, platform, model_path):
    """vLLM 0.32 itself shortens max_tokens here and answers 200 (finish_reason length): the platform refuses, as OpenAI does."""
    vllm, gw = platform["vllm"], platform["start"]()
    client, direct = _client(gw, platform["keys"]["acme"]), _direct(vllm)
    context = vllm.context_length
    prompt_tokens = direct.completions.create(model=vllm.model, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    asked = context - prompt_tokens + 1
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=asked)
    error = refused.value.body
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert error["message"] == (f"This model's maximum context length is {context} tokens. However, your prompt resulted in "
                                f"{context + 1} tokens ({prompt_tokens} in the prompt, {asked} in the completion). Please reduce "
                                "the length of the prompt or completion.")
    assert client.completions.create(model="tiny-chat", prompt=PROMPT, max_tokens=asked - 1).usage.completion_tokens >= 1  # it fits

    chat_tokens = direct.chat.completions.create(model=vllm.model, messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=context - chat_tokens + 1)
    assert f"({chat_tokens} in the messages, {context - chat_tokens + 1} in the completion)" in refused.value.body["message"]

    r = post(f"{gw.url}/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": asked}}, _auth(platform["keys"]["acme"]))
    assert r.status_code == 400 and r.json()["error_type"] == "validation"
    assert f"({prompt_tokens} in the inputs, {asked} in `max_new_tokens`)" in r.json()["error"]


def test_a_prompt_alone_beyond_the_context_is_told_exactly_or_as_a_bound_never_vllms_at_least_as_exact(world, platform, model_path):
    from tokenizers import Tokenizer

    vllm, gw = platform["vllm"], platform["start"]()
    client = _client(gw, platform["keys"]["acme"])
    long_prompt = "cat " * (vllm.context_length + 100)
    exact = len(Tokenizer.from_file(str(model_path / "tokenizer.json")).encode(long_prompt).ids)
    short = _direct(vllm).completions.create(model=vllm.model, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    assert short == len(Tokenizer.from_file(str(model_path / "tokenizer.json")).encode(PROMPT).ids)  # counted as vLLM counts
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="tiny-chat", prompt=long_prompt, max_tokens=5)
    assert f"({exact} in the prompt, 5 in the completion)" in refused.value.body["message"]  # the gateway's exact count

    # Without the model's files the gateway only bounds the count; vLLM refuses and counts "at least" up to its limit.
    BaseModel.objects.filter(pk=platform["base"].pk).update(local_path="")
    bounded = platform["start"]()
    with pytest.raises(BadRequestError) as refused:
        _client(bounded, platform["keys"]["acme"]).completions.create(model="tiny-chat", prompt=long_prompt, max_tokens=5)
    error = refused.value.body
    assert error["code"] == "context_length_exceeded" and "resulted in at least " in error["message"], error
    assert "input_tokens" not in error["message"] and "(parameter=" not in error["message"]  # not vLLM's wording


def test_the_cache_salt_on_the_wire_is_each_tenants_own_and_vllm_takes_it(world, platform):
    proxy = RecordingProxy(platform["vllm"].url)
    try:
        Backend.objects.filter(pk=platform["backend"].pk).update(url=proxy.url)
        gw = platform["start"]()
        for slug in ("acme", "globex", "acme"):
            r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2,
                                                       "cache_salt": "chosen-by-the-client"}, _auth(platform["keys"][slug]))
            assert r.status_code == 200, r.text
        r = post(f"{gw.url}/v1/completions", {"model": "tiny-chat", "prompt": PROMPT, "max_tokens": 2}, _auth(platform["keys"]["globex"]))
        assert r.status_code == 200, r.text
        sent = [(path, body.get("cache_salt"), status) for path, body, status in proxy.requests if path.startswith("/v1/")
                and path != "/v1/models"]
        acme, globex = tenant_cache_salt(world.tenant.pk), tenant_cache_salt(world.other_tenant.pk)
        assert acme != globex
        assert sent == [("/v1/chat/completions", acme, 200), ("/v1/chat/completions", globex, 200),
                        ("/v1/chat/completions", acme, 200), ("/v1/completions", globex, 200)]  # vLLM accepted each
    finally:
        proxy.stop()


def test_a_deployed_adapter_is_served_to_its_tenant_only_and_undeployed(world, platform, random_adapter):
    vllm, gw = platform["vllm"], platform["start"]()
    adapter = _deploy(world, platform, random_adapter[4])
    assert AdapterDeployment.all_tenants.get(adapter=adapter).state == "active"
    assert adapter.name in served_models(vllm.url)  # loaded at run time: POST /v1/load_lora_adapter
    acme, globex = _client(gw, platform["keys"]["acme"]), _client(gw, platform["keys"]["globex"])
    assert wait_for(lambda: post(f"{gw.url}/v1/models", None, _auth(platform["keys"]["acme"]), method="GET").text.count(adapter.name))
    tuned = acme.completions.create(model=adapter.name, prompt=PROMPT, max_tokens=8, temperature=0)
    theirs = _direct(vllm).completions.create(model=adapter.name, prompt=PROMPT, max_tokens=8, temperature=0)
    base = _direct(vllm).completions.create(model=vllm.model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert tuned.choices[0].text == theirs.choices[0].text != base.choices[0].text and tuned.model == adapter.name

    with pytest.raises(NotFoundError) as foreign:
        globex.completions.create(model=adapter.name, prompt=PROMPT, max_tokens=4)
    assert foreign.value.body["code"] == "model_not_found"

    deploy.adapter_undeploy(tenant=world.tenant, adapter=adapter, actor=SYSTEM)
    assert adapter.name not in served_models(vllm.url)
    assert wait_for(lambda: post(f"{gw.url}/v1/completions", {"model": adapter.name, "prompt": PROMPT, "max_tokens": 2},
                                 _auth(platform["keys"]["acme"])).status_code == 404, timeout=5)


def test_an_adapter_vllm_forgot_is_a_503_then_reloaded_within_seconds_and_nothing_is_charged(world, platform, random_adapter):
    vllm = platform["vllm"]
    adapter = _deploy(world, platform, random_adapter[4])
    gw = platform["start"](health_interval_s=30)  # no health round in between: the request is the first to find out
    assert post_json(vllm.url + "/v1/unload_lora_adapter", {"lora_name": adapter.name})[0] == 200  # as a restart forgets it

    r = post(f"{gw.url}/v1/chat/completions", {"model": adapter.name, "messages": MESSAGES, "max_tokens": 4}, _auth(platform["keys"]["acme"]))
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "adapter_not_loaded")
    assert "does not exist" not in error["message"] and vllm.model not in error["message"]  # neither vLLM's words nor its ids
    began = time.monotonic()
    assert wait_for(lambda: adapter.name in served_models(vllm.url), timeout=10)  # reloaded off the request path
    again = post(f"{gw.url}/v1/chat/completions", {"model": adapter.name, "messages": MESSAGES, "max_tokens": 4},
                 _auth(platform["keys"]["acme"]))
    assert again.status_code == 200 and time.monotonic() - began < 10, again.text
    refused = _records(world.tenant, 2)[0]
    assert (refused.status, refused.input_tokens, refused.output_tokens) == ("error", 0, 0)


def test_an_adapter_vllm_refuses_fails_once_with_the_reason_and_is_not_asked_again(world, platform, random_adapter):
    from finetune.tasks import reconcile_adapters

    vllm = platform["vllm"]
    proxy = RecordingProxy(vllm.url)  # counts the load requests vLLM gets
    try:
        Backend.objects.filter(pk=platform["backend"].pk).update(url=proxy.url)
        # Declared as staff may get it wrong: the pool says 64, the server was started with --max-lora-rank 16.
        BackendPool.objects.filter(pk=platform["pool"].pk).update(max_lora_rank=64)
        platform["start"](health_interval_s=0.2)
        adapter = _deploy(world, platform, random_adapter[32], name="ft:tiny-chat:acme:big:2", rank=32)
        deployment = AdapterDeployment.all_tenants.get(adapter=adapter)
        assert deployment.state == "failed" and "No backend of the vllm-tiny pool could load" in deployment.error
        assert "max_lora_rank 16" in deployment.error_detail and proxy.url not in deployment.error  # staff's detail, the tenant's words
        loads = proxy.bodies("/v1/load_lora_adapter")
        assert [(b["lora_name"], status) for p, b, status in proxy.requests if p == "/v1/load_lora_adapter"] == [(adapter.name, 500)]
        reconcile_adapters(), reconcile_adapters()  # beat, minute after minute
        time.sleep(2)  # gateway health rounds
        assert proxy.bodies("/v1/load_lora_adapter") == loads  # asked once, not every minute

        # Declared right, the platform does not even ask: the reason is the rank.
        BackendPool.objects.filter(pk=platform["pool"].pk).update(max_lora_rank=16)
        other = _deploy(world, platform, random_adapter[32], name="ft:tiny-chat:acme:big:3", rank=32)
        assert AdapterDeployment.all_tenants.get(adapter=other).error.startswith("Rank 32 is above the highest LoRA rank")
        assert proxy.bodies("/v1/load_lora_adapter") == loads
        assert get_json(vllm.url + "/health")[0] == 200  # and the server is none the worse for it
    finally:
        proxy.stop()


ADVERSARIAL = {
    "emoji": [{"role": "user", "content": "😀🎉🚀👩‍👩‍👧‍👦🏳️‍🌈 42 " * 12}],
    "cjk": [{"role": "user", "content": "東京の天気はどうですか？北京今天下雨吗？서울 날씨 " * 8}],
    "code": [{"role": "user", "content": "def f(x):\n    return {k: [v ** 2 for v in x[k]] for k in x if k != '\\t'}\n" * 6}],
    "many messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: {'ok ' * (i % 5)}"} for i in range(41)],
    "tool calls": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 °C, sunny ☀️"},
    ],
}


@pytest.mark.parametrize("case", list(ADVERSARIAL))
def test_admission_reserves_exactly_the_prompt_real_vllm_counts(world, platform, model_path, case):
    # The reservation (x-quota-used-tokens at admission, nothing used before) is the gateway's own count of the prompt,
    # system prompt injected, plus max_tokens: it must equal what vLLM itself counts, for input that takes several tokens
    # a character.
    from tenants import services

    services.system_prompt_save(tenant=world.tenant, text="You are a helpful pirate. Répondez en français. 🦜", note="", actor=SYSTEM)
    services.policy_update(tenant=world.tenant, actor=SYSTEM, quota_tokens=10**9, quota_mode="hard")
    gw = platform["start"]()
    r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": ADVERSARIAL[case], "max_tokens": 4, "temperature": 0},
             _auth(platform["keys"]["acme"]))
    assert r.status_code == 200, r.text
    reserved = int(r.headers["x-quota-used-tokens"]) - 4
    assert reserved == r.json()["usage"]["prompt_tokens"], (case, reserved, r.json()["usage"])
    assert _records(world.tenant, 1)[0].input_tokens == reserved
