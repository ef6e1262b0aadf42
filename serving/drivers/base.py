"""The driver interface: the normalised request, the events, the error, and SSE reading."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import AsyncIterator

import aiohttp

from common.parsers import JsonRefused, json_loads


@dataclass(slots=True)
class Sampling:
    """Always explicit: TGI samples or not depending on which fields are present (reference/backends.md)."""

    do_sample: bool
    temperature: float | None = None  # only when do_sample
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float | None = None  # OpenAI's additive penalties over the tokens generated so far
    frequency_penalty: float | None = None


@dataclass(slots=True)
class BackendRequest:
    """What the gateway asks of a backend, already rewritten (system prompt in, limits applied)."""

    kind: str  # "chat" (messages) or "text" (prompt)
    max_tokens: int
    sampling: Sampling
    messages: list[dict] | None = None
    prompt: str | None = None
    adapter: str | None = None  # backend-side adapter id, or None for the base model
    model_id: str = ""  # the backend's id of the base model (vLLM `model` when no adapter)
    cache_salt: str | None = None  # vLLM only; set by the gateway per tenant
    want_tokens: bool = False  # TGI token events (/generate_stream) and `details`: per-token ids and logprobs
    special_ids: frozenset | None = None  # with want_tokens: the base model's special token ids, when its tokenizer is here
    tools: list[dict] | None = None  # chat only: validated OpenAI function definitions
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


@dataclass(slots=True)
class TokenDelta:
    text: str
    count: int = 1  # tokens in this delta
    token: dict | None = None  # TGI token object {id, text, logprob, special} where the backend gives one
    last: bool = False  # the backend said this is the final token


@dataclass(slots=True)
class ToolCallDelta:
    """A fragment of a tool call, as OpenAI streams them: the first fragment of call `index` names the function,
    later ones carry pieces of its JSON `arguments`."""

    index: int
    name: str | None = None
    arguments: str = ""
    count: int = 1  # tokens in this delta (an estimate; the Finish carries the real count)


@dataclass(slots=True)
class Finish:
    finish_reason: str  # OpenAI vocabulary: stop | length | tool_calls
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seed: int | None = None
    stop_sequence: bool = False  # finish_reason "stop" because a stop sequence matched (TGI's `stop_sequence`), not EOS


class BackendError(Exception):
    """A backend failure. `retryable`: another backend may succeed (connect error, overload) if nothing was sent."""

    def __init__(self, message: str, *, status: int = 502, error_type: str = "backend_error", retryable: bool = False, connect: bool = False):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.retryable = retryable
        self.connect = connect


RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
ADAPTER_NOT_LOADED = "adapter_not_loaded"  # BackendError.error_type: the backend does not hold the request's adapter


def adapter_not_loaded(adapter: str, backend_message: str) -> BackendError:
    """vLLM's 404 for an adapter it does not hold (forgotten by a restart, unloaded behind the platform's back). Another
    backend may hold it; the gateway marks this one and reloads it there (serving.health)."""
    return BackendError(f"the backend does not hold adapter {adapter} ({backend_message[:200]})", status=503,
                        error_type=ADAPTER_NOT_LOADED, retryable=True)


@dataclass(slots=True, frozen=True)
class ContextOverflow:
    """A backend's refusal of a prompt (+ max tokens) beyond the model's context, with the figures it gave."""

    limit: int  # the context (or, when only the prompt is counted, the prompt limit)
    input_tokens: int | None = None
    completion_tokens: int | None = None  # None: the prompt alone is too long (or the backend did not say)
    input_at_least: bool = False  # `input_tokens` is a lower bound (vLLM stops counting past the limit), not a count


# TGI's router (with or without backticks: 0.x had none; errors may start "Input validation error: "), the dev
# backend's wording of TGI's prompt limit, and vLLM's engine. Each gives the limit and the prompt's tokens.
_CONTEXT_REFUSALS = (
    re.compile(r"`?inputs?`? tokens \+ `?max_new_tokens`? must be <= (?P<limit>\d+)\. Given: (?P<input>\d+) `?inputs?`? tokens "
               r"and (?P<completion>\d+)"),
    re.compile(r"`?inputs`? must have less than (?P<limit>\d+) tokens\. Given: (?P<input>\d+)"),
    re.compile(r"`?inputs`? tokens must be <= (?P<limit>\d+)\. Given: (?P<input>\d+)"),
    re.compile(r"prompt \(length (?P<input>\d+)\) is longer than the maximum model length of (?P<limit>\d+)"),
)
# vLLM's OpenAI server: "This model's maximum context length is N tokens. However, ..." in wordings that changed
# from release to release; the prompt's and the completion's figures are read where they are given.
_VLLM_LIMIT = re.compile(r"maximum context length is (\d+) tokens")
_VLLM_INPUT = re.compile(r"(\d+) in the messages|requested (\d+) tokens in the messages|has (\d+) input tokens"
                         r"|contains (?:at least )?(\d+) input tokens")
# vLLM 0.10+ tokenizes a long prompt only up to the limit and says "contains at least N input tokens": a bound.
_VLLM_AT_LEAST = re.compile(r"contains at least \d+ input tokens")
_VLLM_COMPLETION = re.compile(r"(\d+) in the completion|requested (\d+) output tokens|too large: (\d+)")


def _figure(pattern: re.Pattern, message: str) -> int | None:
    match = pattern.search(message)
    return int(next(g for g in match.groups() if g is not None)) if match else None


def context_overflow(message: str) -> ContextOverflow | None:
    """The figures of a backend's context-length refusal, or None when the message is about something else."""
    for pattern in _CONTEXT_REFUSALS:
        match = pattern.search(message)
        if match:
            completion = match.groupdict().get("completion")
            return ContextOverflow(int(match["limit"]), int(match["input"]), int(completion) if completion else None)
    limit = _figure(_VLLM_LIMIT, message)
    if limit is None:
        return None
    return ContextOverflow(limit, _figure(_VLLM_INPUT, message), _figure(_VLLM_COMPLETION, message),
                           input_at_least=bool(_VLLM_AT_LEAST.search(message)))


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    text = (await resp.text(errors="replace"))[:500]
    message, error_type = text, "backend_error"
    try:
        body = json_loads(text)
        err = body.get("error")
        if isinstance(err, dict):
            message, error_type = err.get("message", text), err.get("type") or error_type
        elif err:
            message, error_type = str(err), body.get("error_type") or error_type
        elif "detail" in body:
            message = str(body["detail"])
    except (ValueError, AttributeError):
        pass
    raise BackendError(message, status=resp.status, error_type=error_type, retryable=resp.status in RETRYABLE_STATUSES)


MAX_EVENT_BYTES = 512 * 1024  # one SSE line; a longer one is a broken (or hostile) backend


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """JSON payloads of `data:` lines; stops at `[DONE]`. Comments and other fields are skipped. What a broken (or
    hostile) backend sends instead is a BackendError `protocol`: not JSON, nested too deep, a lone surrogate, not an
    object, a line longer than MAX_EVENT_BYTES.

    The body is read as it arrives and split into lines here (one await per network read, not one per line: aiohttp's
    line reader costs more per event than the JSON parse)."""
    held: list[bytes] = []  # the start of a line whose end has not arrived yet (joined once, when it has)
    held_bytes = 0
    async for chunk in resp.content.iter_any():
        if b"\n" not in chunk:
            held.append(chunk)
            held_bytes += len(chunk)
            if held_bytes > MAX_EVENT_BYTES:
                raise _too_long()
            continue
        if held:
            chunk = b"".join(held) + chunk
        lines = chunk.split(b"\n")
        last = lines.pop()
        held, held_bytes = ([last], len(last)) if last else ([], 0)
        for raw in lines:
            event = _sse_event(raw)
            if event is _DONE:
                return
            if event is not None:
                yield event
        if held_bytes > MAX_EVENT_BYTES:
            raise _too_long()
    event = _sse_event(b"".join(held))  # the last line, without its newline
    if event is not None and event is not _DONE:
        yield event


def _too_long() -> BackendError:
    return BackendError(f"backend sent an unreadable event (a line longer than {MAX_EVENT_BYTES // 1024} KiB)", error_type="protocol")


_DONE = object()


def _sse_event(raw: bytes):
    """One line's event: its JSON object, _DONE for `data: [DONE]`, None for anything else (a comment, a blank line, an
    `event:` or `id:` field); BackendError `protocol` when its data is not a JSON object."""
    if not raw.startswith(b"data:"):
        return None
    if len(raw) > MAX_EVENT_BYTES:
        raise _too_long()
    payload = raw[5:].strip()
    if not payload:
        return None
    if payload == b"[DONE]":
        return _DONE
    try:
        event = json_loads(payload)
    except ValueError as exc:
        reason = f" ({exc.code})" if isinstance(exc, JsonRefused) else ""
        raise BackendError(f"backend sent an unreadable event{reason}: {payload[:100]!r}", error_type="protocol") from None
    if not isinstance(event, dict):
        raise BackendError(f"backend sent an unreadable event (not an object): {payload[:100]!r}", error_type="protocol")
    return event


def in_stream_error(event: dict, *, started: bool) -> BackendError | None:
    """TGI (and some OpenAI servers) report errors inside a 200 stream as `{"error": ...}`."""
    err = event.get("error")
    if not err:
        return None
    if isinstance(err, dict):
        message, error_type = str(err.get("message", err)), str(err.get("type") or "backend_error")
    else:
        message, error_type = str(err), str(event.get("error_type") or "backend_error")
    overloaded = error_type in ("overloaded", "rate_limit") or "overloaded" in message.lower()
    status = 429 if overloaded else 422 if error_type == "validation" else 502
    return BackendError(message, status=status, error_type=error_type, retryable=overloaded and not started)


def connect_error(exc: BaseException, url: str) -> BackendError:
    return BackendError(f"cannot reach backend {url}: {exc.__class__.__name__}", status=503, error_type="connect", retryable=True, connect=True)


_SPECIAL_IDS: dict[int, tuple[object, frozenset]] = {}  # id(tokenizer) -> (the tokenizer, its special token ids)


def special_token_ids(counter) -> frozenset | None:
    """The special token ids of a pool's tokenizer (`PoolEntry.counter`, serving.tokencount), once per tokenizer; None
    when the gateway has no tokenizer files for the model."""
    tokenizer = getattr(counter, "tokenizer", None)
    if tokenizer is None:
        return None
    cached = _SPECIAL_IDS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        ids = frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
        cached = _SPECIAL_IDS[id(tokenizer)] = (tokenizer, ids)
    return cached[1]
