"""A prompt beyond the model's context: the backends' refusals (TGI's, vLLM's, the dev backend's wording) answered as
OpenAI answers them: 400 `context_length_exceeded` naming `messages` / `prompt` (TGI's shape and `inputs` on /generate)."""

from __future__ import annotations

import json

import pytest

from serving.drivers.base import context_overflow
from tests.support.gateway import make_base_model, make_key, make_pool, post, sim_backend

LIMIT = 64  # the backend's max total tokens; the simulator counts a token per 4 characters


@pytest.mark.parametrize("message, figures", [
    # TGI 2.x/3.x (the router's validation errors, as its HTTP and stream errors carry them)
    ("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 4000 `inputs` tokens and 200 "
     "`max_new_tokens`", (4096, 4000, 200)),
    ("`inputs` must have less than 4095 tokens. Given: 9032", (4095, 9032, None)),
    # TGI 0.x (no backticks)
    ("input tokens + max_new_tokens must be <= 2048. Given: 2000 input tokens and 100 max_new_tokens", (2048, 2000, 100)),
    ("inputs must have less than 1024 tokens. Given: 1500", (1024, 1500, None)),
    # the dev backend
    ("`inputs` tokens must be <= 1023. Given: 9032", (1023, 9032, None)),
    # vLLM, as its releases worded it
    ("This model's maximum context length is 32768 tokens. However, you requested 33348 tokens (32836 in the messages, 512 in "
     "the completion). Please reduce the length of the messages or completion.", (32768, 32836, 512)),
    ("This model's maximum context length is 32768 tokens. However, you requested 32836 tokens in the messages, Please "
     "reduce the length of the messages.", (32768, 32836, None)),
    ("This model's maximum context length is 4096 tokens. However, your request has 4100 input tokens. Please reduce the "
     "length of the input messages. None", (4096, 4100, None)),
    ("'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is 4096 tokens and your "
     "request has 2778 input tokens (8000 > 4096 - 2778). None", (4096, 2778, 8000)),
    ("This model's maximum context length is 32768 tokens. However, you requested 512 output tokens and your prompt contains "
     "at least 32769 input tokens, for a total of at least 33281 tokens. Please reduce the length of the input prompt or the "
     "number of requested output tokens.", (32768, 32769, 512)),
    ("This model's maximum context length is 32768 tokens. However, you requested 512 output tokens and your prompt contains "
     "200000 characters (more than 131072 characters, which is the upper bound for 32768 input tokens). Please reduce the "
     "length of the input prompt or the number of requested output tokens.", (32768, None, 512)),
    ("The decoder prompt (length 5000) is longer than the maximum model length of 4096. Make sure that `max_model_len` is no "
     "smaller than the number of text tokens.", (4096, 5000, None)),
    # not about the context
    ("`top_p` must be > 0.0 and < 1.0", None),
    ("The model `x` does not exist.", None),
])
def test_backend_context_refusals_are_recognised(message, figures):
    overflow = context_overflow(message)
    assert (overflow and (overflow.limit, overflow.input_tokens, overflow.completion_tokens)) == figures


@pytest.fixture(params=["dev", "vllm"])
def small_context(request, world, gateway_factory):
    """A backend with a 64-token context (flavor vllm answers 400 BadRequestError where TGI and dev say 422)."""
    url, stop = sim_backend(max_total_tokens=LIMIT, flavor=request.param)
    make_pool("shared", make_base_model(), [url])
    _, key = make_key(world.tenant)
    yield gateway_factory(), {"authorization": f"Bearer {key}"}
    stop()


def _openai_context_error(r, param: str) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", param)
    assert "`inputs`" not in error["message"]  # nothing of the backend's wording
    return error["message"]


def test_chat_beyond_the_context(small_context):
    gw, auth = small_context
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 20}
    message = _openai_context_error(post(gw.url + "/v1/chat/completions", body, auth), "messages")
    # The simulator counts the rendered chat (its template markers included): 59 tokens.
    assert message == ("This model's maximum context length is 64 tokens. However, your messages resulted in 79 tokens (59 in the "
                       "messages, 20 in the completion). Please reduce the length of the messages or completion.")
    streamed = post(gw.url + "/v1/chat/completions", {**body, "stream": True}, auth)
    assert _openai_context_error(streamed, "messages") == message  # refused before the stream starts: a plain 400


def test_completion_prompt_beyond_the_context(small_context):
    gw, auth = small_context
    body = {"model": "tiny-chat", "prompt": "x" * 400, "max_tokens": 5}
    message = _openai_context_error(post(gw.url + "/v1/completions", body, auth), "prompt")
    assert message == ("This model's maximum context length is 63 tokens. However, your prompt resulted in 100 tokens. "
                       "Please reduce the length of the prompt.")


def test_tgi_routes_beyond_the_context(small_context):
    gw, auth = small_context
    body = {"inputs": "x" * 200, "parameters": {"max_new_tokens": 30}}
    for path in ("/generate", "/generate_stream"):
        r = post(gw.url + path, body, auth)
        assert r.status_code == 400, r.text
        assert r.json() == {"error": "This model's maximum context length is 64 tokens. However, your inputs resulted in 80 "
                                     "tokens (50 in the inputs, 30 in `max_new_tokens`). Please reduce the length of the "
                                     "inputs or `max_new_tokens`.", "error_type": "validation"}



def test_the_answer_falls_back_on_what_the_gateway_asked_for():
    from serving.drivers.base import ContextOverflow
    from serving.gateway.errors import context_length_exceeded

    err = context_length_exceeded("chat", ContextOverflow(4096), max_tokens=300)
    assert (err.status, err.code, err.param) == (400, "context_length_exceeded", "messages")
    assert err.message == ("This model's maximum context length is 4096 tokens. However, your messages and the 300 tokens asked "
                           "for the completion do not fit in it. Please reduce the length of the messages or completion.")
    err = context_length_exceeded("completions", ContextOverflow(4096, None, 512), max_tokens=300)
    assert "the 512 tokens asked for the completion" in err.message and err.param == "prompt"
    assert json.loads(context_length_exceeded("generate", ContextOverflow(4096), 9).tgi_body())["error_type"] == "validation"
