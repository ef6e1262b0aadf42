"""Weighted fair scheduling of a saturated pool: the Virtual Token Counter (Sheng et al., OSDI 2024).

Each pool lets `capacity` requests run at once. Past that, requests wait in per-tenant FIFO queues and
the backlogged tenant with the smallest counter goes next (ties: fewer running, then the oldest). A
dispatched request adds (estimated prompt + 2 · predicted output) / weight to its tenant's counter; when it
ends, both are replaced by the real counts (a proxy sees no decode steps, so it charges by estimate and
settles). A tenant that becomes backlogged is lifted to the smallest backlogged counter less the cost of its
first request, so it goes next once and idle time banks no further credit. Throttled tenants (over a soft
quota) count with a tenth of their weight: served after others, never starved.

Express slots: a request that finds the pool full, from a tenant with nothing running on it and nothing else
waiting (a light tenant's occasional request), may take one of `express` slots beyond the capacity instead of
waiting for a heavy tenant's request to end. It is charged as any other; a backlogged tenant never qualifies,
so weighted shares under overload are unchanged. Without it a light tenant's wait is up to one service time.

With Redis, slots (leases), counters and the backlog are shared by every gateway process: a slot is
refused to a tenant while another process has a tenant waiting that goes first. Without Redis, all of it
lives in the process. docs/limits.md has the details. A slot is taken and charged in one step, and freed and
its charge corrected in one step; on the fast path the gateway takes it in admission's own script (`offer`,
`adopt`) and frees it in the settle's (`detach`): two Redis round trips per request (docs/limits.md, "Round trips").

Faults: slots are 10-s leases that the process's keeper renews while the request runs (serving/leases.py),
so a dead process's slots free themselves within seconds. A Redis call that fails never leaks or fails a
request: while Redis is unreachable each process schedules alone (ResilientState: its own slots, up to the
pool's capacity, and its own counters), a release or counter correction Redis could not take is retried
until it can, and the slots taken meanwhile are registered in Redis when it answers again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from common import redis_clients
from serving import leases
from serving.leases import keeper_for, raise_if_cancelled, redis_errors

log = logging.getLogger(__name__)

INPUT_WEIGHT, OUTPUT_WEIGHT = 1, 2  # cost = input + 2 · output, as in the paper
THROTTLED_WEIGHT_FACTOR = 0.1
REMOTE_POLL_S = 0.005  # how often a waiting process looks for slots freed by other processes
BACKLOG_STALE_MS = 2000  # a process that stops refreshing its backlog entries (crashed) is ignored after this
HEARTBEAT_S = 0.25
LUA_DIR = Path(__file__).with_name("lua")


class SchedulerTimeout(Exception):
    """A request waited longer than the queue limit for a slot."""


@dataclass
class Slot:
    pool_id: int
    tenant_id: int
    slot_id: str
    weight: float
    predicted_output: int
    input_tokens: int = 0  # the prompt tokens charged at dispatch (the estimate, scaled by what was learned)
    input_estimate: int = 0  # the caller's estimate, to learn how far off it is
    queued_s: float = 0.0
    released: bool = False  # released once: a second release does nothing


@dataclass
class _Waiter:
    future: asyncio.Future
    tenant_id: int
    weight: float
    input_tokens: int
    predicted_output: int
    enqueued: float = field(default_factory=time.monotonic)


# ---- shared state: in-process or Redis ------------------------------------------------------------


class LocalState:
    """Slots and counters in this process (the embedded default)."""

    shared = False

    def __init__(self):
        self._slots: dict[int, dict[str, int]] = {}  # pool -> slot id -> tenant
        self._counters: dict[int, dict[int, float]] = {}

    async def take_slot(self, pool_id: int, capacity: int, slot_id: str, tenant_id: int, *, fair: bool = True,
                        express: int = 0, charge: float = 0.0) -> bool:
        """Take a slot; when taken, `charge` is added to the tenant's counter in the same step."""
        slots = self._slots.setdefault(pool_id, {})
        if len(slots) >= capacity and (len(slots) >= capacity + express or tenant_id in slots.values()):
            return False
        slots[slot_id] = tenant_id
        if charge:
            await self.add(pool_id, tenant_id, charge)
        return True

    async def free_slot(self, pool_id: int, slot_id: str, tenant_id: int, *, correction: float = 0.0) -> None:
        """Free a slot and add `correction` to the tenant's counter in the same step."""
        self.detach_slot(pool_id, slot_id, tenant_id, correction)

    def detach_slot(self, pool_id: int, slot_id: str, tenant_id: int, correction: float):
        """free_slot, at once (nothing in Redis: None)."""
        self._slots.get(pool_id, {}).pop(slot_id, None)
        if correction:
            c = self._counters.setdefault(pool_id, {})
            c[tenant_id] = c.get(tenant_id, 0.0) + correction
        return None

    async def counters(self, pool_id: int, tenants: list[int]) -> dict[int, float]:
        c = self._counters.setdefault(pool_id, {})
        return {t: c.get(t, 0.0) for t in tenants}

    async def add(self, pool_id: int, tenant_id: int, amount: float) -> None:
        c = self._counters.setdefault(pool_id, {})
        c[tenant_id] = c.get(tenant_id, 0.0) + amount

    async def join_backlog(self, pool_id: int, tenant_id: int, local_backlogged: list[int], first_cost: float) -> None:
        """Lift a newly backlogged tenant to the smallest counter of the others backlogged, less its first request."""
        c = self._counters.setdefault(pool_id, {})
        others = [c.get(t, 0.0) for t in local_backlogged if t != tenant_id]
        if others:
            c[tenant_id] = max(c.get(tenant_id, 0.0), min(others) - first_cost)

    async def leave_backlog(self, pool_id: int, tenant_id: int) -> None:
        return None

    async def heartbeat(self, pool_id: int, tenants: list[int]) -> None:
        return None

    async def in_use(self, pool_id: int) -> int:
        return len(self._slots.get(pool_id, ()))


class RedisState:
    """Slots, counters and the backlog of a pool in Redis, shared by every gateway process.

    Each process registers the tenants it has waiting (with a heartbeat); a slot is refused to a tenant
    while another process has a tenant waiting that goes first, so a light tenant behind one process is
    not overtaken by a heavy one behind another.
    """

    shared = True

    def __init__(self, url: str):
        self.url = url
        self.proc = uuid.uuid4().hex[:10]  # this process in the pool's backlog
        self._clients: dict[int, tuple] = {}  # event loop id -> (loop, client, scripts)
        self._take_src = (LUA_DIR / "slot_take.lua").read_text()
        self._join_src = (LUA_DIR / "backlog_join.lua").read_text()
        self._free_src = (LUA_DIR / "slot_free.lua").read_text()

    def _client(self):
        """(client, (slot_take, backlog_join, slot_free)) of the calling event loop: its pipelined connection
        (common/redis_clients.PipelinedClient), as admission's."""
        loop = asyncio.get_running_loop()
        held = self._clients.get(id(loop))
        if held is None or held[0] is not loop:
            client = redis_clients.pipelined_client(self.url)
            keeper_for(self.url).add_pool(client)
            scripts = tuple(client.register_script(src) for src in (self._take_src, self._join_src, self._free_src))
            held = self._clients[id(loop)] = (loop, client, scripts)
        return held[1], held[2]

    @staticmethod
    def _key(pool_id: int, what: str) -> str:
        return f"mtl:{{p{pool_id}}}:{what}"

    @classmethod
    def slots_key(cls, pool_id: int) -> str:
        return cls._key(pool_id, "slots")

    def take_call(self, pool_id: int, capacity: int, slot_id: str, tenant_id: int, *, fair: bool = True, express: int = 0,
                  charge: float = 0.0) -> tuple[list, list]:
        """(keys, args) of slot_take.lua: the admission's fast path runs it in the same script (serving.admission)."""
        keys = [self._key(pool_id, "slots"), self._key(pool_id, "vtc"), self._key(pool_id, "waiting")]
        args = [slot_id, capacity, leases.LEASE_MS, tenant_id, BACKLOG_STALE_MS, "1" if fair else "0", express, repr(float(charge))]
        return keys, args

    async def take_slot(self, pool_id: int, capacity: int, slot_id: str, tenant_id: int, *, fair: bool = True,
                        express: int = 0, charge: float = 0.0) -> bool:
        keys, args = self.take_call(pool_id, capacity, slot_id, tenant_id, fair=fair, express=express, charge=charge)
        return bool(await self._client()[1][0](keys=keys, args=args))

    def free_call(self, pool_id: int, slot_id: str, tenant_id: int, correction: float) -> tuple[list, list]:
        """(keys, args) of slot_free.lua: a request's settle runs it in the same script (serving.admission)."""
        return [self._key(pool_id, "slots"), self._key(pool_id, "vtc")], [f"{tenant_id}:{slot_id}", tenant_id, repr(float(correction))]

    async def free_slot(self, pool_id: int, slot_id: str, tenant_id: int, *, correction: float = 0.0) -> None:
        keys, args = self.free_call(pool_id, slot_id, tenant_id, correction)
        await self._client()[1][2](keys=keys, args=args)

    async def counters(self, pool_id: int, tenants: list[int]) -> dict[int, float]:
        values = await self._client()[0].execute_command("HMGET", self._key(pool_id, "vtc"), *[str(t) for t in tenants])
        return {t: float(v or 0.0) for t, v in zip(tenants, values)}

    async def add(self, pool_id: int, tenant_id: int, amount: float) -> None:
        await self._client()[0].execute_command("HINCRBYFLOAT", self._key(pool_id, "vtc"), str(tenant_id), float(amount))

    async def join_backlog(self, pool_id: int, tenant_id: int, local_backlogged: list[int], first_cost: float) -> None:
        keys = [self._key(pool_id, "vtc"), self._key(pool_id, "waiting")]
        await self._client()[1][1](keys=keys, args=[self.proc, tenant_id, BACKLOG_STALE_MS, repr(first_cost)])

    async def leave_backlog(self, pool_id: int, tenant_id: int) -> None:
        await self._client()[0].execute_command("HDEL", self._key(pool_id, "waiting"), f"{self.proc}|{tenant_id}")

    async def heartbeat(self, pool_id: int, tenants: list[int]) -> None:
        if tenants:
            now_ms = int(time.time() * 1000)
            fields = [x for t in tenants for x in (f"{self.proc}|{t}", now_ms)]
            await self._client()[0].execute_command("HSET", self._key(pool_id, "waiting"), *fields)

    async def in_use(self, pool_id: int) -> int:
        c = self._client()[0]
        await c.execute_command("ZREMRANGEBYSCORE", self._key(pool_id, "slots"), "-inf", int(time.time() * 1000))
        return int(await c.execute_command("ZCARD", self._key(pool_id, "slots")))


class ResilientState:
    """RedisState, with this process's own state while Redis is unreachable (the gateway's state with Redis).

    Every slot this process takes is also kept in its LocalState, so that, while Redis is away, the process
    runs at most the pool's capacity itself. Slots are leases renewed by the process's keeper, which also
    registers in Redis the slots taken while it was away; releases and counter corrections that Redis could
    not take are retried until it can. Nothing here raises because of Redis.
    """

    shared = True

    def __init__(self, redis_state: RedisState):
        self.redis = redis_state
        self.local = LocalState()

    def _keeper(self):
        return keeper_for(self.redis.url)

    async def _try(self, call, fallback):
        keeper = self._keeper()
        if keeper.up:
            try:
                return await call()
            except redis_errors() as exc:
                keeper.mark_down(exc)
                raise_if_cancelled()
        return await fallback()

    async def take_slot(self, pool_id: int, capacity: int, slot_id: str, tenant_id: int, *, fair: bool = True,
                        express: int = 0, charge: float = 0.0) -> bool:
        """A slot, charged in the same step (one round trip with Redis up)."""
        keeper = self._keeper()
        taken = None
        if keeper.up:
            try:
                taken = await self.redis.take_slot(pool_id, capacity, slot_id, tenant_id, fair=fair, express=express, charge=charge)
            except redis_errors() as exc:
                keeper.mark_down(exc)
                raise_if_cancelled()
        if taken is None:  # Redis away: this process alone, within the pool's capacity; the charge reaches Redis later
            taken = await self.local.take_slot(pool_id, capacity, slot_id, tenant_id, fair=fair, express=express)
            if taken and charge:
                await self.add(pool_id, tenant_id, charge)
        elif taken:
            self.adopt_slot(pool_id, slot_id, tenant_id, charge)
        return taken

    def adopt_slot(self, pool_id: int, slot_id: str, tenant_id: int, charge: float) -> None:
        """A slot Redis gave this process (charged there): mirrored in the process and kept alive by its keeper."""
        self.local._slots.setdefault(pool_id, {})[slot_id] = tenant_id
        c = self.local._counters.setdefault(pool_id, {})
        c[tenant_id] = c.get(tenant_id, 0.0) + charge
        self._keeper().track_slot(RedisState.slots_key(pool_id), f"{tenant_id}:{slot_id}")

    async def free_slot(self, pool_id: int, slot_id: str, tenant_id: int, *, correction: float = 0.0) -> None:
        """Free the slot and correct the charge, in one round trip (retried until Redis takes it)."""
        await self.local.free_slot(pool_id, slot_id, tenant_id, correction=correction)
        keeper = self._keeper()
        keeper.untrack_slot(RedisState.slots_key(pool_id), f"{tenant_id}:{slot_id}")
        await keeper.run_or_defer(lambda: self.redis.free_slot(pool_id, slot_id, tenant_id, correction=correction),
                                  what=f"free slot {slot_id}")

    def detach_slot(self, pool_id: int, slot_id: str, tenant_id: int, correction: float):
        """free_slot's half in this process, now; its Redis half returned (slot_free.lua's keys and args) for the
        caller's round trip, which must be retried until Redis takes it (serving.admission: with the settle)."""
        self.local.detach_slot(pool_id, slot_id, tenant_id, correction)
        self._keeper().untrack_slot(RedisState.slots_key(pool_id), f"{tenant_id}:{slot_id}")
        return self.redis.free_call(pool_id, slot_id, tenant_id, correction)

    async def counters(self, pool_id: int, tenants: list[int]) -> dict[int, float]:
        return await self._try(lambda: self.redis.counters(pool_id, tenants), lambda: self.local.counters(pool_id, tenants))

    async def add(self, pool_id: int, tenant_id: int, amount: float) -> None:
        await self.local.add(pool_id, tenant_id, amount)
        await self._keeper().run_or_defer(lambda: self.redis.add(pool_id, tenant_id, amount), what="scheduler counter")

    async def join_backlog(self, pool_id: int, tenant_id: int, local_backlogged: list[int], first_cost: float) -> None:
        await self._try(lambda: self.redis.join_backlog(pool_id, tenant_id, local_backlogged, first_cost),
                        lambda: self.local.join_backlog(pool_id, tenant_id, local_backlogged, first_cost))

    async def leave_backlog(self, pool_id: int, tenant_id: int) -> None:
        await self._try(lambda: self.redis.leave_backlog(pool_id, tenant_id), _nothing)  # stale after 2 s anyway

    async def heartbeat(self, pool_id: int, tenants: list[int]) -> None:
        await self._try(lambda: self.redis.heartbeat(pool_id, tenants), _nothing)

    async def in_use(self, pool_id: int) -> int:
        return await self._try(lambda: self.redis.in_use(pool_id), lambda: self.local.in_use(pool_id))


async def _nothing() -> None:
    return None


# ---- the scheduler -----------------------------------------------------------------------------


class _PoolQueue:
    def __init__(self):
        self.queues: dict[int, deque[_Waiter]] = {}
        self.running: dict[int, int] = {}  # tenant -> requests of this process holding a slot
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.capacity = 1
        self.last_beat = 0.0

    def backlogged(self) -> list[int]:
        return [t for t, q in self.queues.items() if q]


class FairScheduler:
    def __init__(self, state=None, policy: str = "vtc", express_slots: int = 0):
        if policy not in ("vtc", "fcfs"):
            raise ValueError(f"Unknown scheduling policy {policy!r}: use 'vtc' or 'fcfs'.")
        self.state = state or LocalState()
        self.policy = policy
        self.express_slots = express_slots if policy == "vtc" else 0
        self._pools: dict[tuple[int, int], _PoolQueue] = {}  # (event loop id, pool id) -> queue
        self._predicted: dict[int, float] = {}  # tenant -> moving average of output tokens
        # tenant -> moving average of real ÷ estimated prompt tokens. Charging the bare estimate (an upper bound
        # made for quota reservations) inflates busy tenants' counters until their requests settle, and a
        # newcomer lifted to that inflated value then waits behind them.
        self._input_ratio: dict[int, float] = {}
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]  # this process; a counter tells its slots apart (no uuid per request)

    def _pool(self, pool_id: int) -> _PoolQueue:
        key = (id(asyncio.get_running_loop()), pool_id)
        pq = self._pools.get(key)
        if pq is None:
            pq = self._pools[key] = _PoolQueue()
        return pq

    def predict_output(self, tenant_id: int, max_output_tokens: int) -> int:
        guess = self._predicted.get(tenant_id)
        if guess is None:
            guess = max_output_tokens / 2
        return max(1, min(max_output_tokens, round(guess)))

    def charge_input(self, tenant_id: int, estimate: int) -> int:
        return max(0, round(estimate * self._input_ratio.get(tenant_id, 1.0)))

    def _new_slot_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    @staticmethod
    def _cost(slot: Slot) -> float:
        """What a dispatched request adds to its tenant's counter (estimated prompt + 2 · predicted output, ÷ weight)."""
        return (INPUT_WEIGHT * slot.input_tokens + OUTPUT_WEIGHT * slot.predicted_output) / slot.weight

    def _express(self, pq: _PoolQueue, tenant_id: int) -> int:
        # Express (module docstring): only for a tenant with nothing running here and no other request waiting;
        # the state checks that it has nothing running in any process either.
        alone = pq.running.get(tenant_id, 0) == 0 and len(pq.queues.get(tenant_id) or ()) <= 1
        return self.express_slots if alone else 0

    async def _take(self, pool_id: int, pq: _PoolQueue, slot: Slot) -> bool:
        """Take a slot for `slot` and charge its tenant, in one step."""
        ok = await self.state.take_slot(pool_id, pq.capacity, slot.slot_id, slot.tenant_id, fair=self.policy == "vtc",
                                        express=self._express(pq, slot.tenant_id), charge=self._cost(slot))
        if ok:
            pq.running[slot.tenant_id] = pq.running.get(slot.tenant_id, 0) + 1
        return ok

    def _slot(self, pool_id: int, tenant_id: int, weight: float, input_tokens: int, predicted: int) -> Slot:
        return Slot(pool_id, tenant_id, self._new_slot_id(), weight, predicted, self.charge_input(tenant_id, input_tokens), input_tokens)

    @staticmethod
    def effective_weight(weight: float, throttled: bool) -> float:
        return max(float(weight), 1e-3) * (THROTTLED_WEIGHT_FACTOR if throttled else 1.0)

    def offer(self, *, pool_id: int, capacity: int, tenant_id: int, weight: float, input_tokens: int, max_output_tokens: int):
        """The fast path's slot, to take in the same Redis script as the request's admission (serving.admission), or None
        when that cannot be (no shared Redis state, Redis away, or requests of this process waiting for the pool).

        Returns (slot, keys, args, charge, throttled_charge): the slot as it is if taken, slot_take.lua's keys and its
        args less the charge (the last one), which admission's script adds: `charge`, or `throttled_charge` (the weight
        divided by 10) if it throttles the tenant."""
        state = self.state
        if not isinstance(state, ResilientState) or not state._keeper().up:
            return None
        pq = self._pool(pool_id)
        pq.capacity = max(1, capacity)
        if pq.backlogged():
            return None
        predicted = self.predict_output(tenant_id, max_output_tokens)
        slot = self._slot(pool_id, tenant_id, self.effective_weight(weight, False), input_tokens, predicted)
        keys, args = state.redis.take_call(pool_id, pq.capacity, slot.slot_id, tenant_id, fair=self.policy == "vtc",
                                           express=self._express(pq, tenant_id))
        cost = self._cost(slot)
        return slot, keys, args[:7], cost, cost / THROTTLED_WEIGHT_FACTOR  # args less the charge: admission's to choose

    def adopt(self, offer, *, throttled: bool) -> Slot:
        """The offered slot, taken by admission's script in Redis (charged there): this process's from now on."""
        slot = offer[0]
        if throttled:
            slot.weight *= THROTTLED_WEIGHT_FACTOR
        pq = self._pool(slot.pool_id)
        pq.running[slot.tenant_id] = pq.running.get(slot.tenant_id, 0) + 1
        self.state.adopt_slot(slot.pool_id, slot.slot_id, slot.tenant_id, self._cost(slot))
        return slot

    async def acquire(
        self,
        *,
        pool_id: int,
        capacity: int,
        tenant_id: int,
        weight: float,
        input_tokens: int,
        max_output_tokens: int,
        throttled: bool = False,
        timeout_s: float | None = None,
    ) -> Slot:
        """Wait for a slot of the pool, in weighted-fair order. Raises SchedulerTimeout after `timeout_s`."""
        pq = self._pool(pool_id)
        pq.capacity = max(1, capacity)
        eff_weight = self.effective_weight(weight, throttled)
        predicted = self.predict_output(tenant_id, max_output_tokens)
        # Fast path: nobody waits in this process and a slot is free (and, with Redis, no other process has
        # a tenant waiting that goes first).
        if not pq.backlogged():
            slot = self._slot(pool_id, tenant_id, eff_weight, input_tokens, predicted)
            if await self._take(pool_id, pq, slot):
                return slot
        waiter = _Waiter(asyncio.get_running_loop().create_future(), tenant_id, eff_weight, input_tokens, predicted)
        queue = pq.queues.setdefault(tenant_id, deque())
        if not queue:
            # Lifted to the backlog's minimum less this request's cost: it goes next, once, and idle time
            # banks nothing more (the charge at dispatch brings the counter back to the minimum).
            first_cost = (INPUT_WEIGHT * self.charge_input(tenant_id, input_tokens) + OUTPUT_WEIGHT * predicted) / eff_weight
            await self.state.join_backlog(pool_id, tenant_id, pq.backlogged(), first_cost)
        queue.append(waiter)
        if pq.task is None or pq.task.done():
            pq.task = asyncio.get_running_loop().create_task(self._dispatch_loop(pool_id, pq))
        pq.wake.set()
        timeout = timeout_s if timeout_s is not None else float(settings.PLATFORM_QUEUE_TIMEOUT_S)
        try:
            slot = await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if waiter in queue:
                queue.remove(waiter)
                if not queue:
                    await self.state.leave_backlog(pool_id, tenant_id)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                await self.release(waiter.future.result(), input_tokens=0, output_tokens=0, refund=True)
            else:
                waiter.future.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise SchedulerTimeout(
                    f"The model is at capacity and this request waited {timeout:.0f} s for its turn. Retry shortly."
                ) from None
            raise
        slot.queued_s = time.monotonic() - waiter.enqueued
        return slot

    async def _dispatch_loop(self, pool_id: int, pq: _PoolQueue) -> None:
        try:
            await self._dispatch(pool_id, pq)
        except Exception as exc:  # e.g. Redis went away: fail the waiters now rather than at their timeout
            log.exception("Scheduler of pool %s stopped", pool_id)
            for queue in pq.queues.values():
                while queue:
                    waiter = queue.popleft()
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)

    def _next_tenant(self, pq: _PoolQueue, backlogged: list[int], counters: dict[int, float] | None) -> int:
        """FCFS: the oldest request. VTC: the smallest counter; on a tie, fewer running, then the oldest."""
        if counters is None:
            return min(backlogged, key=lambda t: pq.queues[t][0].enqueued)
        return min(backlogged, key=lambda t: (counters[t], pq.running.get(t, 0), pq.queues[t][0].enqueued))

    async def _dispatch(self, pool_id: int, pq: _PoolQueue) -> None:
        while True:
            backlogged = pq.backlogged()
            if not backlogged:
                return
            now = time.monotonic()
            if self.state.shared and now - pq.last_beat >= HEARTBEAT_S:
                await self.state.heartbeat(pool_id, backlogged)
                pq.last_beat = now
            counters = await self.state.counters(pool_id, backlogged) if self.policy == "vtc" else None
            # A waiter may have timed out while the counters were read: choose among the tenants still waiting.
            backlogged = [t for t in backlogged if pq.queues.get(t)]
            if not backlogged:
                continue
            tenant_id = self._next_tenant(pq, backlogged, counters)
            waiter = pq.queues[tenant_id][0]
            slot = self._slot(pool_id, tenant_id, waiter.weight, waiter.input_tokens, waiter.predicted_output)
            if not await self._take(pool_id, pq, slot):
                pq.wake.clear()
                try:
                    # Local releases wake us at once; slots freed by other processes are found by polling.
                    await asyncio.wait_for(pq.wake.wait(), REMOTE_POLL_S if self.state.shared else None)
                except asyncio.TimeoutError:
                    pass
                continue
            queue = pq.queues[tenant_id]
            if waiter in queue:  # it may have timed out (and left the queue) while the slot was taken
                queue.remove(waiter)
            if not queue:
                await self.state.leave_backlog(pool_id, tenant_id)
            if waiter.future.done():  # gave up meanwhile: its charge is taken back
                await self._free(pq, slot, -self._cost(slot))
                continue
            waiter.future.set_result(slot)

    async def _free(self, pq: _PoolQueue | None, slot: Slot, correction: float = 0.0) -> None:
        await self.state.free_slot(slot.pool_id, slot.slot_id, slot.tenant_id, correction=correction)
        if pq is not None:
            pq.running[slot.tenant_id] = max(0, pq.running.get(slot.tenant_id, 0) - 1)
            pq.wake.set()

    async def release(self, slot: Slot, *, input_tokens: int, output_tokens: int, refund: bool = False) -> None:
        """Free the slot and correct the charge: the real prompt and output replace the estimate and prediction. Once:
        a slot already released (by `detach`, with its request's settle) is left alone.

        refund=True: the request never ran (no backend took it), so its whole charge is taken back.
        """
        if slot.released:
            return
        slot.released = True
        await self._free(self._pools.get((id(asyncio.get_running_loop()), slot.pool_id)), slot,
                         self._correction(slot, input_tokens, output_tokens, refund))  # one step

    def detach(self, slot: Slot, *, input_tokens: int, output_tokens: int, refund: bool = False):
        """`release`, done in this process now, with its Redis half returned for the caller to run in its own round trip
        (slot_free.lua's (keys, args): the request's settle runs both in one script, serving.admission), or None when
        there is none (the embedded default: all done here). Redis must take it, retried until it can, like a release."""
        if slot.released:
            return None
        slot.released = True
        correction = self._correction(slot, input_tokens, output_tokens, refund)
        op = self.state.detach_slot(slot.pool_id, slot.slot_id, slot.tenant_id, correction)
        pq = self._pools.get((id(asyncio.get_running_loop()), slot.pool_id))
        if pq is not None:
            pq.running[slot.tenant_id] = max(0, pq.running.get(slot.tenant_id, 0) - 1)
            pq.wake.set()
        return op

    def _correction(self, slot: Slot, input_tokens: int, output_tokens: int, refund: bool) -> float:
        """What replaces the dispatch charge (and what the estimates learn from the real counts)."""
        if refund:
            correction = -self._cost(slot)
        else:
            # The dispatch charge used an estimate of the prompt and a prediction of the output: settle both.
            correction = (
                INPUT_WEIGHT * (input_tokens - slot.input_tokens) + OUTPUT_WEIGHT * (output_tokens - slot.predicted_output)
            ) / slot.weight
            prev = self._predicted.get(slot.tenant_id)
            self._predicted[slot.tenant_id] = output_tokens if prev is None else 0.8 * prev + 0.2 * output_tokens
            if slot.input_estimate > 0 and input_tokens > 0:
                ratio = input_tokens / slot.input_estimate
                prev_ratio = self._input_ratio.get(slot.tenant_id)
                self._input_ratio[slot.tenant_id] = ratio if prev_ratio is None else 0.8 * prev_ratio + 0.2 * ratio
        return correction

    async def snapshot(self, pool_id: int) -> dict:
        """Load and queues of a pool as this process sees them (staff live view)."""
        pq = self._pools.get((id(asyncio.get_running_loop()), pool_id))
        tenants = list(pq.queues) if pq else []
        counters = await self.state.counters(pool_id, tenants) if tenants else {}
        return {
            "in_use": await self.state.in_use(pool_id),
            "capacity": pq.capacity if pq else None,
            "tenants": {t: {"waiting": len(pq.queues[t]), "counter": counters.get(t, 0.0)} for t in tenants},
        }


_scheduler: FairScheduler | None = None
_lock = threading.Lock()


def get_scheduler() -> FairScheduler:
    """The process's scheduler: slots and counters in Redis when REDIS_URL is set, else in-process."""
    global _scheduler
    if _scheduler is None:
        with _lock:
            if _scheduler is None:
                state = ResilientState(RedisState(settings.REDIS_URL)) if settings.REDIS_URL else LocalState()
                _scheduler = FairScheduler(state, policy=settings.PLATFORM_SCHEDULER,
                                           express_slots=settings.PLATFORM_SCHEDULER_EXPRESS_SLOTS)
    return _scheduler


def reset_scheduler() -> None:
    global _scheduler
    _scheduler = None
