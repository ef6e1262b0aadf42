"""The OpenAI-compatible streaming protocol, shared by vLLM, TGI's /v1 routes and the dev backend."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import aiohttp

from serving.drivers.base import (
    BackendError,
    adapter_not_loaded,
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
                parallel_tool_calls: bool = True, unsigned_seed: bool = False, token_details: bool = False) -> tuple[str, dict]:
    """(path, JSON body). Greedy is temperature 0 (TGI's chat route samples whenever temperature is absent).

    `parallel_tool_calls`: whether the server knows the field (TGI does not: it makes one call per answer).
    `unsigned_seed`: the server's seed is a u64 (TGI), not an i64 (vLLM, OpenAI): the same 64 bits are sent.
    `token_details`: text prompts ask for each token's id and log-probability (vLLM ≥ 0.10.2: `logprobs` and
    `return_token_ids`), for TGI's token events and `details`."""
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
    if token_details:
        body["logprobs"], body["return_token_ids"] = 0, True  # the sampled token's logprob and id, no alternatives
    return "/v1/completions", body


async def openai_stream(session: aiohttp.ClientSession, url: str, body: dict, *, chat: bool, adapter: str | None = None,
                        token_details: bool = False, seed: int | None = None, special_ids: frozenset | None = None) -> AsyncIterator:
    """Events from an OpenAI-style SSE stream (`stream_options.include_usage` on, so usage is known).

    `adapter`: the adapter the request names, so that a 404 for it reads as `adapter_not_loaded` (vLLM's answer for an
    adapter it does not hold). `token_details`: the body asked for token ids and logprobs (`openai_body`); each token
    then comes as its own `TokenDelta` with its TGI token object, one chunk late, so that the last one is known.
    `seed`: the seed the body carries, reported in the `Finish` (vLLM does not echo it). `special_ids`: the model's
    special token ids (`token_deltas`)."""
    try:
        resp = await session.post(url, json=body)
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError) as exc:
        raise connect_error(exc, url) from exc
    started = called = stop_sequence = False
    finish_reason = None
    usage = None
    held: list[TokenDelta] = []  # token_details: the previous chunk's tokens, sent once the next one arrives
    try:
        try:
            await raise_for_status(resp)
        except BackendError as exc:
            if exc.status == 404 and adapter:
                raise adapter_not_loaded(adapter, exc.message) from exc
            raise
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
                    stop_sequence = reason == "stop" and isinstance(choice.get("stop_reason"), str)  # vLLM: the matched string
                for call in tool_call_fragments(delta.get("tool_calls")) if chat else ():
                    started = called = True
                    yield call
                if token_details:
                    tokens = token_deltas(choice, text or "", special_ids, stop_cut=bool(reason))
                    if tokens or reason:
                        started = True
                        if tokens:
                            for token in held:
                                yield token
                            held = tokens
                        if reason and held:
                            held[-1].last = True
                elif text or reason:
                    started = True
                    yield TokenDelta(text or "", 1 if text else 0, last=bool(reason))
        for token in held:
            yield token
        if finish_reason is None:
            raise BackendError("the backend closed the stream before the end of the answer", error_type="incomplete_generation")
        resp.release()  # finished cleanly: the connection may be reused
        yield Finish(
            "length" if finish_reason == "length" else "tool_calls" if called or finish_reason == "tool_calls" else "stop",
            (usage or {}).get("prompt_tokens"),
            (usage or {}).get("completion_tokens"),
            seed,
            stop_sequence,
        )
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
        raise BackendError(f"backend stream failed: {exc.__class__.__name__}", error_type="incomplete_generation", retryable=not started) from exc
    finally:
        resp.close()  # not release(): an unfinished stream must drop the connection so the backend cancels


def token_deltas(choice: dict, text: str, special_ids: frozenset | None = None, *, stop_cut: bool = False) -> list[TokenDelta]:
    """A completions chunk's tokens, each with its TGI token object `{id, text, logprob, special}` from what vLLM sent
    (`token_ids`, `logprobs.tokens`, `logprobs.token_logprobs`): real figures or an error, never made-up ones.

    `special`: from the model's special token ids where the gateway has its tokenizer; else inferred as vLLM leaves
    special tokens out of the text (`skip_special_tokens`): a token whose own text is not empty in a chunk without text,
    unless that chunk ends the answer (`stop_cut`: a matched stop sequence is cut out of the text too). The chunk's text
    goes with its last token."""
    ids = choice.get("token_ids")
    logprobs = choice.get("logprobs") or {}
    strings, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not ids and not text:
        return []
    if not (isinstance(ids, list) and isinstance(strings, list) and isinstance(values, list) and len(ids) == len(strings) == len(values)):
        raise BackendError("the backend sent no token ids and log-probabilities for a text completion that asked for them "
                           "(vLLM 0.10.2 or later sends them)", error_type="protocol")
    out = []
    for i, (token_id, string, value) in enumerate(zip(ids, strings, values)):
        if not isinstance(token_id, int) or not isinstance(string, str) or not isinstance(value, (int, float)):
            raise BackendError(f"the backend sent an unreadable token: {[token_id, string, value]!r}"[:200], error_type="protocol")
        if special_ids is not None:
            special = token_id in special_ids
        else:
            special = not text and not stop_cut and bool(string) and not string.startswith("bytes:")
        last_of_chunk = i == len(ids) - 1
        out.append(TokenDelta(text if last_of_chunk else "", 1, {"id": token_id, "text": string, "logprob": float(value),
                                                                "special": special}))
    return out


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
