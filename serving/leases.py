"""Leases in Redis kept alive by one task per gateway process, and Redis writes that must not be lost retried.

Scheduler slots and admission's in-flight entries are leases of LEASE_MS (10 s): a process that dies stops
renewing them, so what it held frees itself within seconds instead of blocking a pool or a tenant's
concurrency. The process renews everything it holds every RENEW_S with one pipelined round trip (one Lua
call per pool and per tenant), never a call per request.

The same renewal re-registers what Redis lost: a reservation of this process whose record is gone because
Redis restarted empty, and a reservation admitted by the per-process fallback while Redis was unreachable
(serving/admission.py). Redis then knows every request in flight again.

A Redis write that must happen (a settle, a slot's release, a scheduler counter's correction) is tried at
once; when Redis is unreachable it is queued here and retried with backoff off the request path, in the
order queued, until Redis answers. While Redis is known to be down (`up` false) callers do not try it at all:
they use their per-process fallback at once, and this task probes Redis (PING, backoff 0.1 s to 2 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import redis_clients

log = logging.getLogger(__name__)

LEASE_MS = 10_000  # slots and in-flight entries of a process that stopped renewing free themselves after this
RENEW_S = 2.5  # four renewals per lease: a Redis pause of up to 7 s loses no live lease
PROBE_S, PROBE_MAX_S = 0.1, 2.0  # backoff of the probes while Redis is down
LUA_DIR = Path(__file__).with_name("lua")


def window_ttl_s(kind: str) -> int:
    """How long Redis keeps a quota window's counters: past the window's end, so a late settle still finds them."""
    return 2 * 86400 if kind == "day" else 35 * 86400


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is unreachable, paused, restarting, failing over or out of memory
    (then: fall back, retry). Other errors (a script's bug) are not outages: they propagate, and are logged."""
    from redis import exceptions as e

    return (e.ConnectionError, e.TimeoutError, e.ReadOnlyError, e.MasterDownError, e.ClusterDownError, e.TryAgainError,
            e.OutOfMemoryError, OSError, asyncio.TimeoutError)


def raise_if_cancelled() -> None:
    """redis-py sometimes swallows a cancellation (while it drops a connection): honour it after a Redis call."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisKeeper:
    """One per Redis URL and event loop (`keeper_for`). Not thread-safe: used from its event loop only."""

    def __init__(self, url: str):
        self.url = url
        self.loop = asyncio.get_running_loop()
        self.up = True
        self.renewals = 0  # completed renewal rounds (tests, metrics)
        self._client = None
        self._scripts = None
        self._slots: dict[str, set[str]] = {}  # pool slots zset key -> members held by this process
        self._reservations: dict[int, dict[str, object]] = {}  # tenant -> rid -> admission Reservation
        self._deferred: deque[tuple[Callable[[], Awaitable], Callable[[], None] | None, str]] = deque()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._down_since = 0.0
        self._last_renew = 0.0
        self._pools: list = []  # connection pools of this loop's clients, emptied when Redis answers again

    # ---- what this process holds ----------------------------------------------------------------

    def track_slot(self, key: str, member: str) -> None:
        self._slots.setdefault(key, set()).add(member)
        self._ensure_task()

    def untrack_slot(self, key: str, member: str) -> None:
        members = self._slots.get(key)
        if members is not None:
            members.discard(member)
            if not members:
                del self._slots[key]

    def track_reservation(self, reservation) -> None:
        self._reservations.setdefault(reservation.tenant_id, {})[reservation.request_id] = reservation
        self._ensure_task()

    def untrack_reservation(self, reservation) -> None:
        held = self._reservations.get(reservation.tenant_id)
        if held is not None:
            held.pop(reservation.request_id, None)
            if not held:
                del self._reservations[reservation.tenant_id]

    @property
    def held(self) -> tuple[int, int]:
        """(slots, reservations) this process holds."""
        return sum(map(len, self._slots.values())), sum(map(len, self._reservations.values()))

    @property
    def deferred(self) -> int:
        """Redis writes waiting for Redis to answer."""
        return len(self._deferred)

    # ---- writes that must happen --------------------------------------------------------------------

    async def run_or_defer(self, op: Callable[[], Awaitable], on_done: Callable[[], None] | None = None, *, what: str = "") -> bool:
        """Run `op` now if Redis is up, else (or when it fails) queue it for retry. True when it ran now.

        `on_done` is called once `op` has succeeded, now or later. `op` must be idempotent: after a timeout it
        may have run although it raised.
        """
        if self.up:
            try:
                await op()
            except redis_errors() as exc:
                self.mark_down(exc)
                raise_if_cancelled()
            else:
                if on_done is not None:
                    on_done()
                return True
        self._deferred.append((op, on_done, what))
        self._ensure_task()
        self._wake.set()
        return False

    def add_pool(self, client) -> None:
        """Drop `client`'s idle connections whenever Redis answers again: after a restart they are all dead,
        and each would fail one more request."""
        self._pools.append(client.connection_pool)

    def mark_down(self, exc: BaseException) -> None:
        if self.up:
            self.up = False
            self._down_since = time.monotonic()
            log.warning("Redis at %s is unreachable (%s: %s): limits and scheduling fall back to this process, and "
                        "Redis writes are queued and retried until it answers.", self.url, type(exc).__name__, exc)
        self._ensure_task()
        self._wake.set()

    # ---- the task -----------------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-keeper")

    def _redis(self):
        if self._client is None:
            self._client = redis_clients.async_client(self.url, max_connections=4)
            self._scripts = (
                self._client.register_script((LUA_DIR / "renew_slots.lua").read_text()),
                self._client.register_script((LUA_DIR / "renew_reservations.lua").read_text()),
            )
        return self._client

    async def _run(self) -> None:
        backoff = PROBE_S
        while True:
            raise_if_cancelled()
            if self.up:
                wait = 0.0 if self._deferred else max(0.0, self._last_renew + RENEW_S - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
            else:
                await asyncio.sleep(backoff)
                backoff = min(PROBE_MAX_S, backoff * 2)
            try:
                if not self.up:
                    await self._redis().ping()
                    for pool in self._pools:
                        await pool.disconnect(inuse_connections=False)
                if not self.up or time.monotonic() - self._last_renew >= RENEW_S:
                    await self.renew()
                await self._drain()
            except redis_errors() as exc:
                self.mark_down(exc)
                continue
            except Exception:  # a bug must not stop renewals for good
                log.exception("Redis keeper round failed")
                await asyncio.sleep(RENEW_S)
                continue
            if not self.up:
                log.warning("Redis at %s answers again after %.1f s: leases renewed, queued writes done.", self.url,
                            time.monotonic() - self._down_since)
                self.up = True
            backoff = PROBE_S

    async def renew(self) -> None:
        """Extend (or re-create) every lease this process holds, in one round trip."""
        self._last_renew = time.monotonic()
        if not self._slots and not self._reservations:
            self.renewals += 1
            return
        client = self._redis()
        renew_slots, renew_res = self._scripts
        slots = {key: list(members) for key, members in self._slots.items()}
        reservations = {t: list(held.values()) for t, held in self._reservations.items()}
        async with client.pipeline(transaction=False) as pipe:
            for key, members in slots.items():
                await renew_slots(keys=[key], args=[LEASE_MS, *members], client=pipe)
            for tenant_id, held in reservations.items():
                p = f"mtl:{{t{tenant_id}}}:"
                args = [LEASE_MS, max(window_ttl_s("month"), 1)]
                for r in held:
                    args += [r.request_id, r.tokens, r.window, 1 if r.tpm_cap else 0, r.life]
                await renew_res(keys=[p + "inflight", p + "res", p + "done"], args=args, client=pipe)
            replies = await pipe.execute()
        # A slot released while the renewal was on its way may have been re-added by it: release it again.
        stale = [(key, m) for key, members in slots.items() for m in members if m not in self._slots.get(key, ())]
        if stale:
            async with client.pipeline(transaction=False) as pipe:
                for key, m in stale:
                    pipe.zrem(key, m)
                await pipe.execute()
        for (tenant_id, held), reply in zip(reservations.items(), replies[len(slots):]):
            life, registered = reply[0], set(reply[1:])
            for r in held:
                if r.request_id in registered:
                    if r.backend == "redis":
                        log.warning("reservation %s of tenant %s was missing in Redis (restarted?): registered again",
                                    r.request_id, tenant_id)
                    r.life = life
        self.renewals += 1

    async def _drain(self) -> None:
        while self._deferred:
            op, on_done, what = self._deferred[0]
            try:
                await op()
            except redis_errors():
                raise
            except Exception:
                log.exception("a queued Redis write (%s) failed and is dropped", what or op)
            else:
                if on_done is not None:
                    try:
                        on_done()
                    except Exception:
                        log.exception("callback after a queued Redis write failed")
            self._deferred.popleft()


_keepers: dict[tuple[str, int], RedisKeeper] = {}


def keeper_for(url: str) -> RedisKeeper:
    """The keeper of this Redis URL for the running event loop."""
    loop = asyncio.get_running_loop()
    key = (url, id(loop))
    keeper = _keepers.get(key)
    if keeper is None or keeper.loop is not loop:  # (an ended loop's id can be reused)
        if len(_keepers) > 64:  # tests run many short event loops: forget the ones that ended
            for k, v in list(_keepers.items()):
                if v._task is None or v._task.done():
                    _keepers.pop(k, None)
        keeper = _keepers[key] = RedisKeeper(url)
    return keeper


def reset_keepers() -> None:
    """Forget every keeper (tests, and settings changes)."""
    for keeper in _keepers.values():
        if keeper._task is not None and not keeper._task.done():
            keeper._task.cancel()
    _keepers.clear()
