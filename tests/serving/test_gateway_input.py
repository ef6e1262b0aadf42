"""Bad input is refused in the client's error shape and never reaches a backend; auth, suspension, revocation."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone
from openai import OpenAI

from serving.models import Backend
from tenants import services
from tenants.models import Tenant
from tests.serving.test_gateway_support import (
    dev_stats,
    make_base_model,
    make_key,
    make_pool,
    post,
    set_model_config,
    sim_backend,
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
    from tests.serving.test_gateway_support import closed_port_url

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
