"""Admission semantics, identical in the embedded (in-process) and Redis implementations."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid

import pytest

from serving.admission import LocalAdmission, RedisAdmission, TenantLimits, window_id

_tenant_ids = itertools.count(int(uuid.uuid4().int % 10**9) * 1000)


async def _no_usage(tenant_id, kind, window, *, exclude=()):
    return 0


def _make(kind: str, loader=_no_usage):
    if kind == "local":
        return LocalAdmission(loader)
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    return RedisAdmission(url, usage_loader=loader)


@pytest.fixture(params=["local", "redis"])
def adm(request):
    return _make(request.param)


def run(coro):
    return asyncio.run(coro)


def limits(**kw) -> TenantLimits:
    return TenantLimits(tenant_id=next(_tenant_ids), **kw)


async def _admit_many(adm, lim, n, tokens):
    return [await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=tokens) for _ in range(n)]


def test_requests_per_minute_admits_exactly_the_limit(adm):
    lim = limits(requests_per_minute=5)
    decisions = run(_admit_many(adm, lim, 8, 1))
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    refused = decisions[-1]
    assert refused.status == 429 and refused.code == "requests_per_minute_exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert decisions[0].headers["x-ratelimit-remaining-requests"] == "4"


def test_tokens_per_minute_reserves_and_refunds(adm):
    lim = limits(tokens_per_minute=1000)

    async def scenario():
        a = await adm.admit(lim, request_id="a" + uuid.uuid4().hex, reserve_tokens=600)
        b = await adm.admit(lim, request_id="b" + uuid.uuid4().hex, reserve_tokens=600)
        assert a.allowed and not b.allowed and b.code == "tokens_per_minute_exceeded"
        await adm.settle(a.reservation, used_tokens=100)  # refunds 500
        c = await adm.admit(lim, request_id="c" + uuid.uuid4().hex, reserve_tokens=600)
        assert c.allowed
        # 1000 − 600 + 500 refunded − 600 = 300, plus what refilled meanwhile (1000/min ≈ 17 tokens/s)
        assert 299 <= int(c.headers["x-ratelimit-remaining-tokens"]) <= 300 + 17 * 3

    run(scenario())


def test_request_larger_than_tpm_says_so(adm):
    d = run(adm.admit(limits(tokens_per_minute=100), request_id=uuid.uuid4().hex, reserve_tokens=101))
    assert not d.allowed and d.code == "request_exceeds_tokens_per_minute"
    assert "Lower max_tokens" in d.message


def test_hard_quota_rejects_at_limit_with_zero_overshoot(adm):
    lim = limits(quota_tokens=1000, quota_mode="hard", quota_window="day")

    async def scenario():
        ok = [await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=300) for _ in range(4)]
        assert [d.allowed for d in ok] == [True, True, True, False]
        assert ok[3].error_type == "insufficient_quota" and ok[3].status == 429
        assert ok[3].retry_after == 1 and "Requests in flight have reserved" in ok[3].message  # not the next window
        for d in ok[:3]:
            await adm.settle(d.reservation, used_tokens=300)
        spent = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=300)
        assert not spent.allowed and spent.retry_after >= 1 and "resets at the start of the next window" in spent.message
        near = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=50)
        assert near.allowed and near.headers["x-quota-state"] == "warning"
        await adm.settle(near.reservation, used_tokens=50)
        exact = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=50)  # lands exactly on the quota
        assert exact.allowed and exact.headers["x-quota-state"] == "exhausted"
        await adm.settle(exact.reservation, used_tokens=50)
        over = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=1)
        assert not over.allowed and over.headers["x-quota-state"] == "exhausted"

    run(scenario())


def test_soft_quota_warns_once_then_throttles(adm, settings):
    settings.PLATFORM_SOFT_THROTTLE_TPM = 50
    lim = limits(quota_tokens=1000, quota_mode="soft")

    async def scenario():
        warns = []
        for _ in range(5):
            d = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=200)
            assert d.allowed and not d.throttled
            warns.append(d.warn)
            await adm.settle(d.reservation, used_tokens=200)
        assert warns == [False, False, False, True, False]  # 800 of 1000 reached on the 4th: warned once
        throttled = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=40)
        assert throttled.allowed and throttled.throttled
        assert throttled.headers["x-quota-state"] == "throttled"
        assert throttled.headers["x-ratelimit-limit-tokens"] == "50"
        refused = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=40)
        assert not refused.allowed and refused.code == "tokens_per_minute_exceeded"

    run(scenario())


def test_concurrency_limit_and_release(adm):
    lim = limits(max_concurrent=2)

    async def scenario():
        a, b, c = await _admit_many(adm, lim, 3, 10)
        assert a.allowed and b.allowed and not c.allowed and c.code == "concurrency_limit_exceeded"
        await adm.settle(a.reservation, used_tokens=0)
        assert (await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=10)).allowed

    run(scenario())


def test_settle_is_exactly_once(adm):
    lim = limits(quota_tokens=10_000, quota_mode="hard", tokens_per_minute=10_000)

    async def scenario():
        d = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=500)
        await adm.settle(d.reservation, used_tokens=120)
        await adm.settle(d.reservation, used_tokens=120)
        snap = adm.snapshot(lim.tenant_id, "month")
        snap = await snap if asyncio.iscoroutine(snap) else snap
        assert snap == {"used": 120, "reserved": 0}

    run(scenario())


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_quota_counter_is_seeded_from_the_ledger(kind):
    async def loader(tenant_id, window_kind, window, *, exclude=()):
        assert window == window_id(window_kind)
        return 950

    adm = _make(kind, loader)
    d = run(adm.admit(limits(quota_tokens=1000, quota_mode="hard"), request_id=uuid.uuid4().hex, reserve_tokens=60))
    assert not d.allowed and d.error_type == "insufficient_quota"


def test_concurrent_admissions_never_overshoot(adm):
    """200 simultaneous requests against a small tokens/min limit: exactly floor(limit / reserve) pass."""
    lim = limits(tokens_per_minute=1000, quota_tokens=5000, quota_mode="hard")

    async def scenario():
        started = time.monotonic()
        ds = await asyncio.gather(*(adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=30) for _ in range(200)))
        return sum(d.allowed for d in ds), time.monotonic() - started

    allowed, elapsed = run(scenario())
    refill = 1000 * elapsed / 60  # the bucket refills while the burst is admitted
    assert 33 <= allowed <= (1000 + refill) // 30


def test_redis_down_fails_closed_for_hard_and_falls_back_for_soft():
    adm = RedisAdmission("redis://127.0.0.1:1/0", usage_loader=_no_usage)  # nothing listens on port 1
    hard = run(adm.admit(limits(quota_tokens=100, quota_mode="hard"), request_id="x", reserve_tokens=1))
    assert not hard.allowed and hard.status == 503 and "unavailable" in hard.message
    soft_limits = limits(requests_per_minute=2, quota_tokens=100, quota_mode="soft")
    soft = run(_admit_many(adm, soft_limits, 3, 1))
    assert [d.allowed for d in soft] == [True, True, False]  # per-process limits still hold
    assert soft[0].reservation.backend == "local"


def test_two_processes_share_one_limit_exactly():
    """Two admission services (as in two gateway processes) on one Redis admit exactly the limit together."""
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    a, b = RedisAdmission(url, usage_loader=_no_usage), RedisAdmission(url, usage_loader=_no_usage)
    lim = limits(requests_per_minute=10, tokens_per_minute=10_000, quota_tokens=600, quota_mode="hard")

    async def scenario():
        ds = await asyncio.gather(*(p.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=50) for p in [a, b] * 20))
        return sum(d.allowed for d in ds)

    assert run(scenario()) == 10  # the requests/min bucket binds first (10 × 50 = 500 ≤ 600 quota)


def test_redis_going_away_and_coming_back(monkeypatch):
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    import redis

    from serving import leases

    monkeypatch.setattr(leases, "PROBE_S", 0.02)
    adm = RedisAdmission(url, usage_loader=_no_usage)
    hard, soft = limits(quota_tokens=1000, quota_mode="hard"), limits(requests_per_minute=100)
    real_client, real_pipe = adm._client, adm._pipe

    def broken():
        raise redis.ConnectionError("simulated outage")

    async def scenario():
        adm._client = adm._pipe = broken  # redis-py's client and the pipelined connection's scripts
        down_hard = await adm.admit(hard, request_id=uuid.uuid4().hex, reserve_tokens=1)
        down_soft = await adm.admit(soft, request_id=uuid.uuid4().hex, reserve_tokens=1)
        assert down_hard.status == 503 and down_soft.allowed and down_soft.reservation.backend == "local"
        await adm.settle(down_soft.reservation, used_tokens=1)  # settles where it was reserved
        adm._client, adm._pipe = real_client, real_pipe  # Redis is back: the keeper's probe finds it
        for _ in range(100):
            if adm.keeper().up:
                break
            await asyncio.sleep(0.01)
        back = await adm.admit(hard, request_id=uuid.uuid4().hex, reserve_tokens=1)
        assert back.allowed and back.reservation.backend == "redis"
        await adm.settle(back.reservation, used_tokens=1)

    run(scenario())
