"""Relays: one backend answer to the client, one relay per protocol and mode.

`OpenAIStream` (server-sent chunks, `data: [DONE]`), `OpenAIJson` (one chat.completion / text_completion body),
`TGIStream` (token events, the last one with `generated_text`) and `TGIJson` (`generated_text`, `details`). What they
share is `Relay.run`: the driver's events in order, the first token's time, and the finish — settled and durable in the
ledger (`Accounting.complete`) before the last byte. Two steps are composed into them rather than branched on inside:
- the text step: `Text` passes the backend's text as it is; `GuardedText` runs it through the tenant's output guard
  (a `StreamRedactor` when streamed: what could still be the start of a match is held back; the whole answer
  redacted otherwise; docs/gateway.md, "Output guard");
- the tool calls (OpenAI): `formatting.ToolCalls`, which merges the fragments and guards their arguments.

Delivered tokens are counted (and journaled) before the chunk that carries them goes out; a token whose text a step
holds counts with the next chunk that goes out. A relay raises `BackendError` when the backend fails: whoever runs it
decides on failover (nothing sent yet) or the in-band error.
"""

from __future__ import annotations

import time

from serving.drivers import BackendError, Finish, TokenDelta, ToolCallDelta
from serving.gateway.endpoints import CHAT
from serving.gateway.formatting import OpenAIFormat, TGIFormat, ToolCalls

# ---- the text step --------------------------------------------------------------------------------------


class Text:
    """The answer's text with no output guard: as the backend wrote it."""

    __slots__ = ("parts",)

    def __init__(self):
        self.parts: list[str] = []

    def feed(self, event: TokenDelta) -> TokenDelta:
        """Streamed: the delta as it may go out now."""
        self.parts.append(event.text)
        return event

    def flush(self) -> str:
        """Streamed: what is still held at the end."""
        return ""

    def sent(self, tail: str) -> str:
        """Streamed: the whole text the client received, `tail` (the flush) included."""
        return "".join(self.parts)

    def collect(self, event: TokenDelta) -> None:
        """Not streamed: remember the delta's text."""
        self.parts.append(event.text)

    def body(self) -> str:
        """Not streamed: the text to answer."""
        return "".join(self.parts)

    def tokens(self, tokens: list[dict]) -> None:
        """Not streamed: TGI's `details.tokens`, whose texts must add up to the answer's."""


class GuardedText(Text):
    """The answer's text through the tenant's output guard."""

    __slots__ = ("guard", "redactor")

    def __init__(self, guard, *, streamed: bool):
        super().__init__()
        self.guard = guard
        self.redactor = guard.stream() if streamed else None

    def feed(self, event: TokenDelta) -> TokenDelta:
        event = _redacted_delta(event, self.redactor)
        self.parts.append(event.text)  # what the redactor released
        return event

    def flush(self) -> str:
        return self.redactor.flush()

    def sent(self, tail: str) -> str:
        return "".join(self.parts) + tail

    def body(self) -> str:
        return self.guard.apply("".join(self.parts))

    def tokens(self, tokens: list[dict]) -> None:
        if tokens:
            self.guard.redact_tokens(tokens)


def _redacted_delta(event: TokenDelta, redactor) -> TokenDelta:
    """The delta with its text passed through the tenant's guard (what is not safe yet comes out later).

    TGI token objects keep their id, logprob and special flag; their text is the released text, possibly empty.
    """
    safe = redactor.feed(event.text) if event.text else ""
    token = event.token
    if token is not None and not token.get("special"):
        token = {**token, "text": safe}
    return TokenDelta(safe, event.count, token, event.last)


# ---- the relays -----------------------------------------------------------------------------------------


class Relay:
    """The event loop every relay shares. `acct`: the request's Accounting; `out`: its Response; `calls`: the tool
    calls step (OpenAI's relays)."""

    __slots__ = ("acct", "out", "fmt", "text", "calls", "delivered")

    def __init__(self, acct, out, fmt, text: Text, calls: ToolCalls | None = None):
        self.acct, self.out, self.fmt, self.text, self.calls = acct, out, fmt, text, calls
        self.delivered = 0  # tokens delivered (or, not streamed, received) so far

    async def run(self, stream) -> None:
        """Forward the driver's events in the client's shape; raises BackendError (the caller decides on failover)."""
        acct = self.acct
        async for event in stream:
            if isinstance(event, TokenDelta):
                acct.first_token()
                await self.token(event)
            elif isinstance(event, ToolCallDelta):
                acct.first_token()
                await self.tool_call(event)
            elif isinstance(event, Finish):
                await acct.complete(event, self.delivered)  # settled, then durable in the ledger, before the client sees the end
                await self.finish(event)
                return
        raise BackendError("the backend stream ended without a result", error_type="incomplete_generation")

    async def token(self, event: TokenDelta) -> None:
        raise NotImplementedError

    async def tool_call(self, event: ToolCallDelta) -> None:
        """Only chat asks for tool calls (OpenAI's relays take them); a text prompt's answer has none."""
        raise BackendError("the backend sent a tool call for a text prompt", error_type="protocol")

    async def finish(self, event: Finish) -> None:
        raise NotImplementedError


class StreamRelay(Relay):
    """Streamed: every chunk as it can go out."""

    __slots__ = ("held",)

    def __init__(self, *args):
        super().__init__(*args)
        self.held = 0  # tokens whose text a step still holds: counted as delivered with the next chunk

    async def token(self, event: TokenDelta) -> None:
        had_text = bool(event.text)
        event = self.text.feed(event)
        chunk = self.fmt.delta(event)
        if chunk is None:
            if event.last:
                self.delivered += event.count  # held back (TGI's last token), sent with the finish
            elif had_text:
                self.held += event.count  # its text is held by the guard
            return
        await self.send(chunk, event.count)

    async def send(self, chunk: bytes, count: int) -> None:
        self.delivered += count + self.held
        self.held = 0
        self.acct.deliver(self.delivered)  # counted (and journaled) before it goes out: a crash after the send bills it
        await self.out.chunk(chunk)


class OpenAIStream(StreamRelay):
    __slots__ = ()

    async def tool_call(self, event: ToolCallDelta) -> None:
        items = self.calls.feed(event)
        if not items:
            self.held += event.count  # the guard holds this call's arguments until it is complete
            return
        await self.send(self.fmt.tool_calls(items), event.count)

    async def finish(self, event: Finish) -> None:
        rest = self.text.flush()
        final = (self.fmt.delta(TokenDelta(rest, 0)) or b"") if rest else b""
        held_calls = self.calls.finish()
        if held_calls:
            final += self.fmt.tool_calls(held_calls)
        await self.out.end(final + self.fmt.end(event, self.acct.input_tokens, self.acct.output_tokens))


class TGIStream(StreamRelay):
    __slots__ = ()

    async def finish(self, event: Finish) -> None:
        rest = self.text.flush()
        acct = self.acct
        await self.out.end(self.fmt.end(event, self.text.sent(rest), acct.input_tokens, acct.output_tokens, tail=rest))


class OpenAIJson(Relay):
    """Not streamed: everything is collected, then one body."""

    __slots__ = ()

    async def token(self, event: TokenDelta) -> None:
        self.text.collect(event)
        self.delivered += event.count

    async def tool_call(self, event: ToolCallDelta) -> None:
        self.calls.feed(event)
        self.delivered += event.count

    async def finish(self, event: Finish) -> None:
        text = self.text.body()
        extra = {"tool_calls": self.calls.message()} if self.calls.calls else {}
        await self.out.json(200, self.fmt.body(text, event, self.acct.input_tokens, self.acct.output_tokens, **extra))


class TGIJson(Relay):
    __slots__ = ()

    async def token(self, event: TokenDelta) -> None:
        self.text.collect(event)
        self.delivered += event.count
        self.fmt.collect(event)  # `details.tokens`

    async def finish(self, event: Finish) -> None:
        text = self.text.body()
        self.text.tokens(self.fmt.tokens)
        await self.out.json(200, self.fmt.body(text, event, self.acct.input_tokens, self.acct.output_tokens))


def relay_for(acct, req, out) -> Relay:
    """The relay for the request's protocol and mode, with the tenant's output guard (None: none) and, on OpenAI's
    routes, its tool calls. One per backend tried: nothing of a failed attempt carries over."""
    guard = acct.tenant.guard
    text = Text() if guard is None else GuardedText(guard, streamed=req.stream)
    if acct.endpoint.tgi:
        fmt = TGIFormat(details=req.details, client_prompt=req.prompt, return_full_text=req.return_full_text)
        return TGIStream(acct, out, fmt, text) if req.stream else TGIJson(acct, out, fmt, text)
    fmt = OpenAIFormat(chat=acct.endpoint is CHAT, request_id=acct.request_id.replace("~", "-"), created=int(time.time()),
                       model=acct.model, include_usage=req.include_usage, echo=req.prompt if req.echo else "")
    calls = ToolCalls(guard)
    return OpenAIStream(acct, out, fmt, text, calls) if req.stream else OpenAIJson(acct, out, fmt, text, calls)
