"""Service routes every flavor answers: /health, /tokenize and /metrics (Prometheus text, hand-written)."""

from __future__ import annotations

import time

from aiohttp import web

from .generation import backend_of, read_json
from .protocol import BackendError, validation_error
from .tgi_routes import tgi_error


async def health(request: web.Request) -> web.Response:
    if not backend_of(request).faults.health:
        return web.json_response({"error": "unhealthy", "error_type": "healthcheck"}, status=503)
    return web.Response()


async def tokenize(request: web.Request) -> web.Response:
    """TGI's shape for `{"inputs"}` (a list of tokens), vLLM's for `{"prompt"}` or `{"messages"}`."""
    backend = backend_of(request)
    engine = backend.engine
    try:
        body = await read_json(request)
        if isinstance(body.get("inputs"), str):
            return web.json_response(engine.tokenize(body["inputs"]))
        if isinstance(body.get("messages"), list):
            text = engine.render_chat(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise validation_error("expected `inputs` (TGI), `prompt` or `messages` (vLLM)")
    except BackendError as error:
        return tgi_error(error)
    tokens = list(engine.encode(text))
    return web.json_response({"count": len(tokens), "max_model_len": backend.config.max_total_tokens,
                              "tokens": tokens})


def _line(name: str, value: float, labels: str = "") -> str:
    return f"{name}{{{labels}}} {value}" if labels else f"{name} {value}"


async def metrics(request: web.Request) -> web.Response:
    backend = backend_of(request)
    stats, engine = backend.stats, backend.engine
    running = ",".join(sorted(engine.adapters))
    lines = [
        _line("tgi_request_count", stats.requests_started),
        _line("tgi_request_success", stats.requests_completed),
        _line("tgi_request_failure", stats.requests_failed),
        _line("tgi_queue_size", 0),
        _line("tgi_batch_current_size", stats.in_flight),
        _line("vllm:num_requests_running", stats.in_flight),
        _line("vllm:prompt_tokens_total", stats.prompt_tokens),
        _line("vllm:generation_tokens_total", stats.generated_tokens),
        _line("vllm:lora_requests_info", time.time(),
              f'running_lora_adapters="{running}",waiting_lora_adapters="",max_lora="{len(engine.adapters)}"'),
        _line("devbackend_requests_cancelled_total", stats.requests_cancelled),
        _line("devbackend_cache_salts", len(stats.cache_salts)),
    ]
    lines += [_line("devbackend_adapter_requests_total", count, f'adapter="{name}"')
              for name, count in sorted(stats.adapter_requests.items())]
    return web.Response(body=("\n".join(lines) + "\n").encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/metrics", metrics)
