"""Prompt token counts (serving.tokencount) equal transformers' on the tiny model, for inputs where a characters
rule is no bound: emoji, CJK, code, long system prompts, many messages, tools and tool calls, the tenant's
system prompt rules, text prompts; and other chat templates that use what transformers' environment offers."""

from __future__ import annotations

import functools
import json
import shutil

import pytest

from serving.gateway.parsing import inject_system_prompt
from serving.tokencount import BOUND, PromptCounter, _vllm_tools, counter_for, load_counter, template_messages
from tests.support.texts import CJK, CODE, EMOJI, LONG_SYSTEM, TOOLS

CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich 🇨🇭"})}},
         {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "{}"}}]

CONVERSATIONS = {
    "emoji": [{"role": "user", "content": EMOJI}],
    "cjk": [{"role": "user", "content": CJK}],
    "code": [{"role": "system", "content": "Review:"}, {"role": "user", "content": CODE}],
    "long system prompt": [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "hi"}],
    "many messages": [{"role": ("user", "assistant")[i % 2], "content": f"{EMOJI} {CJK[:i]} turn {i}"} for i in range(60)],
    "tool calls": [{"role": "user", "content": "Weather in Zürich?"},
                   {"role": "assistant", "content": None, "tool_calls": CALLS},
                   {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": "12°C", "sky": "☁"}'},
                   {"role": "tool", "tool_call_id": "call_2", "content": ""},
                   {"role": "assistant", "content": "12°C and cloudy ☁."}],
    "empty and whitespace": [{"role": "user", "content": ""}, {"role": "assistant", "content": " \n\t "}, {"role": "user", "content": "  "}],
    "special-token text": [{"role": "user", "content": "<|bos|><|end|><|assistant|>not a turn<|eos|>"}],
}


@functools.lru_cache(maxsize=None)
def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def transformers_count(path, messages, tools=None) -> int:
    out = hf_tokenizer(path).apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    return len(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def counter(tiny_model_path) -> PromptCounter:
    return load_counter(tiny_model_path)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_counts_equal_transformers(counter, tiny_model_path, name, with_tools):
    messages, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    count = counter.chat(messages, tools, kind="dev")
    assert count.exact
    assert count.tokens == transformers_count(tiny_model_path, template_messages(messages, kind="dev"), tools)


@pytest.mark.parametrize("rule", ["keep", "replace"])
@pytest.mark.parametrize("name", ["emoji", "code", "long system prompt", "many messages"])
def test_counts_include_the_tenants_system_prompt(counter, tiny_model_path, rule, name):
    messages = inject_system_prompt(CONVERSATIONS[name], "Tenant rules: 🛑 no 秘密.", rule)
    assert counter.chat(messages, None, kind="dev").tokens == transformers_count(tiny_model_path, messages)


@pytest.mark.parametrize("prompt", [EMOJI, CJK, CODE, LONG_SYSTEM + "\n\n" + CJK, "", " "])
def test_text_prompt_counts_equal_transformers(counter, tiny_model_path, prompt):
    tokenizer = hf_tokenizer(tiny_model_path)
    for kind, special in (("dev", False), ("vllm", True), ("tgi", True)):
        count = counter.text(prompt, kind=kind)
        assert count.exact and count.tokens == len(tokenizer(prompt, add_special_tokens=special)["input_ids"])


# Templates that use trim_blocks / lstrip_blocks, loop controls, namespace, `{% generation %}`, tojson with
# arguments, raise_exception and a dict of named templates, saved with the tiny tokenizer as transformers saves them.
CHATML = """{%- set ns = namespace(system=false) -%}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% set ns.system = true %}{% endif %}
{%- endfor %}
{%- if not ns.system %}<|system|>You are a helpful assistant named Tiny, made on {{ strftime_now('%Y') | length }} digits.<|end|>
{% endif %}
{%- if tools %}<|tools|>{{ tools | tojson(indent=2, sort_keys=true) }}<|end|>
{% endif %}
{%- for message in messages %}
    {%- if loop.index > 100 %}{% break %}{% endif %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role') }}{% endif %}
    <|{{ message.role }}|>
    {%- if message.role == 'assistant' %}{% generation %}{{ message.content | trim }}{% endgeneration %}
    {%- else %}{{ message.content }}{% endif %}
    {%- for call in message.tool_calls or [] %}
        {{- '\\n<|tool_call|>' + dict(name=call.function.name, arguments=call.function.arguments) | tojson }}
    {%- endfor %}
<|end|>
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""


@pytest.fixture(scope="module")
def other_templates(tiny_model_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "tiny-chatml"
    shutil.copytree(tiny_model_path, path)
    (path / "chat_template.jinja").write_text(CHATML)
    named = tmp_path_factory.mktemp("templates") / "tiny-named"
    shutil.copytree(tiny_model_path, named)
    (named / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}<|assistant|>")
    (named / "additional_chat_templates").mkdir()
    (named / "additional_chat_templates" / "tool_use.jinja").write_text(CHATML)
    return path, named


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_other_templates_count_as_transformers_renders_them(other_templates, name):
    for path in other_templates:
        counter = load_counter(path)
        for tools in (None, TOOLS):
            messages = template_messages(CONVERSATIONS[name], kind="dev")
            assert counter.chat(CONVERSATIONS[name], tools, kind="dev").tokens == transformers_count(path, messages, tools), (path.name, tools)


def test_a_template_that_refuses_gives_a_bound_not_an_error(other_templates):
    counter = load_counter(other_templates[0])
    count = counter.chat([{"role": "critic", "content": "x"}], None, kind="dev")
    assert not count.exact and count.tokens > 0


def test_messages_reach_the_template_as_the_backends_give_them():
    messages = [{"role": "assistant", "content": None, "name": "bot", "tool_calls": CALLS}]
    vllm, dev = template_messages(messages, kind="vllm"), template_messages(messages, kind="dev")
    assert vllm[0]["content"] == dev[0]["content"] == ""  # vLLM and the dev backend: null content is ""
    assert vllm[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Zürich 🇨🇭"}  # parsed, as templates expect
    assert vllm[0]["name"] == "bot" and "name" not in dev[0]  # the dev backend drops names


def test_vllm_counts_tools_as_vllm_dumps_them(counter):
    """vLLM renders `tool.model_dump()`: a function without description or parameters shows them as null."""
    rendered = counter.render([{"role": "user", "content": "x"}], TOOLS, kind="vllm")
    assert '{"name": "noop", "description": null, "parameters": null}' in rendered
    assert '"noop"}' in counter.render([{"role": "user", "content": "x"}], TOOLS, kind="dev")


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_bound_is_above_the_exact_count(counter, name):
    messages = CONVERSATIONS[name]
    for tools in (None, TOOLS):
        assert BOUND.chat(messages, tools, kind="vllm").tokens >= counter.chat(messages, tools, kind="vllm").tokens
    text = "\n".join(m["content"] or "" for m in messages)
    assert BOUND.text(text, kind="vllm").tokens >= counter.text(text, kind="vllm").tokens


def test_the_tokenizer_is_loaded_once_per_model(tiny_model_path, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_model_path, path)
    first = counter_for(str(path))
    assert first.exact and counter_for(str(path)) is first  # a snapshot reload reuses it
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    again = counter_for(str(path))
    assert again is not first  # the files changed: loaded again
    assert again.chat([{"role": "user", "content": "hi"}], None, kind="dev").tokens == again.tokens("hi")
    assert counter_for("") is BOUND and counter_for(str(tmp_path / "nothing-here")) is BOUND


def test_counting_imports_neither_torch_nor_transformers(tiny_model_path):
    import os
    import subprocess
    import sys

    code = ("import sys, django; django.setup()\n"
            "import serving.gateway.app\n"
            "from serving.tokencount import counter_for\n"
            f"c = counter_for({str(tiny_model_path)!r})\n"
            "assert c.exact and c.chat([{'role': 'user', 'content': 'hi 😀'}], None, kind='vllm').tokens > 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_long_prompt_is_counted_off_the_event_loop(counter):
    """The same count in a worker thread, and the event loop keeps running meanwhile (the tokenizer releases the GIL)."""
    import asyncio
    from types import SimpleNamespace

    from serving.drivers import BackendRequest, Sampling
    from serving.gateway.parsing import COUNT_INLINE_CHARS, count_prompt

    pool = SimpleNamespace(counter=counter, kind="dev", context_length=1_000_000)
    long_text = (CJK + CODE + EMOJI) * (4 * COUNT_INLINE_CHARS // len(CJK + CODE + EMOJI))
    short, long = ([{"role": "user", "content": text}] for text in (EMOJI, long_text))

    async def count_with_ticker(messages):
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        ticks = 0
        count = await count_prompt(BackendRequest("chat", 1, Sampling(False), messages=messages), pool)
        task.cancel()
        return count, ticks

    for messages in (short, long):
        count, ticks = asyncio.run(count_with_ticker(messages))
        assert count == counter.chat(messages, None, kind="dev")
        assert (ticks > 0) == (messages is long)  # short prompts inline (no thread hop); long ones in a thread


@pytest.mark.slow
def test_the_demo_models_counts_equal_transformers(demo_model_path):
    """SmolLM2-135M-Instruct (a real BPE of 49k tokens, a ChatML template that adds a default system prompt)."""
    counter = load_counter(demo_model_path)
    for name, messages in CONVERSATIONS.items():
        for tools in (None, TOOLS):
            count = counter.chat(messages, tools, kind="vllm")
            as_vllm = template_messages(messages, kind="vllm"), tools and _vllm_tools(tools)  # what vLLM hands the template
            assert (count.tokens, count.exact) == (transformers_count(demo_model_path, *as_vllm), True), name
    tokenizer = hf_tokenizer(demo_model_path)
    for text in (EMOJI, CJK, CODE, "3.14159 and 1,000,000", "  two leading spaces", ""):
        assert counter.text(text, kind="vllm").tokens == len(tokenizer(text)["input_ids"])


# ---- a lower bound, without tokenizing, for a prompt far past the context -----------------------------------------


@pytest.mark.parametrize("text", [EMOJI * 50, CJK * 30, CODE * 40, LONG_SYSTEM, " " * 5000, "a" * 7000, "\n\n" * 900])
def test_no_token_stands_for_more_text_than_the_bound_assumes(counter, text):
    assert counter.max_token_bytes and counter.tokens(text) >= -(-len(text.encode()) // counter.max_token_bytes)


def test_a_prompt_far_past_the_context_is_bounded_from_below_without_tokenizing(counter, monkeypatch):
    monkeypatch.setattr(counter, "tokens", lambda *a, **k: pytest.fail("tokenized"))
    huge = [{"role": "user", "content": "word " * 200_000}]  # 1 MB
    count = counter.chat(huge, None, kind="vllm", beyond=4096)
    assert count.at_least and not count.exact and count.tokens > 4096
    assert counter.text("word " * 200_000, kind="vllm", beyond=4096).at_least


def test_a_prompt_the_bound_cannot_place_past_the_context_is_counted_exactly(counter):
    messages = [{"role": "user", "content": "word " * 300}]
    count = counter.chat(messages, None, kind="vllm", beyond=4096)
    assert count.exact and not count.at_least and count == counter.chat(messages, None, kind="vllm")


def test_a_tokenizer_with_a_normalizer_gets_no_bound(tiny_model_path):
    from tokenizers import normalizers

    normalized = load_counter(tiny_model_path)
    normalized.tokenizer.normalizer = normalizers.Lowercase()
    from serving.tokencount import _max_token_bytes

    assert _max_token_bytes(normalized.tokenizer) is None
