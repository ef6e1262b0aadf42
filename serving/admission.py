"""Admission: requests/min, tokens/min, the window quota and concurrency, exact across gateway processes.

Algorithm (one atomic step per request, in Redis by a Lua script, or under a lock in the embedded mode):
- requests/min and tokens/min are token buckets of capacity = the limit, refilled at limit/60 per second;
- the window quota (day or month, UTC) counts `used` + `reserved` tokens;
- admission reserves prompt tokens + max_tokens (an upper bound), so a hard limit is never overshot;
- settle (exactly once per admitted request) counts the real tokens and refunds the rest to the
  tokens/min bucket, and frees the concurrency slot;
- soft quota: at 80 % the caller is told to warn (once per window); at 100 % the tenant is throttled:
  its tokens/min drops to PLATFORM_SOFT_THROTTLE_TPM and the scheduler divides its weight by 10;
- hard quota: at 100 % requests are refused with 429 `insufficient_quota`;
- every request counts one against requests/min, admitted or refused (tokens/min, concurrency, quota, or before
  admission: unreadable, invalid, past the context — `count_refused`), except one refused because requests/min
  is exhausted, which takes nothing (no lock-out spiral). OpenAI does the same.
Keys are hash-tagged per tenant (`mtl:{t42}:…`). With Redis a request's admission also takes its scheduler slot
(serving.scheduler.FairScheduler.offer) and its settle frees it, each one script: two round trips a request
(docs/limits.md, "Round trips"; those two scripts span a tenant's and a pool's keys, so one Redis node).
If Redis is unreachable, tenants with a hard quota are refused (fail closed, 503) and the others fall
back to per-process limits with a warning in the log; Redis is probed in the background (serving/leases.py).

Faults (docs/limits.md, "Faults"): in-flight entries are 10-s leases renewed by the process's keeper, so a
dead process's concurrency and reservations free themselves; a settle that Redis cannot take is retried
until it can; what the fallback admitted is written back to Redis when it answers again (registered while
still running, counted once when done), so the counters equal the ledger. A counter Redis lost is seeded
from the ledger leaving out the requests Redis still tracks, which are counted from their settles instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError

from common import redis_clients
from serving import leases
from serving.leases import keeper_for, raise_if_cancelled, redis_errors, window_ttl_s

log = logging.getLogger(__name__)

LUA_DIR = Path(__file__).with_name("lua")
WARN_FRACTION = 0.8
LOCAL_LEASE_S = 15 * 60  # in-process entries: no other process to outlive, only a settle that never came
SEED_ATTEMPTS = 3

OK, CONCURRENCY, RPM, TPM, TPM_TOO_LARGE, QUOTA, QUOTA_RESERVED, NEED_SEED = 0, 1, 2, 3, 4, 5, 6, 9


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits in force (0 = unlimited). quota_tokens is the effective quota (fair share applied)."""

    tenant_id: int
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    quota_tokens: int = 0
    quota_window: str = "month"
    quota_mode: str = "soft"
    max_concurrent: int = 0

    @property
    def hard(self) -> bool:
        return self.quota_mode == "hard" and self.quota_tokens > 0


@dataclass
class Reservation:
    tenant_id: int
    request_id: str
    tokens: int
    window: str
    tpm_cap: int
    backend: str  # "redis" or "local" (the per-process fallback): settle where it was reserved
    life: str = ""  # Redis's reservations life at admission (a new one means Redis lost them); "" for local
    committed_ms: int = 0  # epoch ms when the request's ledger record was durable (set by the gateway); 0: not yet
    # Called once the settle has happened (at once, or later when Redis answers again): the journal closes then.
    on_settled: Callable[[], None] | None = field(default=None, repr=False, compare=False)


@dataclass
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None
    status: int = 200
    error_type: str = ""
    code: str = ""
    message: str = ""
    retry_after: int = 0
    throttled: bool = False
    warn: bool = False  # crossed 80 % of the quota just now: warn once (audit, e-mail, banner)
    quota_used: int = 0
    # The tenant's requests-per-minute bucket is empty after this request (refused for it, or it took the last one):
    # the milliseconds (rounded up) until it holds a request again, counted from when admission looked; no other
    # request can make it sooner (serving.gateway.refusals). 0: the bucket holds a request (or no such limit).
    rpm_retry_ms: int = 0
    # The scheduler's slot offered with the request (serving.scheduler.FairScheduler.offer) was taken in the same step.
    slot_taken: bool = False


# ---- windows and headers ---------------------------------------------------------------------------


def window_id(kind: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%d") if kind == "day" else now.strftime("%Y%m")


def window_bounds(kind: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) of the current quota window, UTC."""
    now = now or datetime.now(timezone.utc)
    if kind == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


def duration(seconds: float) -> str:
    """OpenAI's reset format: '1s', '6m0s', '250ms'."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s"


def ratelimit_headers(rpm: int, r_tokens: float, tpm: int, t_tokens: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* of a requests/min and a tokens/min bucket (each trio only when its limit is set, > 0):
    the limit, what the bucket holds now, and how long until it is full again. The tenant's admission and a key's
    own refusal (serving.budgets) both answer with these."""
    h: dict[str, str] = {}
    if rpm:
        h["x-ratelimit-limit-requests"] = str(rpm)
        h["x-ratelimit-remaining-requests"] = str(max(0, int(r_tokens)))
        h["x-ratelimit-reset-requests"] = duration((rpm - r_tokens) * 60 / rpm)
    if tpm:
        h["x-ratelimit-limit-tokens"] = str(tpm)
        h["x-ratelimit-remaining-tokens"] = str(max(0, int(t_tokens)))
        h["x-ratelimit-reset-tokens"] = duration(max(0.0, (tpm - t_tokens) * 60 / tpm))
    return h


def _headers(limits: TenantLimits, *, r_tokens: float, t_tokens: float, tpm: int, quota_used: int, throttled: bool,
             quota: bool = True) -> dict[str, str]:
    h = ratelimit_headers(limits.requests_per_minute, r_tokens, tpm, t_tokens)
    if quota and limits.quota_tokens:
        q = limits.quota_tokens
        h["x-quota-limit-tokens"] = str(q)
        h["x-quota-used-tokens"] = str(quota_used)
        h["x-quota-utilization"] = f"{min(999.9, 100 * quota_used / q):.1f}"
        state = "ok"
        if quota_used >= q:
            state = "throttled" if throttled else "exhausted"
        elif quota_used >= WARN_FRACTION * q:
            state = "warning"
        h["x-quota-state"] = state
    return h


def _refusal(status: int, limits: TenantLimits, retry_ms: int, tokens: int, tpm: int) -> tuple[str, str, str, int]:
    """(error_type, code, message, retry_after seconds) for a refusal code."""
    retry = max(1, math.ceil(retry_ms / 1000)) if retry_ms else 0
    if status == CONCURRENCY:
        return "rate_limit_exceeded", "concurrency_limit_exceeded", (
            f"Too many requests in flight: your limit is {limits.max_concurrent} concurrent requests. Retry when one finishes."
        ), retry
    if status == RPM:
        return "rate_limit_exceeded", "requests_per_minute_exceeded", (
            f"Rate limit reached: {limits.requests_per_minute} requests per minute. Retry after {retry} s."
        ), retry
    if status == TPM:
        return "rate_limit_exceeded", "tokens_per_minute_exceeded", (
            f"Rate limit reached: {tpm} tokens per minute (this request reserves {tokens}: prompt + max_tokens). Retry after {retry} s."
        ), retry
    if status == TPM_TOO_LARGE:
        return "rate_limit_exceeded", "request_exceeds_tokens_per_minute", (
            f"This request reserves {tokens} tokens (prompt + max_tokens), more than your limit of {tpm} tokens per minute. "
            "Lower max_tokens or shorten the prompt."
        ), 60
    if status == QUOTA_RESERVED:
        return "insufficient_quota", "insufficient_quota", (
            f"Requests in flight have reserved the rest of your quota of {limits.quota_tokens:,} tokens for this "
            f"{limits.quota_window}; what they do not use is released when they finish. Retry after {retry} s."
        ), retry
    _, end = window_bounds(limits.quota_window)
    retry = max(1, math.ceil((end - datetime.now(timezone.utc)).total_seconds()))
    return "insufficient_quota", "insufficient_quota", (
        f"You have used your quota of {limits.quota_tokens:,} tokens for this {limits.quota_window}. "
        "It resets at the start of the next window; ask staff to raise it."
    ), retry


def _decision(limits: TenantLimits, request_id: str, tokens: int, res: list, backend: str, window: str) -> Decision:
    status, retry_ms, r_tokens, t_tokens, quota_used, throttled, warn, eff_tpm, life, rpm_wait = res[:10]
    headers = _headers(limits, r_tokens=r_tokens, t_tokens=t_tokens, tpm=int(eff_tpm), quota_used=int(quota_used), throttled=bool(throttled))
    if status == OK:
        reservation = Reservation(limits.tenant_id, request_id, tokens, window, int(eff_tpm), backend, life)
        return Decision(True, headers, reservation, throttled=bool(throttled), warn=bool(warn), quota_used=int(quota_used),
                        rpm_retry_ms=int(rpm_wait))
    error_type, code, message, retry_after = _refusal(status, limits, retry_ms, tokens, int(eff_tpm))
    headers["retry-after"] = str(retry_after)
    return Decision(False, headers, None, 429, error_type, code, message, retry_after, bool(throttled), quota_used=int(quota_used),
                    rpm_retry_ms=int(rpm_wait))


def rpm_refusal(limits: TenantLimits, retry_ms: int) -> tuple[str, str, str, int]:
    """(error_type, code, message, retry_after s) of a requests-per-minute refusal (serving.gateway.refusals)."""
    return _refusal(RPM, limits, retry_ms, 0, 0)


def _rpm_counted(limits: TenantLimits, r_tokens: float, wait_ms: int) -> Decision:
    """What `count_refused` returns: the requests/min headers after the count, and the bucket's wait when empty."""
    return Decision(False, _headers(limits, r_tokens=r_tokens, t_tokens=0, tpm=0, quota_used=0, throttled=False, quota=False),
                    rpm_retry_ms=int(wait_ms))


def _rpm_wait_ms(rpm: int, r_tokens: float) -> int:
    return math.ceil((1 - r_tokens) * 60000 / rpm) if rpm and r_tokens < 1 else 0


def throttle_tpm() -> int:
    return settings.PLATFORM_SOFT_THROTTLE_TPM


UsageLoader = Callable[..., Awaitable[int]]  # (tenant_id, window kind, window id, exclude=request ids) -> tokens used


async def ledger_usage(tenant_id: int, kind: str, window: str, *, exclude=()) -> int:
    """Tokens already in the ledger for a window, leaving out the `exclude` request ids: seeds a counter that
    Redis or this process lost. Raises django.db.DatabaseError when the database cannot answer."""
    from asgiref.sync import sync_to_async
    from django.db import connection
    from django.db.models import Sum

    from serving.models import UsageRecord

    start, end = window_bounds(kind)

    def query() -> int:
        rows = UsageRecord.objects.for_tenant(tenant_id).filter(created_at__gte=start, created_at__lt=end)
        if exclude:
            rows = rows.exclude(request_id__in=list(exclude))
        agg = rows.aggregate(i=Sum("input_tokens"), o=Sum("output_tokens"))
        return (agg["i"] or 0) + (agg["o"] or 0)

    def load() -> int:
        # A worker thread keeps its connection; one the database dropped (restart, failover, outage) would fail
        # every later query on this thread (Django reconnects only between web requests): drop it, try once more.
        try:
            return query()
        except DatabaseError:
            connection.close()
        try:
            return query()
        except DatabaseError:
            connection.close()
            raise

    return await sync_to_async(load, thread_sensitive=False)()


def _usage_unavailable() -> Decision:
    """The window's counter must be seeded from the ledger, and the database cannot answer: refused until it does
    (a retry in 5 s; the ledger's spool and the config poller already log the outage)."""
    return Decision(
        False,
        {"retry-after": "5"},
        status=503,
        error_type="service_unavailable",
        code="usage_unavailable",
        message="The usage ledger cannot be read right now (the database is unavailable), so this tenant's token quota "
                "cannot be checked and requests are refused. Retry in a few seconds.",
        retry_after=5,
    )


# ---- the embedded, in-process equivalent -----------------------------------------------------------


class LocalAdmission:
    """The same algorithm in one process, under a lock. Exact for one process only (said in the console)."""

    backend_name = "local"
    settles_slots = False  # a scheduler slot's Redis half is never settled here (serving.scheduler.FairScheduler.detach)

    def __init__(self, usage_loader: UsageLoader = ledger_usage):
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str], tuple[float, float]] = {}  # (tenant, 'rpm'|'tpm') -> (tokens, ts)
        self._quota: dict[tuple[int, str], dict[str, int]] = {}  # (tenant, window) -> used/reserved/warned
        self._inflight: dict[int, dict[str, float]] = {}  # tenant -> rid -> lease expiry
        self._reservations: dict[str, Reservation] = {}
        self._usage_loader = usage_loader

    def _bucket(self, key, cap: int, now: float) -> float:
        if cap <= 0:
            return 0.0
        tokens, ts = self._buckets.get(key, (float(cap), now))
        return min(float(cap), tokens + (now - min(ts, now)) * cap / 60.0)

    async def admit(self, limits: TenantLimits, *, request_id: str, reserve_tokens: int, slot_offer=None) -> Decision:
        """Admit or refuse. `slot_offer` (the scheduler's, with Redis only) is never taken here."""
        window = window_id(limits.quota_window)
        qkey = (limits.tenant_id, window)
        if limits.quota_tokens and qkey not in self._quota:
            try:
                used = await self._usage_loader(limits.tenant_id, limits.quota_window, window)
            except DatabaseError:
                return _usage_unavailable()
            with self._lock:
                self._quota.setdefault(qkey, {"used": used, "reserved": 0, "warned": 0})
        with self._lock:
            res = self._admit_locked(limits, request_id, reserve_tokens, window)
        return _decision(limits, request_id, reserve_tokens, res, self.backend_name, window)

    def _admit_locked(self, limits: TenantLimits, rid: str, n: int, window: str) -> list:
        now = time.monotonic()
        t = limits.tenant_id
        quota = self._quota.setdefault((t, window), {"used": 0, "reserved": 0, "warned": 0})
        hard = limits.quota_mode == "hard"
        throttled = (not hard) and limits.quota_tokens > 0 and quota["used"] + quota["reserved"] >= limits.quota_tokens
        eff_tpm = throttle_tpm() if throttled else limits.tokens_per_minute
        rpm = limits.requests_per_minute
        r_tokens = self._bucket((t, "rpm"), rpm, now)
        t_tokens = self._bucket((t, "tpm"), eff_tpm, now)
        inflight = self._inflight.setdefault(t, {})
        for rid_, expiry in list(inflight.items()):
            if expiry <= now:
                del inflight[rid_]
        status, retry = OK, 0
        if limits.max_concurrent and len(inflight) >= limits.max_concurrent:
            status, retry = CONCURRENCY, 1000
        elif rpm and r_tokens < 1:
            status, retry = RPM, math.ceil((1 - r_tokens) * 60000 / rpm)
        elif eff_tpm and n > eff_tpm:
            status, retry = TPM_TOO_LARGE, 60000
        elif eff_tpm and t_tokens < n:
            status, retry = TPM, math.ceil((n - t_tokens) * 60000 / eff_tpm)
        elif hard and limits.quota_tokens and quota["used"] + quota["reserved"] + n > limits.quota_tokens:
            # Only in-flight reservations in the way? They settle within seconds: retry soon, not next window.
            status, retry = (QUOTA_RESERVED, 1000) if quota["used"] + n <= limits.quota_tokens else (QUOTA, 0)
        warn = 0
        if rpm and status != RPM and r_tokens >= 1:  # every request counts, but one refused for requests/min
            r_tokens -= 1
            self._buckets[(t, "rpm")] = (r_tokens, now)
        if status == OK:
            if eff_tpm:
                t_tokens -= n
                self._buckets[(t, "tpm")] = (t_tokens, now)
            quota["reserved"] += n
            inflight[rid] = now + LOCAL_LEASE_S
            self._reservations[rid] = Reservation(t, rid, n, window, eff_tpm, self.backend_name)
            if limits.quota_tokens and quota["used"] + quota["reserved"] >= WARN_FRACTION * limits.quota_tokens and not quota["warned"]:
                quota["warned"] = warn = 1
        return [status, retry, math.floor(r_tokens), math.floor(t_tokens), quota["used"] + quota["reserved"], int(throttled), warn, eff_tpm,
                "", _rpm_wait_ms(rpm, r_tokens)]

    async def count_refused(self, limits: TenantLimits) -> Decision:
        """A request refused before admission (unreadable, invalid, past the context): one request off the tenant's
        requests/min, unless its bucket is already empty (mirrors lua/rpm_count.lua)."""
        rpm = limits.requests_per_minute
        if not rpm:
            return _rpm_counted(limits, 0, 0)
        with self._lock:
            now = time.monotonic()
            key = (limits.tenant_id, "rpm")
            r_tokens = self._bucket(key, rpm, now)
            if r_tokens >= 1:
                r_tokens -= 1
                self._buckets[key] = (r_tokens, now)
        return _rpm_counted(limits, math.floor(r_tokens), _rpm_wait_ms(rpm, r_tokens))

    async def settle(self, reservation: Reservation | None, *, used_tokens: int) -> None:
        if reservation is None:
            return
        self._settle_locally(reservation, used_tokens)
        if reservation.on_settled is not None:
            reservation.on_settled()

    async def settle_recovered(self, reservation: Reservation, *, used_tokens: int, committed_ms: int = 0) -> None:
        """A request of a process that died (its journal): count its tokens if this process counts its window.

        The embedded default has one process: what died with it is gone, and the counter it rebuilds comes
        from the ledger (the recovery writes the records before this process admits anything)."""
        with self._lock:
            quota = self._quota.get((reservation.tenant_id, reservation.window))
            if quota is not None and reservation.request_id not in self._reservations:
                quota["used"] += used_tokens
        self._settle_locally(reservation, used_tokens)

    def _settle_locally(self, reservation: Reservation, used_tokens: int) -> None:
        with self._lock:
            if self._reservations.pop(reservation.request_id, None) is None:
                return  # already settled: exactly once
            t = reservation.tenant_id
            self._inflight.get(t, {}).pop(reservation.request_id, None)
            quota = self._quota.get((t, reservation.window))
            if quota is not None:
                quota["reserved"] -= reservation.tokens
                quota["used"] += used_tokens
            if reservation.tpm_cap and (t, "tpm") in self._buckets:
                tokens, ts = self._buckets[(t, "tpm")]
                self._buckets[(t, "tpm")] = (min(float(reservation.tpm_cap), tokens + reservation.tokens - used_tokens), ts)

    def snapshot(self, tenant_id: int, kind: str) -> dict[str, int]:
        """Used and reserved tokens in the current window (for the console and tests)."""
        quota = self._quota.get((tenant_id, window_id(kind)), {"used": 0, "reserved": 0})
        return {"used": quota["used"], "reserved": quota["reserved"]}


# ---- Redis, shared by every gateway process --------------------------------------------------------


class RedisUnavailable(Exception):
    pass


def _window_kind(window: str) -> str:
    return "day" if len(window) == 8 else "month"


def _admit_take_source(admit_src: str, take_src: str) -> str:
    """admit.lua, then (if admitted) slot_take.lua, as one script: the admission and the scheduler's fast-path slot in
    one round trip. KEYS: admit's 6, then slot_take's 3. ARGV: admit's 11, slot_take's 7, then the charge and the
    charge if throttled (the tenant's weight ÷ 10). Returns admit's list, plus 1 (slot taken) or 0 when admitted.
    Its keys span a tenant's hash tag and a pool's: one Redis node (docs/limits.md, "Round trips")."""
    return (
        "local function admit(KEYS, ARGV)\n" + admit_src + "\nend\n"
        "local function take(KEYS, ARGV)\n" + take_src + "\nend\n"
        "local a = admit({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {unpack(ARGV, 1, 11)})\n"
        "if a[1] ~= 0 then return a end\n"
        "local targs = {unpack(ARGV, 12, 18)}\n"
        "targs[8] = (a[6] == 1) and ARGV[20] or ARGV[19]\n"
        "a[#a + 1] = take({KEYS[7], KEYS[8], KEYS[9]}, targs)\n"
        "return a\n"
    )


def _settle_free_source(settle_src: str, free_src: str) -> str:
    """settle.lua, then slot_free.lua, as one script: a request's settle and its scheduler slot's release (its Redis
    half: serving.scheduler.FairScheduler.detach) in one round trip. KEYS: settle's 6, then slot_free's 2. ARGV:
    settle's 7, then slot_free's 3. Returns settle's answer."""
    return (
        "local function settle(KEYS, ARGV)\n" + settle_src + "\nend\n"
        "local function free(KEYS, ARGV)\n" + free_src + "\nend\n"
        "local r = settle({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, {unpack(ARGV, 1, 7)})\n"
        "free({KEYS[7], KEYS[8]}, {ARGV[8], ARGV[9], ARGV[10]})\n"
        "return r\n"
    )


class RedisAdmission:
    backend_name = "redis"
    settles_slots = True  # settle(slot_free=…): the scheduler slot's release in the settle's round trip

    def __init__(self, url: str, *, usage_loader: UsageLoader = ledger_usage, fallback: LocalAdmission | None = None):
        self.url = url
        self._usage_loader = usage_loader
        self.fallback = fallback or LocalAdmission(usage_loader)
        self._clients: dict[int, object] = {}
        self._pipes: dict[int, tuple] = {}  # event loop id -> (loop, {name: script})
        self._sources = {name: (LUA_DIR / f"{name}.lua").read_text()
                         for name in ("admit", "settle", "seed_begin", "seed_end", "sweep", "rpm_count")}
        self._sources["admit_take"] = _admit_take_source(self._sources["admit"], (LUA_DIR / "slot_take.lua").read_text())
        self._sources["settle_free"] = _settle_free_source(self._sources["settle"], (LUA_DIR / "slot_free.lua").read_text())

    def _client(self):
        """redis-py's client of the calling event loop, for what is not a per-request script (the console's snapshot)."""
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            # A blocking pool: under a burst, callers wait for a connection instead of failing.
            client = redis_clients.async_client(self.url, max_connections=16)
            self._clients[loop_id] = client
            self.keeper().add_pool(client)
        return client

    def _pipe(self):
        """The scripts of the calling event loop, on its pipelined connection (common/redis_clients.PipelinedClient): a
        request's admission and settle each cost a write and a future, not a pooled redis-py call."""
        loop = asyncio.get_running_loop()
        held = self._pipes.get(id(loop))
        if held is None or held[0] is not loop:
            client = redis_clients.pipelined_client(self.url)
            held = self._pipes[id(loop)] = (loop, {name: client.register_script(src) for name, src in self._sources.items()})
            self.keeper().add_pool(client)
        return held[1]

    def keeper(self):
        return keeper_for(self.url)

    @staticmethod
    def _keys(t: int, window: str) -> list[str]:
        p = f"mtl:{{t{t}}}:"
        return [p + "rpm", p + "tpm", p + "quota:" + window, p + "inflight", p + "res", p + "quota:" + window + ":pre"]

    async def _call(self, fn):
        keeper = self.keeper()
        if not keeper.up:
            raise RedisUnavailable("Redis is unreachable (probed in the background)")
        try:
            return await fn(self._client())
        except redis_errors() as exc:
            keeper.mark_down(exc)
            raise_if_cancelled()
            raise RedisUnavailable(str(exc)) from exc

    async def _script(self, name: str, keys: list, args: list):
        keeper = self.keeper()
        if not keeper.up:
            raise RedisUnavailable("Redis is unreachable (probed in the background)")
        try:
            return await self._pipe()[name](keys=keys, args=args)
        except redis_errors() as exc:
            keeper.mark_down(exc)
            raise_if_cancelled()
            raise RedisUnavailable(str(exc)) from exc

    async def admit(self, limits: TenantLimits, *, request_id: str, reserve_tokens: int, slot_offer=None) -> Decision:
        """Admit or refuse, in one script. With `slot_offer` (serving.scheduler.FairScheduler.offer: the pool's fast
        path), an admitted request also takes its scheduler slot in the same script: one round trip for both."""
        window = window_id(limits.quota_window)
        keys = self._keys(limits.tenant_id, window)
        args = [
            request_id,
            reserve_tokens,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.quota_tokens,
            1 if limits.quota_mode == "hard" else 0,
            limits.max_concurrent,
            throttle_tpm(),
            window_ttl_s(limits.quota_window),
            leases.LEASE_MS,  # renewed while the request runs: a dead process's entries free themselves after this
            window,
        ]
        script, script_keys = "admit", keys[:6]
        if slot_offer is not None:
            _, slot_keys, slot_args, charge, throttled_charge = slot_offer
            script, script_keys = "admit_take", keys[:6] + slot_keys
            args = args + slot_args + [repr(float(charge)), repr(float(throttled_charge))]
        try:
            for _ in range(SEED_ATTEMPTS + 1):
                res = await self._script(script, script_keys, args)
                if res[0] != NEED_SEED:
                    decision = _decision(limits, request_id, reserve_tokens, res, self.backend_name, window)
                    if decision.reservation is not None:
                        self.keeper().track_reservation(decision.reservation)  # renewed while it runs
                        decision.slot_taken = len(res) > 10 and res[10] == 1
                    return decision
                try:
                    await self._seed(limits, window, keys)
                except DatabaseError:
                    return _usage_unavailable()
            raise RedisUnavailable("the quota counter could not be seeded from the ledger (settles kept coming in)")
        except RedisUnavailable:
            if limits.hard:
                return Decision(
                    False,
                    {"retry-after": "5"},
                    status=503,
                    error_type="service_unavailable",
                    code="limits_unavailable",
                    message="The rate-limit service is unavailable, so requests under a hard quota are refused. Retry in a few seconds.",
                    retry_after=5,
                )
            decision = await self.fallback.admit(limits, request_id=request_id, reserve_tokens=reserve_tokens)
            if decision.reservation is not None:
                self.keeper().track_reservation(decision.reservation)  # registered in Redis once it answers
            return decision

    async def count_refused(self, limits: TenantLimits) -> Decision:
        """A request refused before admission: one request off the tenant's requests/min in Redis (one round trip, on
        the refusal path only), unless its bucket is already empty; in this process's bucket while Redis is away."""
        rpm = limits.requests_per_minute
        if not rpm:
            return _rpm_counted(limits, 0, 0)
        try:
            left, wait_ms = await self._script("rpm_count", [f"mtl:{{t{limits.tenant_id}}}:rpm"], [rpm])
        except RedisUnavailable:
            return await self.fallback.count_refused(limits)
        return _rpm_counted(limits, int(left), int(wait_ms))

    async def _seed(self, limits: TenantLimits, window: str, keys: list[str]) -> None:
        """Seed the window's counter from the ledger, leaving out the requests Redis counts itself."""
        seed_keys = [keys[2], keys[5], keys[4]]
        begun = await self._script("seed_begin", seed_keys, [window])
        if begun[0] == 1:
            return
        version, excluded = begun[1], begun[2]
        used = await self._usage_loader(limits.tenant_id, limits.quota_window, window, exclude=frozenset(excluded))
        await self._script("seed_end", seed_keys, [window, version, used, window_ttl_s(limits.quota_window)])

    async def settle(self, reservation: Reservation | None, *, used_tokens: int, slot_free=None) -> None:
        """Count the request's tokens and free its reservation, exactly once; queued for retry when Redis
        cannot take it now (reservation.on_settled is called when it has happened). `slot_free`: the Redis half of
        the request's scheduler slot's release (serving.scheduler.FairScheduler.detach), in the same script."""
        if reservation is None:
            return
        if reservation.backend == "local":
            self.fallback._settle_locally(reservation, used_tokens)  # this process's limits, then Redis's counters
            mode = "l"
        else:
            mode = "r"
        keeper = self.keeper()
        keeper.untrack_reservation(reservation)
        await keeper.run_or_defer(lambda: self._settle_in_redis(reservation, used_tokens, mode, slot_free), reservation.on_settled,
                                  what=f"settle {reservation.request_id}")

    async def settle_recovered(self, reservation: Reservation, *, used_tokens: int, committed_ms: int = 0) -> None:
        """Settle a request of a process that died, from its journal (serving/journal.py). Returns once done:
        at once, or when Redis answers again. committed_ms: when its ledger record was written (0: not yet)."""
        reservation.committed_ms = committed_ms
        done = asyncio.get_running_loop().create_future()

        def settled() -> None:
            if not done.done():
                done.set_result(None)

        await self.keeper().run_or_defer(lambda: self._settle_in_redis(reservation, used_tokens, "n"), settled,
                                         what=f"settle recovered {reservation.request_id}")
        await done

    async def _settle_in_redis(self, reservation: Reservation, used_tokens: int, mode: str, slot_free=None) -> None:
        p = f"mtl:{{t{reservation.tenant_id}}}:"
        w = reservation.window
        keys = [p + "tpm", p + "inflight", p + "res", p + "quota:" + w, p + "quota:" + w + ":pre", p + "done"]
        args = [reservation.request_id, used_tokens, reservation.tpm_cap, mode, reservation.life, reservation.committed_ms or 0,
                window_ttl_s(_window_kind(w))]
        scripts = self._pipe()
        if slot_free is None:
            await scripts["settle"](keys=keys, args=args)
        else:
            await scripts["settle_free"](keys=keys + slot_free[0], args=args + slot_free[1])

    async def snapshot(self, tenant_id: int, kind: str) -> dict[str, int]:
        """Used and reserved tokens of the current window, after releasing what dead processes held."""
        keys = self._keys(tenant_id, window_id(kind))
        await self._script("sweep", [keys[3], keys[4]], [])
        data = await self._call(lambda c: c.hgetall(keys[2]))
        return {"used": int(data.get("used", 0)), "reserved": int(data.get("reserved", 0))}


_admission = None
_admission_lock = threading.Lock()


def get_admission():
    """The process's admission service: Redis when REDIS_URL is set, else in-process."""
    global _admission
    if _admission is None:
        with _admission_lock:
            if _admission is None:
                _admission = RedisAdmission(settings.REDIS_URL) if settings.REDIS_URL else LocalAdmission()
    return _admission


def reset_admission() -> None:
    """Forget the process's admission state (tests, and settings changes)."""
    global _admission
    _admission = None
