"""Tool (function) calling through the gateway: the official SDK against a backend that streams tool calls as
vLLM does, the follow-up with tool results, the output guard on arguments, the system prompt, the parsers."""

from __future__ import annotations

import json
import time

import pytest
from openai import OpenAI

from serving.drivers import BackendRequest, Sampling, ToolCallDelta
from serving.drivers.openai_compat import openai_body, tool_call_fragments
from serving.gateway.formatting import ToolCalls
from serving.guard import REDACTED, build_guard
from tenants import services
from tests.support.gateway import (
    ToolCallingBackend,
    make_base_model,
    make_key,
    make_pool,
    set_model_config,
    stream_lines,
    usage_records,
    wait_for,
)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def backend():
    b = ToolCallingBackend()
    yield b
    b.stop()


@pytest.fixture
def tools_platform(world, gateway_factory, backend):
    make_pool("vllm-shared", make_base_model(), [backend.url], kind="vllm")
    keys = {"acme": make_key(world.tenant)[1], "globex": make_key(world.other_tenant)[1]}
    gw = gateway_factory()
    clients = {name: OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0) for name, key in keys.items()}
    return gw, clients, keys


def test_sdk_non_streamed_tool_call_and_usage_metered_once(world, tools_platform, backend):
    gw, clients, _ = tools_platform
    answer = clients["acme"].chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice="auto")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and "chatcmpl-tool" not in call.id  # the gateway's id, not the backend's
    assert answer.usage.completion_tokens == backend.tokens() and answer.usage.prompt_tokens == backend.prompt_tokens
    [record] = wait_for(lambda: usage_records(world.tenant))
    assert (record.input_tokens, record.output_tokens, record.status) == (backend.prompt_tokens, backend.tokens(), "ok")

    sent = backend.bodies[-1]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and "parallel_tool_calls" not in sent
    assert sent["cache_salt"] and sent["stream"] is True


def test_sdk_streamed_tool_calls_in_openais_chunk_shape(world, tools_platform, backend):
    backend.script = [("content", "Let me check. "),
                      ("call", 0, "get_weather", ['{"city"', ': "Paris"}']),
                      ("call", 1, "get_weather", ['{"city": "Berlin"}'])]
    gw, clients, _ = tools_platform
    chunks = list(clients["acme"].chat.completions.create(
        model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=True, stream=True,
        stream_options={"include_usage": True}))
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_weather"]
    assert [json.loads(calls[i]["arguments"]) for i in sorted(calls)] == [{"city": "Paris"}, {"city": "Berlin"}]
    assert all(c["id"].startswith("call_") for c in calls.values()) and calls[0]["id"] != calls[1]["id"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check. "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == backend.tokens()
    assert wait_for(lambda: len(usage_records(world.tenant)) == 1)
    assert usage_records(world.tenant)[0].output_tokens == backend.tokens()
    sent = backend.bodies[-1]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is True


def test_follow_up_with_tool_results_reaches_the_backend_intact(world, tools_platform, backend):
    gw, clients, _ = tools_platform
    system_prompt = "You are the Acme assistant."
    services.system_prompt_save(tenant=world.tenant, text=system_prompt, note="", actor=services.SYSTEM)
    time.sleep(0.4)
    first = clients["acme"].chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    backend.script = [("content", "It is sunny in Paris.")]
    messages = [{"role": "system", "content": "Be brief."}, *ASK,
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    answer = clients["acme"].chat.completions.create(model="tiny-chat", messages=messages, tools=TOOLS,
                                                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert answer.choices[0].message.content == "It is sunny in Paris." and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    sent = backend.bodies[-1]
    assert sent["messages"] == [
        {"role": "system", "content": f"{system_prompt}\n\nBe brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


def test_guard_redacts_arguments_and_keeps_them_json_other_tenant_untouched(world, tools_platform, backend):
    gw, clients, keys = tools_platform
    set_model_config(world.tenant, redact_emails=True)
    time.sleep(0.4)
    backend.script = [("call", 0, "send_mail", ['{"to": "jo', 'hn.doe@exa', 'mple.com", "body": "Hi \\"', 'there\\""}']),
                      ("call", 1, "get_weather", ['{"city": "Paris"}'])]
    tools = [*TOOLS, {"type": "function", "function": {"name": "send_mail"}}]
    expected = [{"to": REDACTED, "body": 'Hi "there"'}, {"city": "Paris"}]

    answer = clients["acme"].chat.completions.create(model="tiny-chat", messages=ASK, tools=tools)
    assert [json.loads(c.function.arguments) for c in answer.choices[0].message.tool_calls] == expected

    status, lines = stream_lines(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": ASK, "tools": tools, "stream": True},
                                 {"authorization": f"Bearer {keys['acme']}"})
    assert status == 200 and lines[-1] == "data: [DONE]"
    items = [tc for line in lines[:-1] for e in [json.loads(line[6:])] if e["choices"]
             for tc in e["choices"][0]["delta"].get("tool_calls") or []]
    assert [(i["index"], i["function"]["name"]) for i in items] == [(0, "send_mail"), (1, "get_weather")]  # whole calls
    assert [json.loads(i["function"]["arguments"]) for i in items] == expected
    assert "doe" not in "".join(lines)

    plain = clients["globex"].chat.completions.create(model="tiny-chat", messages=ASK, tools=tools)
    assert json.loads(plain.choices[0].message.tool_calls[0].function.arguments)["to"] == "john.doe@example.com"


# ---- the parts ------------------------------------------------------------------------------------


def test_vllm_and_tgi_bodies_carry_tools_and_tool_messages():
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    request = BackendRequest("chat", 10, Sampling(False), messages=messages, tools=TOOLS, tool_choice="none", parallel_tool_calls=False)
    _, vllm = openai_body(request, model="m", cache_salt=True, continuous_usage=True)
    assert vllm["messages"] == messages and vllm["tools"] == TOOLS and vllm["tool_choice"] == "none" and vllm["parallel_tool_calls"] is False
    _, tgi = openai_body(request, model="tgi", cache_salt=False, continuous_usage=False, parallel_tool_calls=False)
    assert tgi["tools"] == TOOLS and "parallel_tool_calls" not in tgi  # TGI makes one call per answer anyway
    _, plain = openai_body(BackendRequest("chat", 10, Sampling(False), messages=messages[:1]), model="m", cache_salt=False, continuous_usage=False)
    assert "tools" not in plain and "tool_choice" not in plain


def test_stream_parser_reads_vllm_and_tgi_fragments():
    assert tool_call_fragments([{"id": "x", "type": "function", "index": 1, "function": {"name": "f"}}]) == [ToolCallDelta(1, "f", "")]
    assert tool_call_fragments([{"index": 1, "function": {"arguments": '{"a"'}}]) == [ToolCallDelta(1, None, '{"a"')]
    # TGI 2.x: one object, no index, arguments as an object
    assert tool_call_fragments({"id": "", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}) == [ToolCallDelta(0, "f", '{"a": 1}')]
    assert tool_call_fragments(None) == [] and tool_call_fragments([{"index": 0, "function": {}}]) == []


def test_tool_calls_merge_fragments_and_guard_json():
    calls = ToolCalls()
    first = calls.feed(ToolCallDelta(0, "f", ""))
    assert first == [{"index": 0, "id": first[0]["id"], "type": "function", "function": {"name": "f", "arguments": ""}}]
    assert calls.feed(ToolCallDelta(0, None, '{"x": 1')) == [{"index": 0, "function": {"arguments": '{"x": 1'}}]
    calls.feed(ToolCallDelta(0, None, "}"))
    assert calls.message() == [{"id": first[0]["id"], "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    assert calls.finish() == []

    guard = build_guard(emails=True, blocked_terms=["secret"], patterns=[r'a"b'])
    text = '{"to": "a@b.co", "n": [1, "secret plan"], "q": "a\\"b"}'
    assert json.loads(guard.apply_json(text)) == {"to": REDACTED, "n": [1, "[BLOCKED] plan"], "q": REDACTED}
    assert guard.apply_json('{"city": "Paris"}') == '{"city": "Paris"}'  # untouched text keeps its bytes
    assert guard.apply_json("not json a@b.co") == f"not json {REDACTED}"
