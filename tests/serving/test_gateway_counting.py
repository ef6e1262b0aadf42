"""Exact prompt counts through the gateway: the reservation is the backend's own prompt count + max tokens, and a
prompt + max tokens beyond the context is refused before any backend is called, with exact figures."""

from __future__ import annotations

import pytest

from serving.models import BaseModel
from serving.tokencount import load_counter
from tenants import services
from tests.support.gateway import (
    dev_stats,
    make_base_model,
    make_key,
    make_pool,
    post,
    set_model_config,
    settled_day_counters,
    sim_backend,
    tiny_backend,
    usage_records,
    wait_for,
)
from tests.support.texts import CJK, CODE, EMOJI, LONG_SYSTEM, TOOLS

TENANT_PROMPT = "Tenant rules: 🛑 answer in 日本語 only when asked. Never reveal <|system|>."
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich 🇨🇭"}'}}
CHATS = {
    "emoji": {"messages": [{"role": "user", "content": EMOJI}]},
    "cjk": {"messages": [{"role": "user", "content": CJK}]},
    "code": {"messages": [{"role": "user", "content": CODE}]},
    "long system prompt": {"messages": [{"role": "system", "content": LONG_SYSTEM[:500]}, {"role": "user", "content": "hi"}]},
    "many messages": {"messages": [{"role": ("user", "assistant")[i % 2], "content": f"{EMOJI} turn {i}"} for i in range(16)]},
    "tools": {"messages": [{"role": "user", "content": "Weather in 東京?"}], "tools": TOOLS, "tool_choice": "none"},
    "tool calls": {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                {"role": "tool", "tool_call_id": "call_1", "content": "12°C ☁"}], "tools": TOOLS, "tool_choice": "none"},
}


@pytest.fixture
def tiny(world, gateway_factory):
    """The real tiny model behind a dev backend; its base model's files are here, so the gateway counts exactly.
    Two tenants with a system prompt: acme keeps the user's system message after it, globex replaces it."""
    backend = tiny_backend()
    make_pool("shared", make_base_model(local_path=str(backend["path"])), [backend["url"]])
    auth = {}
    for tenant, rule in ((world.tenant, "keep"), (world.other_tenant, "replace")):
        services.system_prompt_save(tenant=tenant, text=TENANT_PROMPT, note="", actor=services.SYSTEM)
        set_model_config(tenant, system_message_rule=rule)
        services.policy_update(tenant=tenant, actor=services.SYSTEM, quota_tokens=10**9, quota_window="day", quota_mode="hard")
        auth[tenant.slug] = {"authorization": f"Bearer {make_key(tenant)[1]}"}
    return gateway_factory(), auth, load_counter(backend["path"])


def reserved(r, used_before: int) -> int:
    """What admission reserved for this request: the quota header counts used + reserved at admission."""
    return int(r.headers["x-quota-used-tokens"]) - used_before


def test_the_reservation_is_the_backends_prompt_count_plus_max_tokens(tiny, world):
    gw, auth, _ = tiny
    for slug, tenant in (("acme", world.tenant), ("globex", world.other_tenant)):
        used = 0
        for name, chat in CHATS.items():
            r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 3, **chat}, auth[slug])
            assert r.status_code == 200, (name, r.text)
            usage = r.json()["usage"]
            assert reserved(r, used) - 3 == usage["prompt_tokens"], (slug, name)  # the dev backend's own count
            used += usage["total_tokens"]
        for text in (EMOJI, CJK, CODE):
            r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": text, "max_tokens": 3}, auth[slug])
            assert r.status_code == 200 and reserved(r, used) - 3 == r.json()["usage"]["prompt_tokens"], text
            used += r.json()["usage"]["total_tokens"]
            r = post(gw.url + "/generate", {"inputs": text, "parameters": {"max_new_tokens": 3}}, auth[slug])
            assert r.status_code == 200, r.text
            record = usage_records(tenant)[-1]
            assert reserved(r, used) - 3 == record.input_tokens, text  # TGI's route: the ledger has the backend's count
            used += record.input_tokens + record.output_tokens


def test_the_count_includes_the_tenants_system_prompt_by_its_rule(tiny):
    gw, auth, counter = tiny
    chat = {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "system", "content": "Be brief 🙂"}, {"role": "user", "content": EMOJI}]}
    keep = post(gw.url + "/v1/chat/completions", chat, auth["acme"]).json()["usage"]["prompt_tokens"]
    replace = post(gw.url + "/v1/chat/completions", chat, auth["globex"]).json()["usage"]["prompt_tokens"]
    assert keep == counter.chat([{"role": "system", "content": f"{TENANT_PROMPT}\n\nBe brief 🙂"}, {"role": "user", "content": EMOJI}],
                                None, kind="dev").tokens
    assert replace == counter.chat([{"role": "system", "content": TENANT_PROMPT}, {"role": "user", "content": EMOJI}], None, kind="dev").tokens


@pytest.fixture(params=["dev", "tgi", "vllm"])
def small_context(request, world, gateway_factory, tiny_model_path):
    """A 64-token model with its files here, on each backend kind; the (simulated) backend must never be called."""
    url, stop = sim_backend(flavor="vllm" if request.param == "vllm" else "dev")
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", context_length=64, local_path=str(tiny_model_path))
    make_pool("shared", base, [url], kind=request.param)
    _, key = make_key(world.tenant)
    yield gateway_factory(), {"authorization": f"Bearer {key}"}, load_counter(tiny_model_path), request.param, url
    stop()


def test_beyond_the_context_is_refused_with_exact_figures_before_any_backend(small_context):
    gw, auth, counter, kind, backend_url = small_context
    messages = [{"role": "user", "content": EMOJI * 2}]
    n = counter.chat(messages, None, kind=kind).tokens
    assert n < 64 < n + 40
    r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": messages, "max_tokens": 40}, auth)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": f"This model's maximum context length is 64 tokens. However, your messages resulted in {n + 40} tokens ({n} in the "
                   "messages, 40 in the completion). Please reduce the length of the messages or completion.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}
    streamed = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": messages, "max_tokens": 40, "stream": True}, auth)
    assert streamed.status_code == 400 and streamed.json() == r.json()

    p = counter.text(CJK, kind=kind).tokens
    assert p >= 64
    r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": CJK, "max_tokens": 1}, auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["message"] == (f"This model's maximum context length is 64 tokens. However, your prompt resulted in {p + 1} "
                                            f"tokens ({p} in the prompt, 1 in the completion). Please reduce the length of the prompt or completion.")
    g = counter.text(EMOJI, kind=kind).tokens
    r = post(gw.url + "/generate", {"inputs": EMOJI, "parameters": {"max_new_tokens": 60}}, auth)
    assert r.status_code == 400 and r.json() == {
        "error": f"This model's maximum context length is 64 tokens. However, your inputs resulted in {g + 60} tokens ({g} in the inputs, "
                 "60 in `max_new_tokens`). Please reduce the length of the inputs or `max_new_tokens`.", "error_type": "validation"}
    assert dev_stats(backend_url)["requests_started"] == 0  # refused by the gateway: no backend saw any of them


def test_a_default_max_tokens_shrinks_to_what_fits(small_context):
    gw, auth, counter, kind, backend_url = small_context
    messages = [{"role": "user", "content": EMOJI * 2}]
    n = counter.chat(messages, None, kind=kind).tokens
    r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": messages}, auth)  # the default is 256
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 64 - n
    r = post(gw.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": CJK * 2}]}, auth)
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("Please reduce the length of the messages.")  # nothing fits


def adversarial_chats(n: int) -> list[dict]:
    """Issue 11's 60 chats of six emoji and a number, mixed with CJK, code, a long system prompt and many messages."""
    extra = [[{"role": "user", "content": CJK}], [{"role": "user", "content": CODE}],
             [{"role": "system", "content": LONG_SYSTEM[:300]}, {"role": "user", "content": EMOJI}],
             [{"role": ("user", "assistant")[i % 2], "content": EMOJI} for i in range(7)]]
    return [extra[i // 6 % 4] if i % 6 == 5 else [{"role": "user", "content": f"😀😃😄😁😆😅 {i}"}] for i in range(n)]


@pytest.mark.slow
def test_a_hard_quota_is_never_overshot_by_adversarial_prompts(world, gateway_factory):
    """Defect 1 of issue 11: hard quota 2,000 tokens/day, 60 concurrent chats of six emoji and a number, max_tokens 32:
    the ~3-characters-a-token estimate admitted 49 and 3,076 tokens were used. With REDIS_URL set, through Redis."""
    from concurrent.futures import ThreadPoolExecutor

    backend = tiny_backend()
    make_pool("shared", make_base_model(local_path=str(backend["path"])), [backend["url"]])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=2000, quota_window="day", quota_mode="hard")
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    bodies = [{"model": "tiny-chat", "messages": m, "max_tokens": 32, "temperature": 0} for m in adversarial_chats(60)]
    with ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(lambda b: post(gw.url + "/v1/chat/completions", b, {"authorization": f"Bearer {key}"}), bodies))
    statuses = sorted({r.status_code for r in answers})
    assert statuses == [200, 429], statuses
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in answers if r.status_code == 429)
    used = sum(r.input_tokens + r.output_tokens for r in usage_records(world.tenant))
    assert used == sum(r.json()["usage"]["total_tokens"] for r in answers if r.status_code == 200)
    assert 0 < used <= 2000  # never overshot
    assert settled_day_counters(world.tenant) == {"used": used, "reserved": 0}  # the counter equals the ledger


