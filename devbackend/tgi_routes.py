"""TGI's native API: /generate, /generate_stream and /info, quirks included.

Reproduced on purpose: an unknown `adapter_id` silently runs the base model (TGI issue #2505); a request
without `parameters` samples while one with `parameters` is greedy unless told otherwise; /generate_stream
always answers 200 and reports errors as an event; stream details come only with `details: true`.
"""

from __future__ import annotations

import time

from aiohttp import web

from .generation import (Timing, backend_of, collect, number, produce, read_json, sse, start_sse, string_list,
                         visible_text)
from .protocol import BackendError, GenerationParams, Token, finalize_params, validation_error
from .state import Backend

TGI_VERSION = "3.3.7-devbackend"


def tgi_error(error: BackendError) -> web.Response:
    return web.json_response({"error": error.message, "error_type": error.error_type}, status=error.status)


def parse_request(body: dict) -> tuple[str, GenerationParams, dict]:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise validation_error("`inputs` must be a string")
    # TGI's serde defaults: no `parameters` at all means do_sample=true; inside `parameters` it defaults to false.
    parameters = body.get("parameters", {"do_sample": True})
    if not isinstance(parameters, dict):
        raise validation_error("`parameters` must be an object")
    params = GenerationParams(
        max_new_tokens=0,
        requested_max_new_tokens=number(parameters, "max_new_tokens", int),
        do_sample=bool(parameters.get("do_sample", False)),
        temperature=number(parameters, "temperature"),
        top_p=number(parameters, "top_p"),
        top_k=number(parameters, "top_k", int),
        seed=number(parameters, "seed", int),
        stop=string_list(parameters.get("stop"), "stop"),
        frequency_penalty=number(parameters, "frequency_penalty") or None,  # TGI's /generate: no presence penalty
    )
    return inputs, params, parameters


def resolve_adapter(backend: Backend, adapter_id) -> str | None:
    """A loaded adapter, else the base model: silently, exactly like TGI."""
    return adapter_id if adapter_id in backend.engine.adapters else None


def _details(tokens: list[Token], params: GenerationParams, input_length: int, stream: bool) -> dict:
    details = {"finish_reason": tokens[-1].finish_reason, "generated_tokens": len(tokens), "seed": params.seed}
    if stream:
        return {**details, "input_length": input_length}
    return {**details, "prefill": [], "tokens": [token.as_tgi() for token in tokens]}


async def _prepare(request: web.Request) -> tuple[Backend, dict, str, GenerationParams, dict, str | None]:
    backend = backend_of(request)
    body = await read_json(request)
    backend.record(request.path, body)
    inputs, params, parameters = parse_request(body)
    return backend, body, inputs, params, parameters, resolve_adapter(backend, parameters.get("adapter_id"))


async def generate(request: web.Request, as_list: bool = False) -> web.StreamResponse:
    timing = Timing()
    try:
        backend, body, inputs, params, parameters, adapter = await _prepare(request)
        cfg = backend.config
        async with backend.admit(request, adapter) as ticket:
            timing.admitted = time.monotonic()
            prompt = backend.engine.encode(inputs)
            finalize_params(params, len(prompt), cfg.max_input_tokens, cfg.max_total_tokens)
            tokens = await collect(backend, ticket, prompt, params, adapter)
        if not ticket.finished:
            return web.Response(status=499)  # nobody is listening any more
    except BackendError as error:
        return tgi_error(error)
    text = visible_text(tokens)
    answer = {"generated_text": inputs + text if parameters.get("return_full_text") else text}
    if parameters.get("details"):
        answer["details"] = _details(tokens, params, len(prompt), stream=False)
    headers = timing.headers(backend.engine.compute_type, len(prompt), len(tokens))
    return web.json_response([answer] if as_list else answer, headers=headers)


async def generate_stream(request: web.Request) -> web.StreamResponse:
    response = None
    try:
        backend, body, inputs, params, parameters, adapter = await _prepare(request)
        cfg = backend.config
        async with backend.admit(request, adapter) as ticket:
            prompt = backend.engine.encode(inputs)
            finalize_params(params, len(prompt), cfg.max_input_tokens, cfg.max_total_tokens)
            response = await start_sse(request, {"x-compute-type": backend.engine.compute_type})
            tokens: list[Token] = []
            async for batch in produce(backend, ticket, prompt, params, adapter):
                events = []
                for token in batch:
                    tokens.append(token)
                    event = {"index": len(tokens), "token": token.as_tgi(), "generated_text": None, "details": None}
                    if token.finish_reason:
                        text = visible_text(tokens)
                        event["generated_text"] = inputs + text if parameters.get("return_full_text") else text
                        if parameters.get("details"):
                            event["details"] = _details(tokens, params, len(prompt), stream=True)
                        ticket.finished = True
                    events.append(sse(event))
                if events:
                    await response.write(b"".join(events))
    except BackendError as error:
        if response is None and error.error_type == "injected":
            return tgi_error(error)  # an injected status stands for a proxy in front: a real HTTP status
        response = response or await start_sse(request)
        await response.write(sse({"error": error.message, "error_type": error.error_type}))
    return response


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """TGI's `POST /` (what huggingface_hub's InferenceClient calls): `stream` picks the route; a list answer."""
    try:
        body = await read_json(request)
    except BackendError as error:
        return tgi_error(error)
    if body.get("stream"):
        return await generate_stream(request)
    return await generate(request, as_list=True)


async def info(request: web.Request) -> web.Response:
    backend = backend_of(request)
    cfg = backend.config
    return web.json_response({
        "model_id": backend.engine.model_id,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": cfg.max_concurrent_requests,
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_input_tokens": cfg.max_input_tokens,
        "max_total_tokens": cfg.max_total_tokens,
        "validation_workers": 2,
        "max_client_batch_size": 4,
        "router": "text-generation-router",
        "version": TGI_VERSION,
        "sha": None,
        "docker_label": None,
    })


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", compat_generate)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/info", info)
