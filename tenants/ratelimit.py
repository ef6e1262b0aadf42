"""Per-tenant request rate of the management API (/api/tenants/<slug>/…) and of /v1 Files and Fine-tuning.

A token bucket per tenant: PLATFORM_API_BURST units at most, refilled at PLATFORM_API_REQUESTS_PER_MINUTE / 60 a
second. A request takes one unit, an expensive one (a prompt diff, an upload) PLATFORM_API_EXPENSIVE_COST. These
endpoints run in the process that also serves the gateway (the embedded default), so without a bound one tenant
calling a 50-ms endpoint back to back takes the core from every other tenant (bench/noisy_neighbour.py, `diff`).

With REDIS_URL the bucket lives in Redis (one script: refill, take, store), shared by every process; otherwise in
this process (the embedded default is one process). A Redis that fails falls back to this process's bucket, logged:
an outage of the limiter must not take the API down with it. The refusal is `RateLimited` (DRF's 429 with
`Retry-After`); each face renders it in its own error shape (tenants/api_errors.py, finetune/v1_base.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from http.cookies import SimpleCookie

from django.conf import settings
from django.urls import Resolver404, resolve
from rest_framework import exceptions

from common.openai_errors import error_body

from common import redis_clients

log = logging.getLogger(__name__)

# KEYS[1] the bucket; ARGV rate (units/s), burst, cost. Returns the seconds to wait, as text ("0": taken).
_TAKE_LUA = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= cost then tokens = tokens - cost else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


class RateLimited(exceptions.Throttled):
    """429: the tenant's API bucket cannot hold this request yet. `wait` (seconds, rounded up) is the Retry-After."""

    default_code = "rate_limit_exceeded"

    def __init__(self, *, slug: str, wait: float):
        per_minute, burst = settings.PLATFORM_API_REQUESTS_PER_MINUTE, settings.PLATFORM_API_BURST
        super().__init__(wait=max(1, math.ceil(wait)), detail=(
            f"Too many API requests for the account {slug!r}: it may make {per_minute:,} a minute (bursts of "
            f"{burst:,}; a prompt diff or an upload counts as {settings.PLATFORM_API_EXPENSIVE_COST:,}, an upload "
            "at least one a MiB)."))


def clock() -> float:
    """Seconds on this process's monotonic clock (immune to clock steps): the local buckets' time (tests replace it)."""
    return time.monotonic()


class _LocalBuckets:
    """The same bucket in this process, under a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str, rate: float, burst: int, cost: int) -> float:
        with self._lock:
            now = clock()
            tokens, at = self._buckets.get(key, (float(burst), now))
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / rate
            self._buckets[key] = (tokens, now)
            return wait

    def clear(self) -> None:
        with self._lock:
            self._buckets.clear()


_local = _LocalBuckets()


def _redis_take(key: str, rate: float, burst: int, cost: int) -> float:
    client = redis_clients.sync_client(settings.REDIS_URL)
    return float(client.eval(_TAKE_LUA, 1, key, repr(rate), burst, cost))


def take(*, tenant_id: int, cost: int = 1) -> float:
    """Take `cost` units from the tenant's bucket. Returns 0.0 when taken, else the seconds until they would fit (and
    takes nothing). A cost above the burst is charged as the burst, so every request can eventually pass."""
    per_minute = settings.PLATFORM_API_REQUESTS_PER_MINUTE
    if per_minute == 0:
        return 0.0  # unlimited
    rate, burst = per_minute / 60.0, settings.PLATFORM_API_BURST
    cost = min(cost, burst)
    key = f"mtl:{{t{tenant_id}}}:api_bucket"  # hash-tagged per tenant, as admission's keys
    if settings.REDIS_URL:
        try:
            return _redis_take(key, rate, burst, cost)
        except Exception as exc:  # noqa: BLE001 - any Redis trouble: this process's bucket instead
            log.warning("API rate limit: Redis failed (%s: %s); limiting in this process", type(exc).__name__, exc)
    return _local.take(key, rate, burst, cost)


def charge(*, tenant, cost: int = 1, request=None) -> None:
    """Take `cost` units for `tenant`, or raise RateLimited (429 with Retry-After). With the `request`, a refusal is
    remembered for its credential, so that the next requests that cannot fit are refused before their body is read
    (refuse_early)."""
    wait = take(tenant_id=tenant.pk, cost=cost)
    if wait > 0:
        if request is not None:
            _remember_refusal(request, tenant.slug, cost, wait)
        raise RateLimited(slug=tenant.slug, wait=wait)


def _cost(expensive: bool, content_length) -> int:
    if not expensive:
        return 1
    try:
        declared = int(content_length or 0)
    except ValueError:
        declared = 0
    return max(settings.PLATFORM_API_EXPENSIVE_COST, math.ceil(declared / 1_048_576))


def cost_of(view, request) -> int:
    """A view's price for this request: 1, or for a method the view lists in `expensive_methods` (the prompt diff,
    an upload) PLATFORM_API_EXPENSIVE_COST or one unit per MiB of the body's declared length, whichever is more."""
    return _cost(request.method in getattr(view, "expensive_methods", ()), request.META.get("CONTENT_LENGTH"))


# ---- refusing before the body is read ---------------------------------------------------------------------------
# Django reads a request's whole body before any view runs: a tenant retrying refused 30 MB uploads would still cost
# the process their bytes. So a refusal is remembered per credential and scope (an API key, or a session and the URL's
# tenant): the bucket then held at most `tokens`, and nothing but time adds to it, so until it can hold a request's
# price no request of that credential can pass, and refuse_early answers 429 from the headers alone. Exact in that
# sense (never a refusal the bucket would not make), except after the bucket itself was lost (a Redis flush): then
# for at most PLATFORM_API_BURST / rate seconds.

_refusals: dict[str, tuple[float, float, str]] = {}  # memo key -> (clock() at the refusal, tokens then at most, slug)
_MAX_REFUSALS = 10_000


def _scope_of(path: str) -> str | None:
    """The part of a path that names whose bucket a request spends: the tenant slug under /api/tenants/, '' on /v1;
    None elsewhere (not remembered)."""
    if path.startswith("/api/tenants/"):
        return path.split("/", 4)[3]
    return "" if path.startswith("/v1/") else None


def _memo_key(credential: str, scope: str) -> str:
    return hashlib.sha256(f"{scope}\0{credential}".encode()).hexdigest()[:32]


def _remember_refusal(request, slug: str, cost: int, wait: float) -> None:
    scope = _scope_of(request.path)
    credential = request.META.get("HTTP_AUTHORIZATION") or request.COOKIES.get(settings.SESSION_COOKIE_NAME)
    if scope is None or not credential:
        return
    rate = settings.PLATFORM_API_REQUESTS_PER_MINUTE / 60.0
    if len(_refusals) >= _MAX_REFUSALS:
        _refusals.clear()
    _refusals[_memo_key(credential, scope)] = (clock(), max(0.0, min(cost, settings.PLATFORM_API_BURST) - wait * rate), slug)


def _early_wait(scope: dict) -> tuple[float, str] | None:
    """(seconds, slug) when this request certainly cannot fit the bucket its credential was last refused by."""
    path = scope["path"]
    where = _scope_of(path)
    if where is None or not _refusals:
        return None
    headers = dict(scope["headers"])
    credential = headers.get(b"authorization", b"").decode("latin-1")
    if not credential:
        cookies = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        morsel = cookies.get(settings.SESSION_COOKIE_NAME)
        credential = morsel.value if morsel else ""
    entry = _refusals.get(_memo_key(credential, where)) if credential else None
    per_minute = settings.PLATFORM_API_REQUESTS_PER_MINUTE
    if entry is None or per_minute == 0:
        return None
    try:
        view = resolve(path).func
    except Resolver404:
        return None
    view_class = getattr(view, "view_class", None) or getattr(view, "cls", None)
    expensive = scope["method"] in getattr(view_class, "expensive_methods", ())
    rate, burst = per_minute / 60.0, settings.PLATFORM_API_BURST
    cost = min(_cost(expensive, headers.get(b"content-length", b"").decode("latin-1")), burst)
    at, tokens, slug = entry
    tokens = min(burst, tokens + (clock() - at) * rate)
    return ((cost - tokens) / rate, slug) if tokens < cost else None


def refuse_early(app):
    """ASGI middleware in front of Django: 429 from the headers alone for a request that cannot fit its tenant's bucket
    (above); its body is never read. The answer is the one the view would give (each face's shape, Retry-After)."""

    async def early(scope, receive, send):
        if scope["type"] == "http":
            refused = _early_wait(scope)
            if refused is not None:
                wait, slug = refused
                exc = RateLimited(slug=slug, wait=wait)
                detail = str(exc.detail)
                body = error_body(detail, 429, "rate_limit_exceeded") if scope["path"].startswith("/v1/") else {"detail": detail}
                await send({"type": "http.response.start", "status": 429,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", str(exc.wait).encode())]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
                return
        return await app(scope, receive, send)

    return early


def reset_local() -> None:
    """Forget this process's buckets and remembered refusals (tests)."""
    _local.clear()
    _refusals.clear()
