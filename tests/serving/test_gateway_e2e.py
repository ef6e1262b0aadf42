"""End to end on the real tiny model: official SDKs, per-tenant adapters, isolation, the system prompt."""

from __future__ import annotations

import time

import pytest
from openai import OpenAI

from tenants import services
from tests.support.users import make_user
from tests.support.gateway import (
    ADAPTER_A,
    ADAPTER_B,
    deploy_adapter,
    dev_stats,
    http_json,
    make_base_model,
    make_key,
    make_pool,
    post,
    sim_backend,
    tiny_backend,
    usage_records,
    wait_for,
)

pytestmark = pytest.mark.slow
GREEDY = {"do_sample": False, "max_new_tokens": 8}


@pytest.fixture
def platform(world, gateway_factory):
    tiny = tiny_backend()
    base = make_base_model()
    pool = make_pool("shared-tiny", base, [tiny["url"]], adapters=[ADAPTER_A, ADAPTER_B])
    deploy_adapter(world.tenant, ADAPTER_A, base, pool)
    deploy_adapter(world.other_tenant, ADAPTER_B, base, pool)
    keys = {"acme": make_key(world.tenant)[1], "globex": make_key(world.other_tenant)[1]}
    return {"tiny": tiny, "base": base, "pool": pool, "keys": keys, "start": gateway_factory}


def _direct(url: str, prompt: str, adapter: str | None) -> str:
    params = dict(GREEDY, **({"adapter_id": adapter} if adapter else {}))
    status, body = http_json("POST", url + "/generate", {"inputs": prompt, "parameters": params})
    assert status == 200, body
    return body["generated_text"]


def test_openai_sdk_chat_completions_and_models(platform):
    gw = platform["start"]()
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"]["acme"], max_retries=0)
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]

    answer = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0)
    assert answer.object == "chat.completion" and answer.model == "tiny-chat"
    assert answer.usage.completion_tokens == len(answer.choices[0].message.content) or answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens and chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") and c.model == "tiny-chat" for c in chunks)

    completion = client.completions.create(model="tiny-chat", prompt="the cat sees", max_tokens=5, temperature=0)
    assert completion.object == "text_completion" and completion.usage.completion_tokens > 0

    streamed = list(client.completions.create(model=ADAPTER_A, prompt="the cat sees", max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == _direct(platform["tiny"]["url"], "the cat sees", ADAPTER_A)[: len("".join(c.choices[0].text for c in streamed if c.choices))]

    assert sorted(m.id for m in client.models.list().data) == sorted(["tiny-chat", ADAPTER_A])
    assert wait_for(lambda: len(usage_records(services.Tenant.objects.get(slug="acme"))) == 4)


def test_huggingface_inference_client_text_generation(platform, hub_client_for_local_servers):
    from huggingface_hub import InferenceClient

    gw = platform["start"]()
    client = InferenceClient(model=gw.url, token=platform["keys"]["acme"])
    expected = _direct(platform["tiny"]["url"], "the cat sees", None)

    out = client.text_generation("the cat sees", max_new_tokens=8, do_sample=False, details=True)
    assert out.generated_text == expected
    assert out.details.generated_tokens > 0 and out.details.finish_reason in ("length", "eos_token")

    plain = client.text_generation("the cat sees", max_new_tokens=8, do_sample=False)
    assert plain == expected

    events = list(client.text_generation("the cat sees", max_new_tokens=8, do_sample=False, stream=True, details=True))
    assert "".join(e.token.text for e in events if not e.token.special) == expected
    assert events[-1].generated_text == expected and events[-1].details.generated_tokens == out.details.generated_tokens

    tokens = list(client.text_generation("the cat sees", max_new_tokens=8, do_sample=False, stream=True))
    assert "".join(tokens) == expected

    adapted = client.text_generation("the cat sees", max_new_tokens=8, do_sample=False, adapter_id=ADAPTER_A)
    assert adapted == _direct(platform["tiny"]["url"], "the cat sees", ADAPTER_A)


def test_each_tenant_gets_its_own_adapter_and_outsiders_get_404(world, platform):
    gw = platform["start"]()
    url = platform["tiny"]["url"]
    prompt = "the teacher reads"
    outs = {name: _direct(url, prompt, name) for name in (None, ADAPTER_A, ADAPTER_B)}
    assert len(set(outs.values())) == 3, "the two adapters and the base must differ for this test to mean anything"

    for tenant, adapter in (("acme", ADAPTER_A), ("globex", ADAPTER_B)):
        r = post(gw.url + "/generate", {"inputs": prompt, "parameters": {**GREEDY, "adapter_id": adapter}},
                 {"authorization": f"Bearer {platform['keys'][tenant]}"})
        assert r.status_code == 200 and r.json()["generated_text"] == outs[adapter]
        client = OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"][tenant], max_retries=0)
        assert client.completions.create(model=adapter, prompt=prompt, max_tokens=8, temperature=0).choices[0].text == outs[adapter]

    third = services.tenant_create(slug="initech", name="Initech", owner=make_user("boss@initech.test"))
    _, third_key = make_key(third)
    before = dev_stats(url)["requests_started"]
    time.sleep(0.3)
    for adapter in (ADAPTER_A, ADAPTER_B):
        r = post(gw.url + "/v1/completions", {"model": adapter, "prompt": prompt}, {"authorization": f"Bearer {third_key}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = post(gw.url + "/generate", {"inputs": prompt, "parameters": {"adapter_id": adapter}}, {"authorization": f"Bearer {third_key}"})
        assert r.status_code == 404
    # globex cannot use acme's adapter either
    r = post(gw.url + "/v1/completions", {"model": ADAPTER_A, "prompt": prompt}, {"authorization": f"Bearer {platform['keys']['globex']}"})
    assert r.status_code == 404
    assert dev_stats(url)["requests_started"] == before


def test_isolated_tenant_reaches_only_its_dedicated_pool(world, platform):
    dedicated_url, stop = sim_backend()
    try:
        isolated = services.tenant_create(slug="initech", name="Initech", owner=make_user("boss@initech.test"), tenancy="isolated")
        make_pool("initech-dedicated", platform["base"], [dedicated_url], dedicated=isolated)
        _, key = make_key(isolated)
        gw = platform["start"]()
        shared_before = dev_stats(platform["tiny"]["url"])["requests_started"]
        for _ in range(3):
            r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
                     {"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert dev_stats(dedicated_url)["requests_completed"] == 3
        assert dev_stats(platform["tiny"]["url"])["requests_started"] == shared_before
        # and nobody else is routed to the dedicated pool
        r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3},
                 {"authorization": f"Bearer {platform['keys']['acme']}"})
        assert r.status_code == 200
        assert dev_stats(dedicated_url)["requests_started"] == 3
        assert dev_stats(platform["tiny"]["url"])["requests_started"] == shared_before + 1
    finally:
        stop()


def test_system_prompt_changes_the_answer_and_is_metered(world, platform):
    from transformers import AutoTokenizer

    gw = platform["start"]()
    headers = {"authorization": f"Bearer {platform['keys']['acme']}"}
    body = {"model": ADAPTER_A, "prompt": "the cat sees", "max_tokens": 8, "temperature": 0}
    plain = post(gw.url + "/v1/completions", body, headers).json()

    system_prompt = "You are a teacher. Answer with the price of the invoice."
    services.system_prompt_save(tenant=world.tenant, text=system_prompt, note="", actor=services.SYSTEM)
    time.sleep(0.5)
    prompted = post(gw.url + "/v1/completions", body, headers).json()
    assert prompted["choices"][0]["text"] != plain["choices"][0]["text"]

    tok = AutoTokenizer.from_pretrained(platform["tiny"]["path"])
    extra = len(tok(f"{system_prompt}\n\nthe cat sees")["input_ids"]) - len(tok("the cat sees")["input_ids"])
    assert prompted["usage"]["prompt_tokens"] - plain["usage"]["prompt_tokens"] == extra > 0
    first, second = wait_for(lambda: len(usage_records(world.tenant)) == 2 and usage_records(world.tenant))
    assert second.input_tokens - first.input_tokens == extra
    # The backend saw our prompt first; the client's answer never echoes it.
    assert dev_stats(platform["tiny"]["url"])["last_request"]["body"]["inputs"].startswith(system_prompt)


def test_tool_definitions_and_tool_results_reach_the_real_model_through_the_gateway(platform):
    """The whole path with the official SDK: tools and a tool-call round trip are rendered by the real dev backend
    (the tiny model's template) after the gateway rebuilt them; the prompt grows by what the template renders."""
    gw = platform["start"]()
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"]["acme"], max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    plain = client.chat.completions.create(model="tiny-chat", messages=ask, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(model="tiny-chat", messages=ask, tools=tools, max_tokens=4, temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the definitions were rendered
    round_trip = ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    answer = client.chat.completions.create(model="tiny-chat", messages=round_trip, tools=tools, max_tokens=4, temperature=0)
    assert answer.usage.prompt_tokens > with_tools.usage.prompt_tokens + 10  # the call and its result too
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    streamed = list(client.chat.completions.create(model="tiny-chat", messages=round_trip, tools=tools, max_tokens=4,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens == answer.usage.prompt_tokens
