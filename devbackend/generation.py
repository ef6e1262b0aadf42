"""What every generation route shares: reading the body, driving the engine, timing headers."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from aiohttp import web

from .protocol import BackendError, GenerationParams, Token, validation_error
from .state import Backend, Ticket

BACKEND = web.AppKey("backend", Backend)


def backend_of(request: web.Request) -> Backend:
    return request.app[BACKEND]


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise validation_error(f"Failed to parse the request body as JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise validation_error("The request body must be a JSON object")
    return body


def number(fields: dict, name: str, kind: type = float):
    """A numeric field or None; booleans and strings are refused (422) instead of crashing later."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise validation_error(f"`{name}` must be a number")
    return kind(value)


def string_list(value, name: str) -> list[str]:
    """`stop` may be a string or a list of strings; empty strings would stop at once and are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise validation_error(f"`{name}` must be a string or a list of strings")
    return [v for v in value if v]


@dataclass
class Timing:
    """TGI's response headers; times in milliseconds except x-compute-time (seconds), as TGI sends them."""

    start: float = field(default_factory=time.monotonic)
    admitted: float = 0.0

    def headers(self, compute_type: str, prompt_tokens: int, generated_tokens: int) -> dict[str, str]:
        end = time.monotonic()
        inference = end - (self.admitted or self.start)
        return {
            "x-compute-type": compute_type,
            "x-compute-time": f"{end - self.start:.6f}",
            "x-total-time": str(round((end - self.start) * 1000)),
            "x-validation-time": "0",
            "x-queue-time": str(round(((self.admitted or self.start) - self.start) * 1000)),
            "x-inference-time": str(round(inference * 1000)),
            "x-time-per-token": str(round(inference * 1000 / max(generated_tokens, 1))),
            "x-prompt-tokens": str(prompt_tokens),
            "x-generated-tokens": str(generated_tokens),
        }


async def produce(backend: Backend, ticket: Ticket, prompt: Sequence[int], params: GenerationParams,
                  adapter: str | None) -> AsyncIterator[list[Token]]:
    """The engine's token batches, cut short (connection aborted) when the die_after_tokens fault says so."""
    params.token_delay_s = backend.faults.token_delay_ms / 1000
    limit = backend.faults.die_after_tokens
    backend.stats.prompt_tokens += len(prompt)
    sent = 0
    async with contextlib.aclosing(backend.engine.stream(prompt, params, adapter, ticket.cancel)) as stream:
        async for batch in stream:
            if limit is not None and sent + len(batch) > limit:
                if limit > sent:
                    backend.stats.generated_tokens += limit - sent
                    yield batch[:limit - sent]
                ticket.abort_connection()
                return
            sent += len(batch)
            backend.stats.generated_tokens += len(batch)
            yield batch


async def collect(backend: Backend, ticket: Ticket, prompt: Sequence[int], params: GenerationParams,
                  adapter: str | None) -> list[Token]:
    """All tokens of a non-streamed answer; marks the ticket finished, or raises TGI's incomplete_generation."""
    tokens = [token async for batch in produce(backend, ticket, prompt, params, adapter) for token in batch]
    ticket.finished = bool(tokens) and tokens[-1].finish_reason is not None
    if not ticket.finished and not ticket.cancel.is_set():
        raise BackendError(500, "Incomplete generation", "incomplete_generation")
    return tokens


def visible_text(tokens: list[Token]) -> str:
    return "".join(token.text for token in tokens if not token.special)


def sse(payload: dict, prefix: bytes = b"data:") -> bytes:
    return prefix + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def start_sse(request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "x-accel-buffering": "no", **(headers or {})})
    await response.prepare(request)
    return response
