"""What guards every Django response and request: the Content-Security-Policy, development mode kept to loopback,
and request body limits applied before Django reads a byte."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re

from django.conf import settings

# No inline or third-party scripts anywhere (the console's behaviour is in static files); inline styles stay
# allowed (charts and gauges size themselves with style attributes). frame-ancestors: no clickjacking.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "frame-ancestors 'none'",
])


class ContentSecurityPolicyMiddleware:
    """Adds the Content-Security-Policy to every Django response that has none."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


def is_loopback(host: str | None) -> bool:
    if not host:
        return True  # a unix socket: only this machine reaches it
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def development_only_reason() -> str:
    """Why this process may answer loopback only ('' when it may serve any address)."""
    if settings.SECRET_KEY == settings.DEVELOPMENT_SECRET_KEY:
        return "the built-in development DJANGO_SECRET_KEY (anyone could forge sessions and playground tokens)"
    if settings.DEBUG:
        return "DEBUG on (error pages would show code and settings)"
    return ""


# ---- request body limits, before Django reads a byte ------------------------------------------------

# Django's ASGI handler spools the whole body to disk before any view (or authentication) runs: 1 GB to
# /v1/files with no key was 925 MB written before the 401. These limits apply first, by Content-Length and while
# the body streams in (chunked uploads).
UPLOAD_PATHS = re.compile(r"^/v1/files$|^/t/[^/]+/finetune/files/upload/$")
# A tenant's own LoRA (finetune/byo.py): the API's and the console's upload.
ADAPTER_UPLOAD_PATHS = re.compile(r"^/v1/adapters$|^/api/tenants/[^/]+/adapters/upload/$|^/t/[^/]+/finetune/adapters/upload/$")
MULTIPART_SLACK = 64 * 1024  # form fields and part headers around the file
WEBHOOK_MAX_BYTES = 1024 * 1024  # Stripe's events are a few kB


def body_limit(path: str) -> int:
    """Bytes a request body to `path` may have (Django paths; the gateway caps its own)."""
    if UPLOAD_PATHS.match(path):
        return settings.FINETUNE_MAX_UPLOAD_BYTES + MULTIPART_SLACK
    if ADAPTER_UPLOAD_PATHS.match(path):
        return settings.FINETUNE_MAX_ADAPTER_BYTES + MULTIPART_SLACK
    if path.startswith("/webhooks/"):
        return WEBHOOK_MAX_BYTES
    return settings.DATA_UPLOAD_MAX_MEMORY_SIZE + MULTIPART_SLACK


BODY_IDLE_TIMEOUT_S = 30.0  # a client that sends nothing for this long mid-body is cut off (a slow-body attack)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


async def _next_body_message(receive):
    try:
        return await asyncio.wait_for(receive(), BODY_IDLE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise BodyTimeout from None


def _too_large_body(path: str, limit: int) -> bytes:
    what = "file upload" if UPLOAD_PATHS.match(path) or ADAPTER_UPLOAD_PATHS.match(path) else "request body"
    message = f"The {what} is larger than this path accepts ({limit:,} bytes)."
    if UPLOAD_PATHS.match(path):
        message += f" Training files may be up to {settings.FINETUNE_MAX_UPLOAD_BYTES:,} bytes (PLATFORM_FINETUNE_MAX_UPLOAD_BYTES)."
    elif ADAPTER_UPLOAD_PATHS.match(path):
        message += f" Adapters may be up to {settings.FINETUNE_MAX_ADAPTER_BYTES:,} bytes (PLATFORM_FINETUNE_MAX_ADAPTER_BYTES)."
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "request_too_large"}}).encode()


def limit_body(app):
    """ASGI middleware: 413 for a body over `body_limit(path)`, refused on its Content-Length before reading, or as
    soon as the streamed bytes pass the limit (the rest is never read)."""

    async def limited(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        path = scope["path"]
        limit = body_limit(path)
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _send_413(send, path, limit)
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            # Django reads a body without Content-Length as empty (an upload answered "file is required"): take it
            # in (bounded by the limit) and hand it on with its length.
            messages, size = [], 0
            while True:
                try:
                    message = await _next_body_message(receive)
                except BodyTimeout:
                    return await _send_408(send)
                if message["type"] != "http.request":
                    return
                size += len(message.get("body", b""))
                if size > limit:
                    return await _send_413(send, path, limit)
                messages.append(message)
                if not message.get("more_body"):
                    break
            headers = [(k, v) for k, v in scope["headers"] if k != b"transfer-encoding"] + [(b"content-length", str(size).encode())]
            scope = {**scope, "headers": headers}
            replay = iter(messages)

            async def replay_receive():
                message = next(replay, None)
                return message if message is not None else await receive()

            return await app(scope, replay_receive, send)
        received = 0
        started = body_done = False

        async def counting_receive():
            nonlocal received, body_done
            if body_done:  # Django now listens for the disconnect: no deadline
                return await receive()
            message = await _next_body_message(receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
                body_done = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            return await app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_413(send, path, limit)
        except BodyTimeout:
            if not started:
                await _send_408(send)

    return limited


async def _send_408(send) -> None:
    body = json.dumps({"error": {"message": f"The request body stopped arriving: nothing for {BODY_IDLE_TIMEOUT_S:.0f} s. "
                                            "Send it again.", "type": "invalid_request_error", "param": None,
                                 "code": "request_timeout"}}).encode()
    await send({"type": "http.response.start", "status": 408,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _send_413(send, path: str, limit: int) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _too_large_body(path, limit)})
