"""One request's answer on ASGI's `send`: the only place the gateway sends `http.response.start`.

It knows whether the answer started (after that no failover and no HTTP status: errors go in-band) and with which
status, the headers every answer of the request carries (`x-request-id`, then admission's `x-ratelimit-*`), and
shapes errors as its endpoint's protocol does. Once a request is admitted, its settle runs before the answer's last
byte (`settle_before_end`), whatever that last byte is: the result, an error, an in-band failure.
"""

from __future__ import annotations

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class Response:
    __slots__ = ("_send", "endpoint", "headers", "status", "_before_end")

    def __init__(self, send, endpoint):
        self._send = send
        self.endpoint = endpoint  # serving.gateway.endpoints.Endpoint: shapes the errors
        self.headers: dict = {}  # on every answer of the request
        self.status: int | None = None  # the status it started with; None: nothing sent yet
        self._before_end = None

    @property
    def started(self) -> bool:
        return self.status is not None

    def settle_before_end(self, settle) -> None:
        """`settle()` (awaited) runs before the answer's last byte: a client that waits for its answer never finds
        it still counted against its limits (docs/limits.md)."""
        self._before_end = settle

    async def start(self, status: int, content: list, headers: dict | None = None) -> None:
        self.status = status
        raw = list(content)
        for k, v in (self.headers if headers is None else headers).items():
            raw.append((k.lower().encode(), str(v).encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def last(self, body: bytes, *, more_body_key: bool = True) -> None:
        """The answer's last byte (after the settle, once admitted)."""
        if self._before_end is not None:
            await self._before_end()
        await self._send({"type": "http.response.body", "body": body, "more_body": False} if more_body_key
                         else {"type": "http.response.body", "body": body})

    async def json(self, status: int, body: bytes, headers: dict | None = None) -> None:
        """A whole JSON answer; `headers` added to the request's."""
        await self.start(status, JSON_HEADERS, {**self.headers, **headers} if headers else self.headers)
        await self.last(body, more_body_key=False)

    async def error(self, err) -> None:
        """An `ApiError` in the endpoint's shape, with its headers (`retry-after`, `allow`)."""
        await self.json(err.status, self.endpoint.error_body(err), err.headers)

    async def chunk(self, body: bytes) -> None:
        """A streamed chunk, more to come; the first one starts the answer (200, server-sent events)."""
        if self.status is None:
            await self.start(200, SSE_HEADERS)
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def end(self, body: bytes) -> None:
        """A stream's last chunk (the answer starts here if nothing was sent before)."""
        if self.status is None:
            await self.start(200, SSE_HEADERS)
        await self.last(body)

    async def stream_error(self, message: str, *, code: str, tgi_type: str) -> None:
        """End a started stream with an in-band error in the endpoint's shape."""
        await self.last(self.endpoint.error_event(message, code=code, tgi_type=tgi_type))

    async def fail(self, err) -> None:
        """An unexpected failure, after the request's own end (nothing left to settle): the error in the API's shape,
        or in-band when the answer has started (best effort: the client may be gone)."""
        self._before_end = None
        if self.status is None:
            self.headers = {}  # as it always was: a bare 500
            return await self.error(err)
        try:
            await self.stream_error(err.message, code=err.code, tgi_type=err.code)
        except Exception:
            pass
