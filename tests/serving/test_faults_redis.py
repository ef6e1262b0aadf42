"""Redis paused, killed or restarted empty, and gateway processes that die: nothing leaks, nothing is lost.

The scheduler and admission on a private redis-server (tests/support/redis_server.py) with leases shortened
to 0.8 s; a "process" is an event loop of its own (its keeper renews what it holds while the loop runs, and
stops when the loop ends, as a killed process does). tests/serving/test_faults.py does the same with real
gateway processes and the real 10-s leases.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid

import pytest

from serving import leases
from serving.admission import RedisAdmission, TenantLimits, window_id
from serving.scheduler import FairScheduler, RedisState, ResilientState, SchedulerTimeout
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

LEASE_S = 0.8
_ids = itertools.count(int(uuid.uuid4().int % 10**6) * 1000)


@pytest.fixture
def srv():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def short_leases(monkeypatch):
    monkeypatch.setattr(leases, "LEASE_MS", int(LEASE_S * 1000))
    monkeypatch.setattr(leases, "RENEW_S", LEASE_S / 8)  # margin for a loaded machine
    monkeypatch.setattr(leases, "PROBE_S", 0.02)
    monkeypatch.setattr(leases, "PROBE_MAX_S", 0.1)
    yield
    leases.reset_keepers()


def in_other_process(coro_fn):
    """Run coro_fn() in an event loop of its own, then end that loop: what it held is no longer renewed."""
    out = {}

    def main():
        out["result"] = asyncio.run(coro_fn())

    t = threading.Thread(target=main)
    t.start()
    t.join(30)
    return out.get("result")


async def eventually(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    return await predicate()


def scheduler(url: str) -> FairScheduler:
    return FairScheduler(ResilientState(RedisState(url)))


class Ledger:
    """What the ledger holds, for admission's seed: request id -> tokens (the test writes rows as the gateway would)."""

    def __init__(self):
        self.rows: dict[str, int] = {}

    async def usage(self, tenant_id, kind, window, *, exclude=()):
        return sum(v for rid, v in self.rows.items() if rid not in exclude)


def limits(**kw) -> TenantLimits:
    return TenantLimits(tenant_id=next(_ids), **kw)


def rid() -> str:
    return uuid.uuid4().hex


def quota_hash(srv, lim: TenantLimits) -> dict:
    return srv.client().hgetall(f"mtl:{{t{lim.tenant_id}}}:quota:{window_id(lim.quota_window)}")


def inflight(srv, lim: TenantLimits) -> list[str]:
    return srv.client().zrange(f"mtl:{{t{lim.tenant_id}}}:inflight", 0, -1)


# ---- scheduler slots ----------------------------------------------------------------------------------


def test_slots_of_a_process_that_died_free_themselves_within_a_lease(srv):
    pool = next(_ids)

    async def take_two_and_die():
        s = scheduler(srv.url)
        for t in (1, 2):
            await s.acquire(pool_id=pool, capacity=2, tenant_id=t, weight=1, input_tokens=1, max_output_tokens=1)

    in_other_process(take_two_and_die)

    async def other_process():
        s = scheduler(srv.url)
        started = time.monotonic()
        slot = await s.acquire(pool_id=pool, capacity=2, tenant_id=3, weight=1, input_tokens=1, max_output_tokens=1,
                               timeout_s=LEASE_S * 4)
        waited = time.monotonic() - started
        await s.release(slot, input_tokens=1, output_tokens=1)
        return waited

    assert asyncio.run(other_process()) < LEASE_S * 1.5


@pytest.mark.slow
def test_a_running_request_keeps_its_slot_for_as_long_as_it_runs(srv):
    pool = next(_ids)

    async def scenario():
        a, b = scheduler(srv.url), scheduler(srv.url)
        held = await a.acquire(pool_id=pool, capacity=1, tenant_id=1, weight=1, input_tokens=1, max_output_tokens=1)
        # Three leases later the running request still holds it: B (same Redis) waits.
        with pytest.raises(SchedulerTimeout):
            await b.acquire(pool_id=pool, capacity=1, tenant_id=2, weight=1, input_tokens=1, max_output_tokens=1, timeout_s=LEASE_S * 3)
        await a.release(held, input_tokens=1, output_tokens=1)
        slot = await b.acquire(pool_id=pool, capacity=1, tenant_id=2, weight=1, input_tokens=1, max_output_tokens=1, timeout_s=1)
        await b.release(slot, input_tokens=1, output_tokens=1)

    asyncio.run(scenario())


def test_redis_paused_mid_request_neither_fails_a_request_nor_leaks_its_slot(srv):
    pool = next(_ids)
    key = RedisState.slots_key(pool)

    async def scenario():
        s = scheduler(srv.url)
        first = await s.acquire(pool_id=pool, capacity=2, tenant_id=1, weight=1, input_tokens=5, max_output_tokens=5)
        srv.pause()
        try:
            started = time.monotonic()
            # Redis is not answering: the process schedules alone (its own slots count), nothing raises.
            second = await s.acquire(pool_id=pool, capacity=2, tenant_id=2, weight=1, input_tokens=5, max_output_tokens=5, timeout_s=5)
            with pytest.raises(SchedulerTimeout):  # capacity 2 holds while Redis is away too
                await s.acquire(pool_id=pool, capacity=2, tenant_id=3, weight=1, input_tokens=5, max_output_tokens=5, timeout_s=0.3)
            await s.release(first, input_tokens=5, output_tokens=5)
            assert time.monotonic() - started < 3
            await asyncio.sleep(0.3)
        finally:
            srv.resume()
        keeper = s.state._keeper()
        assert await eventually(lambda: _ready(keeper))
        # The slot taken while Redis was away is now registered there; the one released meanwhile is gone.
        assert srv.client().zrange(key, 0, -1) == [f"2:{second.slot_id}"]
        await s.release(second, input_tokens=5, output_tokens=5)
        assert srv.client().zrange(key, 0, -1) == []

    asyncio.run(scenario())


async def _ready(keeper) -> bool:
    return keeper.up and keeper.deferred == 0 and keeper.renewals > 0


# ---- admission: reservations, counters, concurrency ---------------------------------------------------------


def test_a_settle_redis_could_not_take_is_done_when_it_answers(srv):
    lim = limits(quota_tokens=1000, quota_mode="hard", max_concurrent=1)
    ledger = Ledger()

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        d = await adm.admit(lim, request_id=rid(), reserve_tokens=100)
        assert d.allowed
        srv.pause()
        try:
            started = time.monotonic()
            await adm.settle(d.reservation, used_tokens=30)  # queued, not dropped
            assert time.monotonic() - started < 1.5
        finally:
            srv.resume()
        ledger.rows[d.reservation.request_id] = 30
        assert await eventually(lambda: _ready(adm.keeper()))
        q = quota_hash(srv, lim)
        assert (int(q["used"]), int(q["reserved"])) == (30, 0)
        assert inflight(srv, lim) == []  # its concurrency is free again
        again = await adm.admit(lim, request_id=rid(), reserve_tokens=100)
        assert again.allowed

    asyncio.run(scenario())


def test_what_the_fallback_counted_while_redis_was_away_is_written_back_once(srv):
    lim = limits(quota_tokens=10_000, quota_mode="soft")
    ledger = Ledger()

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        d = await adm.admit(lim, request_id=rid(), reserve_tokens=50)
        await adm.settle(d.reservation, used_tokens=10)
        ledger.rows[d.reservation.request_id] = 10
        srv.pause()
        try:
            away = await adm.admit(lim, request_id=rid(), reserve_tokens=50)
            assert away.allowed and away.reservation.backend == "local"
            await adm.settle(away.reservation, used_tokens=20)
            ledger.rows[away.reservation.request_id] = 20
        finally:
            srv.resume()
        assert await eventually(lambda: _ready(adm.keeper()))
        assert int(quota_hash(srv, lim)["used"]) == sum(ledger.rows.values()) == 30
        # A retried write-back (its first reply lost) counts nothing twice.
        await adm._settle_in_redis(away.reservation, 20, "l")
        assert int(quota_hash(srv, lim)["used"]) == 30

    asyncio.run(scenario())


def test_a_fallback_request_still_running_when_redis_answers_is_registered_there(srv):
    lim = limits(quota_tokens=10_000, quota_mode="soft", max_concurrent=5)
    ledger = Ledger()

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        first = await adm.admit(lim, request_id=rid(), reserve_tokens=10)
        await adm.settle(first.reservation, used_tokens=5)
        ledger.rows[first.reservation.request_id] = 5
        srv.pause()
        try:
            running = await adm.admit(lim, request_id=rid(), reserve_tokens=300)
            assert running.reservation.backend == "local"
        finally:
            srv.resume()
        assert await eventually(lambda: _ready(adm.keeper()))
        # Other processes now see it: its concurrency and its reservation count in Redis.
        assert inflight(srv, lim) == [running.reservation.request_id]
        assert int(quota_hash(srv, lim)["reserved"]) == 300
        await adm.settle(running.reservation, used_tokens=120)
        ledger.rows[running.reservation.request_id] = 120
        q = quota_hash(srv, lim)
        assert (int(q["used"]), int(q["reserved"])) == (125, 0) and inflight(srv, lim) == []

    asyncio.run(scenario())


def test_a_dead_processes_reservation_is_released_with_its_lease_and_settled_once_from_its_journal(srv):
    lim = limits(quota_tokens=1000, quota_mode="hard", max_concurrent=1)
    ledger = Ledger()

    async def admit_and_die():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        return (await adm.admit(lim, request_id=rid(), reserve_tokens=600)).reservation

    dead = in_other_process(admit_and_die)
    assert dead is not None

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        refused = await adm.admit(lim, request_id=rid(), reserve_tokens=600)
        assert not refused.allowed  # still reserved (and its concurrency held) within the lease
        await asyncio.sleep(LEASE_S * 1.3)
        d = await adm.admit(lim, request_id=rid(), reserve_tokens=300)
        assert d.allowed, d.message  # released with the lease: neither its quota nor its concurrency leaks
        # Its journal is recovered (twice: a recovery that was itself interrupted): its tokens count once.
        for _ in range(2):
            await adm.settle_recovered(dead, used_tokens=40)
        await adm.settle(d.reservation, used_tokens=100)
        q = quota_hash(srv, lim)
        assert (int(q["used"]), int(q["reserved"])) == (140, 0)

    asyncio.run(scenario())


def test_an_expired_lease_of_a_request_that_still_runs_is_restored_by_the_renewal(srv):
    lim = limits(quota_tokens=1000, quota_mode="hard")

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=Ledger().usage)
        d = await adm.admit(lim, request_id=rid(), reserve_tokens=400)
        while adm.keeper().renewals == 0:  # its first renewal starts with the lease: not the one this test makes below
            await asyncio.sleep(0.005)
        # As if Redis had been away longer than a lease: the entry expired and a sweep released the reservation.
        srv.client().zadd(f"mtl:{{t{lim.tenant_id}}}:inflight", {d.reservation.request_id: 0})
        assert (await adm.snapshot(lim.tenant_id, "month"))["reserved"] == 0
        await adm.keeper().renew()
        assert (await adm.snapshot(lim.tenant_id, "month"))["reserved"] == 400
        await adm.settle(d.reservation, used_tokens=50)
        assert await adm.snapshot(lim.tenant_id, "month") == {"used": 50, "reserved": 0}

    asyncio.run(scenario())


@pytest.mark.parametrize("settled", ["before the counter is seeded again", "after it is seeded again"])
def test_a_counter_lost_with_redis_is_seeded_again_without_counting_a_request_twice(srv, settled):
    """Redis restarts empty with a request in flight: the counter comes back equal to the ledger."""
    lim = limits(quota_tokens=10_000, quota_mode="soft")
    ledger = Ledger()

    async def scenario():
        adm = RedisAdmission(srv.url, usage_loader=ledger.usage)
        done = await adm.admit(lim, request_id=rid(), reserve_tokens=100)
        await adm.settle(done.reservation, used_tokens=50)
        ledger.rows[done.reservation.request_id] = 50
        running = await adm.admit(lim, request_id=rid(), reserve_tokens=100)
        srv.restart()  # everything in Redis is lost
        keeper = adm.keeper()
        keeper.mark_down(ConnectionError("restart"))
        assert await eventually(lambda: _ready(keeper))  # the renewal registered the running request again

        async def finish():  # settle, then the ledger row (the gateway's order)
            await adm.settle(running.reservation, used_tokens=70)
            ledger.rows[running.reservation.request_id] = 70

        if settled.startswith("before"):
            await finish()
        other = await adm.admit(lim, request_id=rid(), reserve_tokens=100)  # seeds the counter from the ledger
        assert other.allowed
        if settled.startswith("after"):
            await finish()
        await adm.settle(other.reservation, used_tokens=0)
        ledger.rows[other.reservation.request_id] = 0
        q = quota_hash(srv, lim)
        assert int(q["used"]) == sum(ledger.rows.values()) == 120
        assert int(q["reserved"]) == 0

    asyncio.run(scenario())
