"""The gateway's pipeline stages, each without a server: the endpoint type, the pure request rewriting, the
accounting object (settle and record exactly once, on every exit path), the response sender and the relays."""

from __future__ import annotations

import json

import pytest

from serving.drivers.base import ContextOverflow
from serving.gateway import endpoints as E
from serving.gateway.errors import ApiError, context_length_exceeded
from serving.gateway.parsing import parse_request

CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ---- the endpoint type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path, name, protocol, method", [
    ("/v1/chat/completions", "chat", "openai", "POST"), ("/v1/completions", "completions", "openai", "POST"),
    ("/generate", "generate", "tgi", "POST"), ("/generate_stream", "generate_stream", "tgi", "POST"),
    ("/", "generate?", "tgi", "POST"), ("/v1/models", "models", "openai", "GET"), ("/v1/models/ft:x", "model", "openai", "GET"),
    ("/metrics", "metrics", "openai", "GET"),
])
def test_each_path_has_one_endpoint_that_knows_its_protocol(path, name, protocol, method):
    endpoint = E.endpoint_for(path)
    assert (endpoint.name, endpoint.protocol, endpoint.method) == (name, protocol, method)
    assert endpoint.tgi == (protocol == "tgi")
    assert endpoint.inference == (name not in ("models", "model", "metrics"))


def test_an_unknown_path_has_no_endpoint():
    assert E.endpoint_for("/v1/embeddings") is None


def test_tgi_routes_fix_streaming_and_openai_bodies_decide():
    assert (E.GENERATE.stream, E.GENERATE_STREAM.stream, E.CHAT.stream, E.COMPLETIONS.stream) == (False, True, None, None)


@pytest.mark.parametrize("stream, resolved", [(True, E.GENERATE_STREAM), (False, E.GENERATE), (None, E.GENERATE), ("true", E.GENERATE)])
def test_tgi_post_root_is_resolved_by_the_bodys_stream(stream, resolved):
    data = {"inputs": "hi"} if stream is None else {"inputs": "hi", "stream": stream}
    assert E.TGI_COMPAT.resolve(data) is resolved


def test_other_endpoints_resolve_to_themselves():
    for endpoint in (E.CHAT, E.COMPLETIONS, E.GENERATE, E.GENERATE_STREAM):
        assert endpoint.resolve({"stream": True}) is endpoint


def test_errors_are_shaped_by_the_protocol():
    err = ApiError(400, "Bad.", param="model", code="invalid_value")
    assert json.loads(E.CHAT.error_body(err)) == {"error": {"message": "Bad.", "type": "invalid_request_error", "param": "model",
                                                            "code": "invalid_value"}}
    assert json.loads(E.GENERATE.error_body(err)) == {"error": "Bad.", "error_type": "invalid_value"}
    assert E.TGI_COMPAT.error_body(err) == E.GENERATE_STREAM.error_body(err)


def test_in_band_errors_are_shaped_by_the_protocol():
    openai = E.COMPLETIONS.error_event("Cut.", code="backend_interrupted", tgi_type="incomplete_generation")
    tgi = E.GENERATE_STREAM.error_event("Cut.", code="backend_interrupted", tgi_type="incomplete_generation")
    assert json.loads(openai.removeprefix(b"data: ")) == {"error": {"message": "Cut.", "type": "server_error", "param": None,
                                                                     "code": "backend_interrupted"}}
    assert json.loads(tgi.removeprefix(b"data:")) == {"error": "Cut.", "error_type": "incomplete_generation"}


@pytest.mark.parametrize("endpoint, data", [
    (E.CHAT, CHAT_BODY), (E.COMPLETIONS, {"model": "m", "prompt": "hi"}),
    (E.GENERATE, {"inputs": "hi"}), (E.GENERATE_STREAM, {"inputs": "hi"}),
])
def test_parse_request_parses_by_endpoint(endpoint, data):
    req = parse_request(endpoint, data)
    assert req.endpoint is endpoint
    assert req.stream == bool(endpoint.stream)


def test_the_endpoint_names_the_prompt_and_max_tokens_in_context_errors():
    overflow = ContextOverflow(100, 90, 20)
    assert context_length_exceeded(E.CHAT, overflow, 20).param == "messages"
    assert context_length_exceeded(E.COMPLETIONS, overflow, 20).param == "prompt"
    tgi = context_length_exceeded(E.GENERATE_STREAM, overflow, 20)
    assert (tgi.param, tgi.tgi_type) == ("inputs", "validation") and "`max_new_tokens`" in tgi.message
    assert context_length_exceeded("generate", overflow, 20).message == tgi.message  # by its name too
    assert E.GENERATE.max_tokens_param == "parameters.max_new_tokens" and E.CHAT.max_tokens_param == "max_tokens"

