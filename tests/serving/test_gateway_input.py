"""Bad input is refused in the client's error shape and never reaches a backend; auth, suspension, revocation."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from openai import OpenAI

from serving.models import Backend
from tenants import services
from tenants.models import Tenant
from tests.support.gateway import (
    dev_stats,
    make_base_model,
    make_key,
    make_pool,
    post,
    set_model_config,
    settled_day_counters,
    sim_backend,
    stream_lines,
    tiny_backend,
    usage_records,
    wait_for,
)

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"type": "function", "function": {"name": "f"}}
CALL = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.fixture
def setup(world, gateway_factory):
    url, stop = sim_backend()
    make_pool("shared", make_base_model(), [url])
    set_model_config(world.tenant, max_max_tokens=100)
    _, key = make_key(world.tenant)
    gw = gateway_factory(max_body_bytes=4096)
    yield gw, url, key
    stop()


def _openai_error(r, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    "path, body, status, code, param",
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json", None),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None),
        ("/v1/chat/completions", {"model": "tiny-chat"}, 400, "missing_required_parameter", "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "invalid_type", "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, None, "messages[0].role"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 101}, 400, "invalid_value", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "temperature": 3}, 400, "invalid_value", "temperature"),
        ("/v1/chat/completions", {**CHAT, "n": 2}, 400, None, "n"),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model_not_found", "model"),
        ("/v1/completions", {"model": "tiny-chat"}, 400, "missing_required_parameter", "prompt"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": 3}, 400, "invalid_type", "prompt"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}, 413, "request_too_large", None),
        # Features not carried to backends are refused by name, never silently dropped.
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
        ("/v1/chat/completions", {**CHAT, "function_call": "auto"}, 400, "unsupported_parameter", "function_call"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter",
         "response_format"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "logprobs": 2}, 400, "unsupported_parameter", "logprobs"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "function", "name": "f", "content": "42"}]}, 400,
         "unsupported_parameter", "messages[0].role"),
        # Tool calling: every field checked, named the way OpenAI names it.
        ("/v1/chat/completions", {**CHAT, "tools": {"type": "function"}}, 400, "invalid_type", "tools"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
         "invalid_value", "tools[0].function.name"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f" * 65}}]}, 400,
         "invalid_value", "tools[0].function.name"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL, {"type": "function", "function": {}}]}, 400,
         "missing_required_parameter", "tools[1].function.name"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "code", "function": {"name": "f"}}]}, 400, "invalid_value",
         "tools[0].type"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, 400,
         "invalid_type", "tools[0].function.parameters"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, 400,
         "invalid_type", "tools[0].function.strict"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]}, 400,
         "unknown_parameter", "tools[0].function.returns"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL, TOOL]}, 400, None, "tools[1].function.name"),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, 400, None, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": "always"}, 400, None, "tool_choice"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400,
         None, "tool_choice.function.name"),
        ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "parallel_tool_calls": "yes"}, 400, "invalid_type", "parallel_tool_calls"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "tools": [TOOL]}, 400, "unsupported_parameter", "tools"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "tool_call_id": "c1", "content": "42"}]}, 400,
         None, "messages[0].tool_call_id"),
        ("/v1/chat/completions", {**CHAT, "messages": [CALL, {"role": "tool", "content": "42"}]}, 400,
         "missing_required_parameter", "messages[1].tool_call_id"),
        ("/v1/chat/completions", {**CHAT, "messages": [CALL, {"role": "tool", "tool_call_id": "c1", "content": None}]}, 400,
         "invalid_type", "messages[1].content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{**CALL, "tool_calls": [{"id": "c1", "type": "function",
                                                                                 "function": {"name": "f", "arguments": {}}}]}]},
         400, "invalid_type", "messages[0].tool_calls[0].function.arguments"),
        ("/v1/chat/completions", {**CHAT, "messages": [{**CALL, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": ""}}]}]},
         400, "missing_required_parameter", "messages[0].tool_calls[0].id"),
        ("/v1/chat/completions", {**CHAT, "messages": [{**CALL, "role": "user"}]}, 400, None, "messages[0].tool_calls"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None}]}, 400, "invalid_type",
         "messages[0].content"),
        # Sampling parameters: OpenAI's ranges, checked here so that no backend's own wording reaches the client.
        ("/v1/chat/completions", {**CHAT, "top_p": 1.5}, 400, "invalid_value", "top_p"),
        ("/v1/chat/completions", {**CHAT, "top_p": -0.1}, 400, "invalid_value", "top_p"),
        ("/v1/chat/completions", {**CHAT, "top_p": "0.9"}, 400, "invalid_type", "top_p"),
        ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "invalid_value", "temperature"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "temperature": 2.5}, 400, "invalid_value", "temperature"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "invalid_value", "n"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -3}, 400, "invalid_value", "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "seed": 2**63}, 400, "invalid_value", "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": -(2**63) - 1}, 400, "invalid_value", "seed"),
        ("/v1/chat/completions", {**CHAT, "seed": 1.5}, 400, "invalid_type", "seed"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
        ("/v1/chat/completions", {**CHAT, "stop": [1]}, 400, "invalid_type", "stop"),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": 2.5}, 400, "invalid_value", "presence_penalty"),
        ("/v1/chat/completions", {**CHAT, "frequency_penalty": "high"}, 400, "invalid_type", "frequency_penalty"),
        # ... and what no backend is sent is refused by name rather than dropped.
        # (a presence penalty cannot go through TGI's /generate, where text prompts of TGI and dev pools go)
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "presence_penalty": -0.5}, 400, "unsupported_parameter",
         "presence_penalty"),
        ("/v1/chat/completions", {**CHAT, "logit_bias": {"50256": -100}}, 400, "unsupported_parameter", "logit_bias"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "unsupported_parameter", "top_logprobs"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "best_of": 2}, 400, "unsupported_parameter", "best_of"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "suffix": "end"}, 400, "unsupported_parameter", "suffix"),
        # `echo` is a completions feature (OpenAI's chat has none).
        ("/v1/chat/completions", {**CHAT, "echo": True}, 400, "unsupported_parameter", "echo"),
        ("/v1/completions", {"model": "tiny-chat", "prompt": "x", "echo": "yes"}, 400, "invalid_type", "echo"),
        # Message content as OpenAI has it: null only beside tool_calls; refusal only on assistant messages.
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant"}]}, 400, "missing_required_parameter",
         "messages[0].content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None, "tool_calls": []}]}, 400,
         "invalid_type", "messages[0].content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, 400, "invalid_type",
         "messages[0].content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}, 400,
         "invalid_type", "messages[0].content"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "refusal": "no"}]}, 400, None,
         "messages[0].refusal"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None, "refusal": 3}]}, 400, "invalid_type",
         "messages[0].refusal"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "name": 3}]}, 400, "invalid_type",
         "messages[0].name"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "assistant", "content": None,
                                                         "function_call": {"name": "f", "arguments": "{}"}}]}, 400,
         "unsupported_parameter", "messages[0].function_call"),
    ],
)
def test_bad_input_is_refused_before_any_backend(setup, path, body, status, code, param):
    gw, backend, key = setup
    r = post(gw.url + path, body, {"authorization": f"Bearer {key}", "content-type": "application/json"})
    _openai_error(r, status, code, param)
    assert dev_stats(backend)["requests_started"] == 0


@pytest.mark.parametrize("path, extra", [("/v1/chat/completions", {}), ("/v1/chat/completions", {"stream": False}),
                                         ("/v1/completions", {"stream": False})])
def test_stream_options_need_stream(setup, path, extra):
    """As OpenAI: `stream_options` is refused unless `stream` is true (it would silently not apply)."""
    gw, backend, key = setup
    body = {**CHAT, **extra} if "chat" in path else {"model": "tiny-chat", "prompt": "x", **extra}
    r = post(gw.url + path, {**body, "stream_options": {"include_usage": True}}, {"authorization": f"Bearer {key}"})
    error = _openai_error(r, 400, "invalid_value", "stream_options")
    assert error["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    r = post(gw.url + path, {**body, "max_tokens": 2, "stream_options": None}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert dev_stats(backend)["requests_started"] == 1


def test_assistant_messages_as_openai_accepts_them(setup):
    """Null content beside tool_calls, a refusal instead of content, content as text or refusal parts, `name` on any
    message: all accepted as OpenAI accepts them, and carried to the backend (a refusal is what the assistant said)."""
    gw, backend, key = setup
    sdk_dump = {"tool_calls": None, "function_call": None, "audio": None, "annotations": []}  # model_dump() of an answer
    messages = [
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": None, "refusal": "I can't help with that.", **sdk_dump},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure"}, {"type": "text", "text": "!"}], "name": "helper"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}], "refusal": None},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
        CALL,
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "messages": messages, "max_tokens": 2}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert dev_stats(backend)["last_request"]["body"]["messages"] == [
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "I can't help with that."},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "Sure!", "name": "helper"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": None, "tool_calls": CALL["tool_calls"]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]


def test_null_content_is_refused_in_openais_words(setup):
    gw, backend, key = setup
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
             {"authorization": f"Bearer {key}"})
    message = _openai_error(r, 400, "invalid_type", "messages[1].content")["message"]
    assert "expected a string" in message and "got null" in message and "tool_calls" in message


def test_harmless_values_of_unsupported_features_pass(setup):
    gw, backend, key = setup
    body = {**CHAT, "max_tokens": 5, "tools": [], "tool_choice": "none", "logprobs": False,
            "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "top_logprobs": None, "top_p": 1, "stop": [], "seed": 0, "user": "end-user-1"}
    r = post(gw.url + "/v1/chat/completions", body, {"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": None, "logprobs": 0, "top_p": 1.0}
    r = post(gw.url + "/v1/completions", body, {"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    # What huggingface_hub's InferenceClient.text_generation sends by default (its None values left out).
    params = {"max_new_tokens": 2, "details": False, "decoder_input_details": False, "watermark": False, "stop": [],
              "repetition_penalty": 1.0, "frequency_penalty": 0, "best_of": 1, "truncate": None}
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": params}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("parameters, param, code", [
    ({"top_p": 1.5}, "parameters.top_p", "invalid_value"),
    ({"temperature": 0}, "parameters.temperature", "invalid_value"),
    ({"top_k": 0}, "parameters.top_k", "invalid_value"),
    ({"top_k": 2**31}, "parameters.top_k", "invalid_value"),
    ({"seed": -1}, "parameters.seed", "invalid_value"),
    ({"seed": 2**64}, "parameters.seed", "invalid_value"),
    ({"stop": list("abcde")}, "parameters.stop", "invalid_value"),
    ({"max_new_tokens": 0}, "parameters.max_new_tokens", "invalid_value"),
    ({"repetition_penalty": 1.2}, "parameters.repetition_penalty", "unsupported_parameter"),
    ({"frequency_penalty": 2.5}, "parameters.frequency_penalty", "invalid_value"),
    ({"typical_p": 0.5}, "parameters.typical_p", "unsupported_parameter"),
    ({"truncate": 100}, "parameters.truncate", "unsupported_parameter"),
    ({"best_of": 2}, "parameters.best_of", "unsupported_parameter"),
    ({"top_n_tokens": 3}, "parameters.top_n_tokens", "unsupported_parameter"),
    ({"watermark": True}, "parameters.watermark", "unsupported_parameter"),
    ({"decoder_input_details": True}, "parameters.decoder_input_details", "unsupported_parameter"),
    ({"grammar": {"type": "json", "value": {}}}, "parameters.grammar", "unsupported_parameter"),
])
def test_tgi_parameters_are_checked_in_tgi_shape(setup, parameters, param, code):
    gw, backend, key = setup
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": parameters}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error_type"] == code, r.text
    assert f"'{param}'" in r.json()["error"] or f"`{param}`" in r.json()["error"]
    assert dev_stats(backend)["requests_started"] == 0


def test_range_errors_name_the_parameter_and_the_accepted_range(setup):
    gw, backend, key = setup
    error = _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "top_p": 1.5}, {"authorization": f"Bearer {key}"}), 400)
    assert error["message"] == "Invalid 'top_p': decimal above maximum value. Expected a value from 0 to 1, but got 1.5 instead."
    error = _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 0}, {"authorization": f"Bearer {key}"}), 400)
    assert error["message"] == "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead."
    error = _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, {"authorization": f"Bearer {key}"}), 400)
    assert error["message"] == ("Invalid 'stop': array too long. Expected an array with maximum length 4, "
                                "but got an array with length 5 instead.")


def test_completions_echo_the_clients_own_prompt(world, setup):
    """`echo: true` prepends the client's prompt (never the tenant's system prompt) to the text, streamed or not;
    usage is unchanged."""
    gw, backend, key = setup
    services.system_prompt_save(tenant=world.tenant, text="SECRET HOUSE RULES", note="", actor=services.SYSTEM)
    time.sleep(0.4)
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    ask = dict(model="tiny-chat", prompt="The cat sat", max_tokens=4, temperature=0)
    plain = client.completions.create(**ask)
    echoed = client.completions.create(**ask, echo=True)
    assert echoed.choices[0].text == "The cat sat" + plain.choices[0].text and plain.choices[0].text
    assert echoed.usage == plain.usage
    assert _sent(backend)["inputs"].startswith("SECRET HOUSE RULES")  # the backend still gets the system prompt

    chunks = list(client.completions.create(**ask, echo=True, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0].startswith("The cat sat") and "".join(texts) == echoed.choices[0].text
    assert chunks[-1].usage == plain.usage
    assert "SECRET" not in "".join(texts)


def _sent(backend: str) -> dict:
    return dev_stats(backend)["last_request"]["body"]


def test_top_p_at_the_ends_of_openais_range_is_translated_for_the_backends(setup):
    """OpenAI takes 0 <= top_p <= 1; TGI refuses 0 and 1, vLLM refuses 0. top_p=1 is no nucleus cut at all (not sent);
    top_p=0 keeps only the most likely token, i.e. greedy decoding (sent as such)."""
    gw, backend, key = setup
    auth = {"authorization": f"Bearer {key}"}
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2, "temperature": 0.7, "top_p": 0}, auth)
    assert r.status_code == 200, r.text
    assert _sent(backend)["temperature"] == 0 and "top_p" not in _sent(backend)
    r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "temperature": 0.7, "top_p": 1}, auth)
    assert r.status_code == 200, r.text  # was the backend's "`top_p` must be > 0.0 and < 1.0"
    assert _sent(backend)["parameters"]["do_sample"] is True and "top_p" not in _sent(backend)["parameters"]
    r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "temperature": 0.7, "top_p": 0.5}, auth)
    assert r.status_code == 200 and _sent(backend)["parameters"]["top_p"] == 0.5
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "do_sample": True, "top_p": 0}}, auth)
    assert r.status_code == 200, r.text
    assert _sent(backend)["parameters"]["do_sample"] is False and "top_p" not in _sent(backend)["parameters"]


def test_seeds_are_mapped_to_what_each_protocol_takes(setup):
    """OpenAI's seed is a signed 64-bit integer, TGI's an unsigned one: the same 64 bits go to each backend."""
    gw, backend, key = setup
    auth = {"authorization": f"Bearer {key}"}
    r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "temperature": 0.7, "seed": -1}, auth)
    assert r.status_code == 200, r.text
    assert _sent(backend)["parameters"]["seed"] == 2**64 - 1  # TGI's /generate_stream
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2, "seed": -5}, auth)
    assert r.status_code == 200 and _sent(backend)["seed"] == -5  # the OpenAI protocol (vLLM's)


def test_penalties_reach_the_backend_in_its_own_terms(setup):
    """presence/frequency penalties: OpenAI's -2…2, carried to vLLM and to TGI's chat route as they are, the frequency
    penalty to TGI's /generate too (it has no presence penalty: refused there by name, above); 0 is not sent."""
    gw, backend, key = setup
    auth = {"authorization": f"Bearer {key}"}
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2, "presence_penalty": 0.5, "frequency_penalty": -1}, auth)
    assert r.status_code == 200, r.text
    assert _sent(backend)["presence_penalty"] == 0.5 and _sent(backend)["frequency_penalty"] == -1
    r = post(gw.url + "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2, "frequency_penalty": 1.5}, auth)
    assert r.status_code == 200 and _sent(backend)["parameters"]["frequency_penalty"] == 1.5
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2, "frequency_penalty": 0.25}}, auth)
    assert r.status_code == 200 and _sent(backend)["parameters"]["frequency_penalty"] == 0.25
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0}, auth)
    assert r.status_code == 200 and "presence_penalty" not in _sent(backend) and "frequency_penalty" not in _sent(backend)


def test_penalties_per_driver():
    from serving.drivers import BackendRequest, Sampling
    from serving.drivers.openai_compat import openai_body
    from serving.drivers.tgi import chat_body, generate_body

    def request(kind="chat"):
        return BackendRequest(kind, 4, Sampling(False, presence_penalty=0.5, frequency_penalty=1.0),
                              messages=[{"role": "user", "content": "x"}], prompt="x")

    vllm = openai_body(request(), model="m", cache_salt=True, continuous_usage=True)[1]
    assert (vllm["presence_penalty"], vllm["frequency_penalty"], vllm["temperature"]) == (0.5, 1.0, 0.0)  # greedy, penalized
    assert chat_body(request())[1]["presence_penalty"] == 0.5
    tgi = generate_body(request("text"))["parameters"]
    assert tgi["frequency_penalty"] == 1.0 and "presence_penalty" not in tgi and tgi["do_sample"] is False


def test_seed_mapping_per_driver():
    from serving.drivers import BackendRequest, Sampling
    from serving.drivers.openai_compat import openai_body
    from serving.drivers.tgi import chat_body, generate_body

    def request(seed, kind="chat"):
        return BackendRequest(kind, 4, Sampling(True, 0.7, seed=seed), messages=[{"role": "user", "content": "x"}], prompt="x")

    assert openai_body(request(2**64 - 1), model="m", cache_salt=True, continuous_usage=True)[1]["seed"] == -1  # vLLM: int64
    assert openai_body(request(-5), model="m", cache_salt=False, continuous_usage=False)[1]["seed"] == -5  # dev: as vLLM
    assert chat_body(request(-1))[1]["seed"] == 2**64 - 1  # TGI's chat route: u64
    assert generate_body(request(-(2**63), "text"))["parameters"]["seed"] == 2**63  # TGI's /generate_stream: u64




def test_errors_say_where_the_limit_is_set_and_that_adapters_need_deploying(setup):
    gw, backend, key = setup
    headers = {"authorization": f"Bearer {key}"}
    error = _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 101}, headers), 400, param="max_tokens")
    assert error["message"] == "`max_tokens` is 101; your tenant's limit is 100 (console: Models › Max max tokens)."
    error = _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "model": "ft:tiny-chat:acme:zebra:1"}, headers), 404, "model_not_found")
    assert "only once it is deployed" in error["message"]  # said for any ft: name, so it reveals nothing
    assert "deployed" not in _openai_error(post(gw.url + "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, headers), 404)["message"]
    assert dev_stats(backend)["requests_started"] == 0


def test_huggingface_hubs_placeholder_model_means_the_default(setup):
    """InferenceClient(model=<gateway url>).chat_completion() sends model "dummy", as TGI expects; like "tgi" it means the default."""
    gw, backend, key = setup
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "model": "dummy", "max_tokens": 3}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-chat"


def test_max_tokens_beyond_the_context_is_400(world, setup):
    gw, backend, key = setup
    set_model_config(world.tenant, max_max_tokens=5000)
    time.sleep(0.4)
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2000}, {"authorization": f"Bearer {key}"})
    assert "context" in _openai_error(r, 400, param="max_tokens")["message"]
    assert dev_stats(backend)["requests_started"] == 0


def test_wrong_method_is_405(setup):
    gw, backend, key = setup
    r = post(gw.url + "/v1/chat/completions", None, {"authorization": f"Bearer {key}"}, method="GET")
    _openai_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_tgi_routes_answer_errors_in_tgi_shape(setup):
    gw, backend, key = setup
    r = post(gw.url + "/generate", {"parameters": {}}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 400 and set(r.json()) == {"error", "error_type"}
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": {"adapter_id": "ft:someone-else"}}, {"authorization": f"Bearer {key}"})
    assert r.status_code == 404 and r.json()["error_type"] == "model_not_found"
    assert dev_stats(backend)["requests_started"] == 0


def test_missing_invalid_and_unscoped_keys(world, setup):
    gw, backend, key = setup
    # Worded as /v1/files and /v1/fine_tuning word them (tests/finetune/test_api.py::test_auth_errors_are_the_gateways_exactly)
    missing = _openai_error(post(gw.url + "/v1/chat/completions", CHAT), 401, "invalid_api_key")
    assert (missing["type"], missing["message"]) == ("invalid_request_error", "Missing API key: send `Authorization: Bearer <key>`.")
    invalid = _openai_error(post(gw.url + "/v1/chat/completions", CHAT, {"authorization": f"Bearer {key[:-2]}xx"}), 401, "invalid_api_key")
    assert (invalid["type"], invalid["message"]) == ("invalid_request_error", "Invalid API key (unknown or revoked).")
    _openai_error(post(gw.url + "/v1/chat/completions", CHAT, {"authorization": "Bearer sk-nonsense"}), 401)
    _, finetune_only = make_key(world.tenant, scopes=["finetune"])
    expires_at = timezone.now() + timedelta(seconds=0.6)
    _, expiring = services.api_key_create(tenant=world.tenant, name="short", scopes=["inference"], actor=services.SYSTEM,
                                          expires_at=expires_at)
    time.sleep(0.4)
    _openai_error(post(gw.url + "/v1/chat/completions", CHAT, {"authorization": f"Bearer {finetune_only}"}), 403, "insufficient_scope")
    time.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()))
    expired = _openai_error(post(gw.url + "/v1/chat/completions", CHAT, {"authorization": f"Bearer {expiring}"}), 401, "expired_api_key")
    assert (expired["type"], expired["message"]) == ("invalid_request_error", "This API key has expired: create a new one in the console.")
    assert dev_stats(backend)["requests_started"] == 0


def test_revoked_key_is_refused_within_a_second_and_a_half(world, setup):
    gw, backend, key = setup
    headers = {"authorization": f"Bearer {key}"}
    assert post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2}, headers).status_code == 200
    api_key = services.ApiKey.objects.for_tenant(world.tenant).get()
    services.api_key_revoke(key=api_key, actor=services.SYSTEM)
    revoked_at = time.monotonic()
    while post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2}, headers).status_code != 401:
        assert time.monotonic() - revoked_at < 1.5, "revocation not effective within 1.5 s"
        time.sleep(0.05)


def test_suspended_tenant_gets_a_clear_403(world, setup):
    gw, backend, key = setup
    services.tenant_set_status(tenant=world.tenant, status=Tenant.Status.SUSPENDED, actor=services.SYSTEM, reason="unpaid invoice")
    time.sleep(0.5)
    error = _openai_error(post(gw.url + "/v1/chat/completions", CHAT, {"authorization": f"Bearer {key}"}), 403, "tenant_suspended")
    assert error["message"] == "The account 'acme' is suspended (unpaid invoice): inference is disabled. Contact support."


def test_models_list_shows_what_the_tenant_may_call(world, setup):
    gw, backend, key = setup
    models = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0).models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("tiny-chat", "platform")]


def test_metrics_are_served_to_loopback_and_count_requests(setup):
    gw, backend, key = setup
    post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2}, {"authorization": f"Bearer {key}"})
    r = post(gw.url + "/metrics", None, method="GET")
    assert r.status_code == 200
    assert 'gateway_requests_total{endpoint="chat",status="200",tenant="acme"}' in r.text
    assert "gateway_backend_healthy" in r.text


def test_health_is_persisted_for_the_admin(world, gateway_factory):
    from tests.support.gateway import closed_port_url

    make_pool("shared", make_base_model(), [closed_port_url()])
    gateway_factory(health_persist_s=0.2)
    backend = Backend.objects.get()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        backend.refresh_from_db()
        if not backend.healthy and backend.last_checked_at:
            break
        time.sleep(0.1)
    assert not backend.healthy and "/health failed" in backend.last_error


# ---- hostile JSON: nesting and lone surrogates (issue 12, item 10) ---------------------------------------

DEEP_MESSAGES = b'{"model": "tiny-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
LONE = "\\ud800"  # JSON escape of half an emoji: decodes to a str that is not valid Unicode
PAIR = "\\ud83d\\ude00"  # a valid surrogate pair escape: 😀


def nested(depth: int) -> bytes:
    return b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "user": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_the_depth_scan_counts_brackets_outside_strings_only():
    from common.parsers import MAX_JSON_DEPTH, json_depth_exceeds

    assert not json_depth_exceeds(nested(MAX_JSON_DEPTH)) and json_depth_exceeds(nested(MAX_JSON_DEPTH + 1))
    brackets_in_strings = json.dumps({"content": "[{" * 1000, "stop": ['\\"[[[[', "\\\\" + "[" * 100]}).encode()
    assert not json_depth_exceeds(brackets_in_strings)
    alternating = json.dumps([{"a": [{"b": [{}]}]}] * 3)  # depth 6, innermost pairs of both kinds
    assert not json_depth_exceeds(alternating.encode(), 6) and json_depth_exceeds(alternating.encode(), 5)
    assert json_depth_exceeds(b"[" * 1_000_000) and json_depth_exceeds(b"[{}" * 100 + b"]" * 100)
    assert json_depth_exceeds(DEEP_MESSAGES)
    assert not json_depth_exceeds(b"[" + b"[0]," * 10_000 + b"[0]]")  # wide, not deep


@pytest.mark.parametrize("body", [DEEP_MESSAGES, b"[" * 1_000_000, nested(65)], ids=["messages-100000-deep", "brackets-1e6", "65-deep"])
def test_deep_nesting_is_a_400_from_the_parser_not_a_recursion_error(body):
    from serving.gateway.errors import ApiError
    from serving.gateway.parsing import parse_json

    with pytest.raises(ApiError) as refused:
        parse_json(body)
    assert (refused.value.status, refused.value.type, refused.value.code) == (400, "invalid_request_error", "json_too_deep")
    assert "nested deeper than 64 levels" in refused.value.message
    assert parse_json(nested(64))["model"] == "tiny-chat"


@pytest.mark.parametrize("body, param", [
    (f'{{"messages": [{{"role": "user", "content": "a{LONE}b"}}]}}', "messages[0].content"),
    (f'{{"prompt": "x", "stop": ["ok", "\\udfff"]}}', "stop[1]"),
    (f'{{"inputs": "x", "parameters": {{"adapter_id": "{LONE}"}}}}', "parameters.adapter_id"),
    (f'{{"messages": [{{"role": "user", "content": "x", "{LONE}": 1}}]}}', "messages[0]"),
])
def test_a_lone_surrogate_is_refused_naming_its_field(body, param):
    from serving.gateway.errors import ApiError
    from serving.gateway.parsing import parse_json

    for raw in (body.encode(), body.encode("utf-16")):  # escaped, and raw in a UTF-16 body (json.loads reads both)
        with pytest.raises(ApiError) as refused:
            parse_json(raw)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, "invalid_unicode", param)
        assert "lone UTF-16 surrogate" in refused.value.message and "send valid Unicode" in refused.value.message
    raw_utf8 = body.replace(LONE, "\ud800").replace("\\udfff", "\udfff").encode("utf-8", "surrogatepass")
    with pytest.raises(ApiError):
        parse_json(raw_utf8)  # the surrogate's UTF-8 bytes, which json.loads decodes "surrogatepass"


def test_emoji_as_a_surrogate_pair_escape_is_valid_json():
    from serving.gateway.parsing import parse_chat, parse_json

    data = parse_json(f'{{"model": "tiny-chat", "messages": [{{"role": "user", "content": "a{PAIR}b"}}]}}'.encode())
    assert parse_chat(data).messages[0]["content"] == "a😀b"


def test_tool_call_arguments_nested_too_deep_are_refused():
    """Tool-call arguments are JSON in a string: the body scan does not see their brackets, the prompt count parses them."""
    from serving.gateway.errors import ApiError
    from serving.gateway.parsing import parse_chat

    call = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {"name": "f", "arguments": "[" * 100_000}}]}
    with pytest.raises(ApiError) as refused:
        parse_chat({**CHAT, "messages": [{"role": "user", "content": "hi"}, call]})
    assert (refused.value.code, refused.value.param) == ("json_too_deep", "messages[1].tool_calls[0].function.arguments")


@pytest.fixture
def big_bodies(world, gateway_factory):
    """A gateway that reads bodies of up to 1 MiB (its default), on a simulated backend."""
    url, stop = sim_backend()
    make_pool("shared", make_base_model(), [url])
    _, key = make_key(world.tenant)
    yield gateway_factory(), url, {"authorization": f"Bearer {key}", "content-type": "application/json"}
    stop()


ROUTES_AND_SHAPES = [("/v1/chat/completions", "openai"), ("/v1/completions", "openai"), ("/generate", "tgi"),
                     ("/generate_stream", "tgi"), ("/", "tgi")]


@pytest.mark.parametrize("path, shape", ROUTES_AND_SHAPES)
def test_every_route_answers_deep_json_with_a_400_in_its_shape(big_bodies, path, shape):
    gw, backend, headers = big_bodies
    for body in (DEEP_MESSAGES, b"[" * 1_000_000):
        r = post(gw.url + path, body, headers)
        if shape == "openai":
            error = _openai_error(r, 400, "json_too_deep")
            assert error["type"] == "invalid_request_error" and "nested deeper than 64 levels" in error["message"]
        else:
            assert r.status_code == 400 and r.json()["error_type"] == "json_too_deep", r.text
            assert "nested deeper than 64 levels" in r.json()["error"]
    assert dev_stats(backend)["requests_started"] == 0


@pytest.mark.parametrize("path, shape", ROUTES_AND_SHAPES)
def test_every_route_refuses_a_lone_surrogate_and_takes_a_pair(big_bodies, path, shape):
    gw, backend, headers = big_bodies

    def body(text: str) -> bytes:
        if path == "/v1/chat/completions":
            return f'{{"model": "tiny-chat", "max_tokens": 2, "messages": [{{"role": "user", "content": "{text}"}}]}}'.encode()
        if path == "/v1/completions":
            return f'{{"model": "tiny-chat", "max_tokens": 2, "prompt": "{text}"}}'.encode()
        return f'{{"inputs": "{text}", "parameters": {{"max_new_tokens": 2}}, "stream": {str(path == "/").lower()}}}'.encode()

    r = post(gw.url + path, body(f"a{LONE}b"), headers)
    param = {"/v1/chat/completions": "messages[0].content", "/v1/completions": "prompt"}.get(path, "inputs")
    if shape == "openai":
        assert "lone UTF-16 surrogate (\\ud800)" in _openai_error(r, 400, "invalid_unicode", param)["message"]
    else:
        assert r.status_code == 400 and r.json()["error_type"] == "invalid_unicode", r.text
        assert f"`{param}` contains a lone UTF-16 surrogate" in r.json()["error"]
    assert dev_stats(backend)["requests_started"] == 0
    assert post(gw.url + path, body(f"a{PAIR}b"), headers).status_code == 200
    assert "a😀b" in json.dumps(dev_stats(backend)["last_request"]["body"], ensure_ascii=False)


def test_a_refused_lone_surrogate_counts_nothing(world, gateway_factory):
    """On a real tokenizer the lone surrogate reached the backend, which failed (a 502), and the request had taken a
    place in the tenant's requests per minute and its ledger. Now: a 400 before admission."""
    backend = tiny_backend()
    make_pool("shared", make_base_model(), [backend["url"]])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=5, quota_tokens=10_000,
                           quota_window="day", quota_mode="hard")
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    started = dev_stats(backend["url"])["requests_started"]
    chat = f'{{"model": "tiny-chat", "max_tokens": 2, "messages": [{{"role": "user", "content": "a{LONE}b"}}]}}'
    for path, body in [("/v1/chat/completions", chat), ("/v1/completions", f'{{"max_tokens": 2, "prompt": "{LONE}"}}'),
                       ("/generate", f'{{"inputs": "{LONE}", "parameters": {{"max_new_tokens": 2}}}}')]:
        r = post(gw.url + path, body.encode(), headers)
        assert r.status_code == 400, r.text
    assert dev_stats(backend["url"])["requests_started"] == started
    assert settled_day_counters(world.tenant) == {"used": 0, "reserved": 0}
    assert usage_records(world.tenant) == []
    answers = [post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 2}, headers) for _ in range(2)]
    assert [r.status_code for r in answers] == [200, 200]
    # Each refused one counted one of the 5 requests a minute, as every request does (docs/limits.md); no tokens.
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == ["1", "0"]
    records = wait_for(lambda: len(usage_records(world.tenant)) == 2 and usage_records(world.tenant))
    assert [r.status for r in records] == ["ok", "ok"]
    assert settled_day_counters(world.tenant)["used"] == sum(r.json()["usage"]["total_tokens"] for r in answers)


# ---- hostile JSON from a backend ------------------------------------------------------------------------------


class ScriptedBackend:
    """An OpenAI-compatible backend (pool kind vllm) that answers every generation with the SSE lines in `lines`."""

    def __init__(self):
        import asyncio
        import threading
        from concurrent.futures import Future

        self.lines: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        started: Future = Future()
        threading.Thread(target=self._main, args=(started,), daemon=True, name="scripted-backend").start()
        self.url = started.result(timeout=10)

    def _main(self, started) -> None:
        from aiohttp import web

        from tests.support.gateway import serve_forever

        async def health(request):
            return web.Response()

        async def generate(request):
            await request.read()
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for line in self.lines:
                await resp.write(b"data: " + line + b"\n\n")
            return resp

        app = web.Application(client_max_size=4 << 20)
        app.router.add_get("/health", health)
        app.router.add_post("/v1/chat/completions", generate)
        app.router.add_post("/v1/completions", generate)
        serve_forever(self.loop, app, started)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def _chunk(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content},
                                                                                   "finish_reason": None}]}).encode()


@pytest.fixture
def scripted(world, gateway_factory):
    backend = ScriptedBackend()
    make_pool("vllm-shared", make_base_model(), [backend.url], kind="vllm")
    _, key = make_key(world.tenant)
    yield gateway_factory(), backend, {"authorization": f"Bearer {key}"}
    backend.stop()


@pytest.mark.parametrize("line", [b'{"choices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"[" * 1_000_000,
                                  b'{"choices": [{"index": 0, "delta": {"content": "a\\ud800"}, "finish_reason": null}]}',
                                  b"[1, 2]"], ids=["deep", "brackets-1e6", "lone-surrogate", "not-an-object"])
def test_a_backend_answer_the_gateway_cannot_read_is_a_502_that_costs_nothing(world, scripted, line):
    gw, backend, headers = scripted
    backend.lines = [line]
    r = post(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 5}, headers)
    error = _openai_error(r, 502, "backend_error")
    assert error["type"] == "server_error" and "unreadable" in error["message"]
    r = post(gw.url + "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 5}}, headers)
    assert r.status_code == 502 and r.json()["error_type"] == "backend_error", r.text
    records = wait_for(lambda: len(usage_records(world.tenant)) == 2 and usage_records(world.tenant))
    assert [(u.status, u.input_tokens, u.output_tokens) for u in records] == [("error", 0, 0)] * 2  # before its first token


def test_a_backend_that_turns_unreadable_mid_stream_interrupts_it_and_bills_what_was_delivered(world, scripted):
    gw, backend, headers = scripted
    backend.lines = [_chunk("Hel"), _chunk("lo"), b'{"choices": ' + b"[" * 100_000]
    status, lines = stream_lines(gw.url + "/v1/chat/completions", {**CHAT, "max_tokens": 5, "stream": True}, headers)
    assert status == 200
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "Hello"
    assert events[-1]["error"]["code"] == "backend_interrupted"
    record = wait_for(lambda: usage_records(world.tenant))[0]
    assert (record.status, record.output_tokens) == ("interrupted", 2)


def test_a_prompt_whose_length_alone_exceeds_the_context_is_refused_with_at_least(tiny_model_path):
    """Refused for the price of its length (serving.tokencount.PromptCounter.at_least), in OpenAI's words."""
    from types import SimpleNamespace

    from serving.gateway.errors import ApiError
    from serving.gateway.parsing import _count, fit_context, parse_chat
    from serving.tokencount import load_counter

    pool = SimpleNamespace(counter=load_counter(tiny_model_path), kind="vllm", context_length=4096)
    req = parse_chat({"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 200_000}]})
    backend_request = SimpleNamespace(kind="chat", messages=req.messages, tools=None, max_tokens=16)
    prompt = _count(backend_request, pool)
    assert prompt.at_least
    with pytest.raises(ApiError) as refused:
        fit_context(req, backend_request, prompt, pool.context_length)
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
    assert f"resulted in at least {prompt.tokens} tokens" in refused.value.message
