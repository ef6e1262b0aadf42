"""TGI: /generate_stream for text prompts (token events, in-stream errors, details), /v1/chat/completions for chat."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import aiohttp

from serving.drivers.base import (
    BackendError,
    BackendRequest,
    Finish,
    TokenDelta,
    connect_error,
    in_stream_error,
    sse_events,
    raise_for_status,
)
from serving.drivers.openai_compat import openai_body, openai_stream

FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def generate_body(request: BackendRequest) -> dict:
    s = request.sampling
    params: dict = {"max_new_tokens": request.max_tokens, "do_sample": s.do_sample, "details": True}
    if s.do_sample:  # any warper makes TGI sample, so greedy requests carry none
        if s.temperature is not None:
            params["temperature"] = s.temperature
        if s.top_p is not None:
            params["top_p"] = s.top_p
        if s.top_k is not None:
            params["top_k"] = s.top_k
    if s.frequency_penalty is not None:  # TGI's /generate has no presence penalty (refused by the gateway)
        params["frequency_penalty"] = s.frequency_penalty
    if s.seed is not None:
        params["seed"] = s.seed % 2**64  # TGI's seed is a u64; an OpenAI client's may be negative (the same 64 bits)
    if s.stop:
        params["stop"] = s.stop
    if request.adapter:
        params["adapter_id"] = request.adapter
    return {"inputs": request.prompt, "parameters": params, "stream": True}


async def generate_stream(session: aiohttp.ClientSession, url: str, body: dict) -> AsyncIterator:
    try:
        resp = await session.post(url, json=body)
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
        raise connect_error(exc, url) from exc
    started = False
    try:
        await raise_for_status(resp)
        prompt_header = resp.headers.get("x-prompt-tokens")
        async for event in sse_events(resp):
            err = in_stream_error(event, started=started)
            if err is not None:
                raise err
            token = event.get("token") or {}
            details = event.get("details")
            last = details is not None or event.get("generated_text") is not None
            started = True
            yield TokenDelta("" if token.get("special") else token.get("text", ""), 1, token or None, last=last)
            if last:
                details = details or {}
                prompt = details.get("input_length", prompt_header)
                resp.release()
                yield Finish(
                    FINISH_REASONS.get(details.get("finish_reason"), "stop"),
                    int(prompt) if prompt is not None else None,
                    details.get("generated_tokens"),
                    details.get("seed"),
                    details.get("finish_reason") == "stop_sequence",
                )
                return
        raise BackendError("the backend closed the stream before the end of the answer", error_type="incomplete_generation")
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise BackendError(f"backend stream failed: {exc.__class__.__name__}", error_type="incomplete_generation", retryable=not started) from exc
    finally:
        resp.close()  # no-op after release(); otherwise drops the connection so the backend cancels


def chat_body(request: BackendRequest) -> tuple[str, dict]:
    """TGI's chat route: `model` is the adapter id, or "tgi" for the base model; one tool call per answer; u64 seeds."""
    return openai_body(request, model=request.adapter or "tgi", cache_salt=False, continuous_usage=False,
                       parallel_tool_calls=False, unsigned_seed=True)


class TGIDriver:
    kind = "tgi"

    def stream(self, session: aiohttp.ClientSession, backend_url: str, request: BackendRequest) -> AsyncIterator:
        if request.kind == "chat":
            path, body = chat_body(request)
            return openai_stream(session, backend_url + path, body, chat=True)
        return generate_stream(session, backend_url + "/generate_stream", generate_body(request))
