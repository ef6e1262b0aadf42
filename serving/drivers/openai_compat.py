"""The OpenAI-compatible streaming protocol, shared by vLLM, TGI's /v1 routes and the dev backend."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import aiohttp

from serving.drivers.base import (
    BackendError,
    BackendRequest,
    Finish,
    TokenDelta,
    ToolCallDelta,
    connect_error,
    in_stream_error,
    raise_for_status,
    sse_events,
)


def openai_body(request: BackendRequest, *, model: str, cache_salt: bool, continuous_usage: bool,
                parallel_tool_calls: bool = True, unsigned_seed: bool = False) -> tuple[str, dict]:
    """(path, JSON body). Greedy is temperature 0 (TGI's chat route samples whenever temperature is absent).

    `parallel_tool_calls`: whether the server knows the field (TGI does not: it makes one call per answer).
    `unsigned_seed`: the server's seed is a u64 (TGI), not an i64 (vLLM, OpenAI): the same 64 bits are sent."""
    s = request.sampling
    body: dict = {"model": model, "max_tokens": request.max_tokens, "stream": True,
                  "stream_options": {"include_usage": True, **({"continuous_usage_stats": True} if continuous_usage else {})},
                  "temperature": s.temperature if s.do_sample and s.temperature is not None else (1.0 if s.do_sample else 0.0)}
    if s.do_sample and s.top_p is not None:
        body["top_p"] = s.top_p
    if s.do_sample and s.top_k is not None and continuous_usage:  # vLLM extension
        body["top_k"] = s.top_k
    if s.presence_penalty is not None:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty is not None:
        body["frequency_penalty"] = s.frequency_penalty
    if s.seed is not None:
        body["seed"] = s.seed % 2**64 if unsigned_seed else (s.seed - 2**64 if s.seed >= 2**63 else s.seed)
    if s.stop:
        body["stop"] = s.stop
    if cache_salt and request.cache_salt:
        body["cache_salt"] = request.cache_salt
    if request.kind == "chat":
        body["messages"] = request.messages
        if request.tools:
            body["tools"] = request.tools
            if request.tool_choice is not None:
                body["tool_choice"] = request.tool_choice
            if parallel_tool_calls and request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt
    return "/v1/completions", body


async def openai_stream(session: aiohttp.ClientSession, url: str, body: dict, *, chat: bool) -> AsyncIterator:
    """Events from an OpenAI-style SSE stream (`stream_options.include_usage` on, so usage is known)."""
    try:
        resp = await session.post(url, json=body)
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
        raise connect_error(exc, url) from exc
    started = called = False
    finish_reason = None
    usage = None
    try:
        await raise_for_status(resp)
        async for event in sse_events(resp):
            err = in_stream_error(event, started=started)
            if err is not None:
                raise err
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content") if chat else choice.get("text")
                reason = choice.get("finish_reason")
                if reason:
                    finish_reason = reason
                for call in tool_call_fragments(delta.get("tool_calls")) if chat else ():
                    started = called = True
                    yield call
                if text or reason:
                    started = True
                    yield TokenDelta(text or "", 1 if text else 0, last=bool(reason))
        if finish_reason is None:
            raise BackendError("the backend closed the stream before the end of the answer", error_type="incomplete_generation")
        resp.release()  # finished cleanly: the connection may be reused
        yield Finish(
            "length" if finish_reason == "length" else "tool_calls" if called or finish_reason == "tool_calls" else "stop",
            (usage or {}).get("prompt_tokens"),
            (usage or {}).get("completion_tokens"),
        )
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise BackendError(f"backend stream failed: {exc.__class__.__name__}", error_type="incomplete_generation", retryable=not started) from exc
    finally:
        resp.close()  # not release(): an unfinished stream must drop the connection so the backend cancels


def tool_call_fragments(calls) -> list[ToolCallDelta]:
    """`delta.tool_calls` as vLLM streams them (a list of `{index, id?, type?, function: {name?, arguments?}}`; the
    first fragment of a call has its name). TGI 2.x sent one object instead of a list, without `index`, and
    arguments as an object: both are read too. The backend's call ids are not kept (the gateway makes its own)."""
    if isinstance(calls, dict):
        calls = [calls]
    out = []
    for call in calls or ():
        if not isinstance(call, dict):
            raise BackendError(f"backend sent an unreadable tool call: {str(call)[:100]!r}", error_type="protocol")
        fn = call.get("function") or {}
        index = call.get("index", 0)
        name, arguments = fn.get("name") or None, fn.get("arguments")
        if isinstance(arguments, (dict, list)):
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(index, int) or not isinstance(name, (str, type(None))) or not isinstance(arguments, (str, type(None))):
            raise BackendError(f"backend sent an unreadable tool call: {str(call)[:100]!r}", error_type="protocol")
        if name or arguments:
            out.append(ToolCallDelta(index, name, arguments or ""))
    return out
