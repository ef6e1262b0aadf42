"""Every request counts one against requests/min, admitted or refused, except one refused for requests/min itself
(issue 12, noisy neighbour): identical in the embedded (in-process) and Redis admission, and across processes."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid

import pytest

from serving.admission import LocalAdmission, RedisAdmission, TenantLimits

_tenant_ids = itertools.count(int(uuid.uuid4().int % 10**9) * 1000 + 500)


async def _no_usage(tenant_id, kind, window, *, exclude=()):
    return 0


def _make(kind: str):
    if kind == "local":
        return LocalAdmission(_no_usage)
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    return RedisAdmission(url, usage_loader=_no_usage)


def run(coro):
    return asyncio.run(coro)


def limits(**kw) -> TenantLimits:
    return TenantLimits(tenant_id=next(_tenant_ids), **kw)


async def _admit_many(adm, lim, n, tokens):
    return [await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=tokens) for _ in range(n)]


@pytest.fixture(params=["local", "redis"])
def adm(request):
    return _make(request.param)


def _admit(adm, lim, tokens=1, rid=None):
    return adm.admit(lim, request_id=rid or uuid.uuid4().hex, reserve_tokens=tokens)


def remaining(decision) -> int:
    return int(decision.headers["x-ratelimit-remaining-requests"])


def test_requests_refused_for_tokens_per_minute_count_against_requests_per_minute(adm):
    lim = limits(requests_per_minute=5, tokens_per_minute=100)

    async def scenario():
        too_large = [await _admit(adm, lim, tokens=101) for _ in range(5)]
        assert [d.code for d in too_large] == ["request_exceeds_tokens_per_minute"] * 5
        assert [remaining(d) for d in too_large] == [4, 3, 2, 1, 0]
        assert [d.rpm_retry_ms > 0 for d in too_large] == [False] * 4 + [True]  # the 5th emptied the bucket
        valid = await _admit(adm, lim, tokens=10)
        assert not valid.allowed and valid.code == "requests_per_minute_exceeded"

    run(scenario())


def test_refusals_for_concurrency_and_quota_count_too(adm):
    async def scenario():
        conc = limits(requests_per_minute=3, max_concurrent=1)
        first = await _admit(adm, conc)
        busy = await _admit(adm, conc)
        assert first.allowed and busy.code == "concurrency_limit_exceeded" and remaining(busy) == 1
        await adm.settle(first.reservation, used_tokens=1)
        third = await _admit(adm, conc)
        assert third.allowed and remaining(third) == 0
        await adm.settle(third.reservation, used_tokens=1)
        assert (await _admit(adm, conc)).code == "requests_per_minute_exceeded"

        quota = limits(requests_per_minute=3, quota_tokens=10, quota_mode="hard")
        over = [await _admit(adm, quota, tokens=11) for _ in range(3)]
        assert [d.code for d in over] == ["insufficient_quota"] * 3 and [remaining(d) for d in over] == [2, 1, 0]
        assert (await _admit(adm, quota, tokens=1)).code == "requests_per_minute_exceeded"

    run(scenario())


def test_a_refusal_for_requests_per_minute_takes_nothing(adm):
    """No lock-out spiral: a tenant that keeps retrying past its limit gets its next request as soon as it refills."""
    lim = limits(requests_per_minute=60)  # one request a second

    async def scenario():
        admitted = await _admit_many(adm, lim, 60, 1)
        assert all(d.allowed for d in admitted) and admitted[-1].rpm_retry_ms > 0 and admitted[-2].rpm_retry_ms == 0
        refused = [await _admit(adm, lim) for _ in range(20)]
        assert all(d.code == "requests_per_minute_exceeded" for d in refused)
        # Each refusal's wait is no longer than the one before: the refusals took nothing from the bucket.
        waits = [d.rpm_retry_ms for d in refused]
        assert all(b <= a for a, b in zip(waits, waits[1:])) and waits[0] <= 1000
        await asyncio.sleep(waits[-1] / 1000 + 0.01)
        assert (await _admit(adm, lim)).allowed

    run(scenario())


def test_refused_before_admission_counts_one_request_unless_the_bucket_is_empty(adm):
    lim = limits(requests_per_minute=3, tokens_per_minute=1000, quota_tokens=100, quota_mode="hard")

    async def scenario():
        counted = [await adm.count_refused(lim) for _ in range(3)]
        assert [remaining(c) for c in counted] == [2, 1, 0]
        assert [c.rpm_retry_ms > 0 for c in counted] == [False, False, True]
        assert set(counted[0].headers) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
        refused = await _admit(adm, lim)
        assert refused.code == "requests_per_minute_exceeded"
        again = await adm.count_refused(lim)  # an empty bucket: nothing more taken
        assert remaining(again) == 0 and 0 < again.rpm_retry_ms <= refused.rpm_retry_ms
        # No requests/min limit: nothing to count, nothing asked.
        assert (await adm.count_refused(limits(tokens_per_minute=10))).headers == {}

    run(scenario())


def test_two_processes_share_the_count_of_refusals():
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    a, b = RedisAdmission(url, usage_loader=_no_usage), RedisAdmission(url, usage_loader=_no_usage)
    lim = limits(requests_per_minute=6, tokens_per_minute=50)

    async def scenario():
        await a.count_refused(lim)  # a 400 in one process
        assert (await _admit(b, lim, tokens=51)).code == "request_exceeds_tokens_per_minute"  # a TPM refusal in another
        ds = await asyncio.gather(*(p.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=1) for p in [a, b] * 4))
        return sum(d.allowed for d in ds)

    assert run(scenario()) == 4


def test_with_redis_away_refusals_count_in_the_process():
    adm = RedisAdmission("redis://127.0.0.1:1/0", usage_loader=_no_usage)  # nothing listens on port 1
    lim = limits(requests_per_minute=2)

    async def scenario():
        assert remaining(await adm.count_refused(lim)) == 1
        assert (await _admit(adm, lim)).reservation.backend == "local"
        assert (await _admit(adm, lim)).code == "requests_per_minute_exceeded"

    run(scenario())
