"""Per-tenant request rate of the management API (/api/tenants/<slug>/…) and of /v1 Files and Fine-tuning.

A token bucket per tenant: PLATFORM_API_BURST units at most, refilled at PLATFORM_API_REQUESTS_PER_MINUTE / 60 a
second. A request takes one unit, an expensive one (a prompt diff, an upload) PLATFORM_API_EXPENSIVE_COST. These
endpoints run in the process that also serves the gateway (the embedded default), so without a bound one tenant
calling a 50-ms endpoint back to back takes the core from every other tenant (bench/noisy_neighbour.py, `diff`).

With REDIS_URL the bucket lives in Redis (one script: refill, take, store), shared by every process; otherwise in
this process (the embedded default is one process). A Redis that fails falls back to this process's bucket, logged:
an outage of the limiter must not take the API down with it. The refusal is `RateLimited` (DRF's 429 with
`Retry-After`); each face renders it in its own error shape (tenants/api_errors.py, finetune/api.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time

from django.conf import settings
from rest_framework import exceptions

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


def charge(*, tenant, cost: int = 1) -> None:
    """Take `cost` units for `tenant`, or raise RateLimited (429 with Retry-After)."""
    wait = take(tenant_id=tenant.pk, cost=cost)
    if wait > 0:
        raise RateLimited(slug=tenant.slug, wait=wait)


def cost_of(view, request) -> int:
    """A view's price for this request: 1, or for a method the view lists in `expensive_methods` (the prompt diff,
    an upload) PLATFORM_API_EXPENSIVE_COST or one unit per MiB of the body's declared length, whichever is more."""
    if request.method not in getattr(view, "expensive_methods", ()):
        return 1
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    return max(settings.PLATFORM_API_EXPENSIVE_COST, math.ceil(declared / 1_048_576))


def reset_local() -> None:
    """Forget this process's buckets (tests)."""
    _local.clear()
