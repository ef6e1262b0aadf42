"""Money budgets and per-key limits at admission (serving.budgets), in-process and in Redis: the upper bound is
reserved, the exact cost settled, nothing is overshot, the counters equal what was settled and what the ledger says."""

from __future__ import annotations

import asyncio
import random
from datetime import date
from decimal import Decimal

import pytest
from django.utils import timezone

from serving import budgets
from serving.budgets import BudgetLimits, LocalBudgets, RedisBudgets, generation_of
from tests.support.billing import price, usage
from tests.support.gateway import make_base_model


@pytest.fixture(params=["local", "redis"])
def service(request):
    if request.param == "local":
        return lambda: LocalBudgets()
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBudgets(url)


def _limits(tenant_id, **kw) -> BudgetLimits:
    kw.setdefault("generation", generation_of(tenant_hard=bool(kw.get("tenant_hard_microcents")), budgeted_keys=kw.get("budgeted_keys", ())))
    return BudgetLimits(tenant_id=tenant_id, **kw)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.django_db(transaction=True)
def test_a_hard_money_limit_reserves_the_bound_and_counts_the_exact_cost(world, service):
    price(make_base_model("tiny-chat"), effective_from=date(2025, 12, 1), inp="100", out="200")
    usage(world.tenant, at=timezone.now(), model="tiny-chat", inp=2_000)  # 200,000 µ¢ already in the ledger: the seed
    b = service()
    limits = _limits(world.tenant.pk, tenant_hard_microcents=1_000_000)

    async def go():
        first = await b.admit(limits, request_id="r1", tokens=600, microcents=500_000)
        assert first.allowed
        second = await b.admit(limits, request_id="r2", tokens=600, microcents=400_000)  # 200k + 500k reserved + 400k > 1M
        assert (second.allowed, second.status, second.code) == (False, 429, "insufficient_quota")
        await b.settle(first.reservation, tokens=300, microcents=30_000)  # it used far less than its bound
        third = await b.admit(limits, request_id="r3", tokens=600, microcents=400_000)
        assert third.allowed
        await b.settle(third.reservation, tokens=10, microcents=1)
        await b.settle(third.reservation, tokens=10, microcents=1)  # a second settle of the same request: nothing
        return await b.snapshot(limits)

    counters = run(go())
    assert (counters["mu"], counters["mr"]) == (200_000 + 30_000 + 1, 0)


@pytest.mark.django_db(transaction=True)
def test_a_keys_budgets_and_rates_apply_to_it_alone(world, service):
    b = service()
    key = _limits(world.tenant.pk, key_id=7, key_month_tokens=1000, key_month_microcents=5000, key_requests_per_minute=3,
                  budgeted_keys=(7,))
    other = _limits(world.tenant.pk, key_id=8, budgeted_keys=(7,), key_requests_per_minute=100)

    async def go():
        a = await b.admit(key, request_id="a", tokens=900, microcents=100)
        assert a.allowed
        over_tokens = await b.admit(key, request_id="b", tokens=200, microcents=100)
        assert (over_tokens.allowed, over_tokens.code) == (False, "insufficient_quota") and "1,000 tokens" in over_tokens.message
        assert (await b.admit(other, request_id="c", tokens=200, microcents=100)).allowed  # another key: not its budget
        await b.settle(a.reservation, tokens=100, microcents=4_950)
        over_money = await b.admit(key, request_id="d", tokens=10, microcents=100)  # 4,950 + 100 > 5,000 µ¢
        assert (over_money.allowed, over_money.code) == (False, "insufficient_quota") and "spend budget" in over_money.message
        assert (await b.admit(key, request_id="e", tokens=10, microcents=10)).allowed
        assert (await b.admit(key, request_id="e2", tokens=10, microcents=0)).allowed
        rate = await b.admit(key, request_id="f", tokens=1, microcents=0)  # its 4th admitted this minute, limit 3 (refusals take none)
        assert (rate.allowed, rate.code) == (False, "requests_per_minute_exceeded")
        return await b.snapshot(key)

    counters = run(go())
    assert (counters["k7:mu"], counters["k7:nu"], counters["k7:mr"], counters["k7:nr"]) == (4_950, 100, 10, 20)


@pytest.mark.django_db(transaction=True)
def test_a_keys_tokens_per_minute_reserves_and_refunds(world, service):
    b = service()
    key = _limits(world.tenant.pk, key_id=7, key_tokens_per_minute=1000)

    async def go():
        too_large = await b.admit(key, request_id="x", tokens=1001, microcents=0)
        assert too_large.code == "request_exceeds_tokens_per_minute"
        a = await b.admit(key, request_id="a", tokens=800, microcents=0)
        assert not (await b.admit(key, request_id="b", tokens=800, microcents=0)).allowed
        await b.settle(a.reservation, tokens=100, microcents=0)  # 700 refunded to the bucket
        assert (await b.admit(key, request_id="c", tokens=800, microcents=0)).allowed

    run(go())


@pytest.mark.django_db(transaction=True)
def test_a_keys_rate_refusals_carry_its_rate_limit_headers(world, service):
    """A refusal by the key's requests/min or tokens/min carries OpenAI's x-ratelimit-* of the key's limits (the
    requests trio when it has a requests/min, the tokens trio when it has a tokens/min), plus Retry-After."""
    b = service()
    both = _limits(world.tenant.pk, key_id=7, key_requests_per_minute=2, key_tokens_per_minute=1000)
    tokens_only = _limits(world.tenant.pk, key_id=8, key_tokens_per_minute=1000)
    requests_only = _limits(world.tenant.pk, key_id=9, key_requests_per_minute=1)

    async def go():
        assert (await b.admit(both, request_id="a", tokens=600, microcents=0)).allowed  # 1 request, 400 tokens left
        tpm = await b.admit(both, request_id="b", tokens=600, microcents=0)
        too_large = await b.admit(both, request_id="c", tokens=1001, microcents=0)
        assert (await b.admit(both, request_id="d", tokens=10, microcents=0)).allowed  # 0 requests, 390 tokens left
        rpm = await b.admit(both, request_id="e", tokens=10, microcents=0)
        alone = await b.admit(tokens_only, request_id="f", tokens=1001, microcents=0)
        assert (await b.admit(requests_only, request_id="g", tokens=10, microcents=0)).allowed
        rpm_alone = await b.admit(requests_only, request_id="h", tokens=10, microcents=0)
        return tpm, too_large, rpm, alone, rpm_alone

    tpm, too_large, rpm, alone, rpm_alone = run(go())
    assert tpm.code == "tokens_per_minute_exceeded" and tpm.headers == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "36s",
        "retry-after": "12"}
    assert too_large.code == "request_exceeds_tokens_per_minute" and too_large.headers == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1", "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "400", "x-ratelimit-reset-tokens": "36s",
        "retry-after": "60"}
    assert rpm.code == "requests_per_minute_exceeded" and rpm.headers == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "390", "x-ratelimit-reset-tokens": "37s",
        "retry-after": "30"}
    assert alone.code == "request_exceeds_tokens_per_minute" and alone.headers == {
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0ms",
        "retry-after": "60"}
    assert rpm_alone.code == "requests_per_minute_exceeded" and rpm_alone.headers == {
        "x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0s",
        "retry-after": "60"}


@pytest.mark.django_db(transaction=True)
def test_a_reservation_given_back_whole_when_the_tenant_refuses(world, service):
    b = service()
    limits = _limits(world.tenant.pk, key_id=7, tenant_hard_microcents=1000, key_requests_per_minute=1, budgeted_keys=())

    async def go():
        a = await b.admit(limits, request_id="a", tokens=10, microcents=900)
        await b.release(a.reservation)
        again = await b.admit(limits, request_id="b", tokens=10, microcents=900)  # the rpm token and the money are back
        assert again.allowed, again.message
        return await b.snapshot(limits)

    assert run(go())["mr"] == 900


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_200_concurrent_requests_through_two_services_never_overshoot(world, redis_url):
    """Two independent RedisBudgets (two gateway processes' clients), 200 requests at once on one tenant and key: the
    settled spend never passes the hard limit nor the key's budget, and the counters equal what was settled."""
    rng = random.Random(14)
    limits = _limits(world.tenant.pk, key_id=7, tenant_hard_microcents=50_000, key_month_microcents=40_000,
                     key_month_tokens=30_000, budgeted_keys=(7,))
    plan = [(rng.randint(100, 400), rng.randint(500, 2_000)) for _ in range(200)]  # (tokens reserved, µ¢ reserved)

    async def one(service, i, tokens, bound):
        decision = await service.admit(limits, request_id=f"r{i}", tokens=tokens, microcents=bound)
        if not decision.allowed:
            return 0, 0
        await asyncio.sleep(rng.random() / 100)
        used_tokens, used_cost = rng.randint(0, tokens), rng.randint(0, bound)  # never more than reserved
        await service.settle(decision.reservation, tokens=used_tokens, microcents=used_cost)
        return used_tokens, used_cost

    async def go():
        a, b = RedisBudgets(redis_url), RedisBudgets(redis_url)
        results = await asyncio.gather(*(one(a if i % 2 else b, i, t, c) for i, (t, c) in enumerate(plan)))
        return results, await a.snapshot(limits)

    results, counters = run(go())
    spent, tokens = sum(c for _, c in results), sum(t for t, _ in results)
    assert spent <= 40_000 and tokens <= 30_000  # overshoot 0
    assert (counters["mu"], counters["k7:mu"], counters["k7:nu"], counters["mr"], counters["k7:nr"]) == (spent, spent, tokens, 0, 0)
    assert sum(1 for t, c in results if t or c) > 10  # the limit was reached by many requests, not refused at once


@pytest.mark.django_db(transaction=True)
def test_redis_unreachable_refuses_what_needs_a_months_counter_and_falls_back_for_a_keys_rates(world):
    from tests.support.gateway import closed_port_url

    b = RedisBudgets(closed_port_url().replace("http://", "redis://") + "/0")

    async def go():
        budgeted = await b.admit(_limits(world.tenant.pk, tenant_hard_microcents=1000), request_id="a", tokens=1, microcents=1)
        rates = await b.admit(_limits(world.tenant.pk, key_id=7, key_requests_per_minute=1), request_id="b", tokens=1, microcents=0)
        again = await b.admit(_limits(world.tenant.pk, key_id=7, key_requests_per_minute=1), request_id="c", tokens=1, microcents=0)
        return budgeted, rates, again

    budgeted, rates, again = run(go())
    assert (budgeted.allowed, budgeted.status, budgeted.code) == (False, 503, "limits_unavailable")
    assert rates.allowed and rates.reservation.backend == "local"  # this process's bucket
    assert (again.allowed, again.code) == (False, "requests_per_minute_exceeded")


@pytest.mark.django_db(transaction=True)
def test_a_dead_processs_request_is_settled_from_its_journal_line_once(world, redis_url, settings):
    from types import SimpleNamespace

    settings.REDIS_URL = redis_url
    budgets.reset_budgets()
    limits = _limits(world.tenant.pk, key_id=7, tenant_hard_microcents=10_000, key_month_tokens=500, budgeted_keys=(7,))
    price_entry = SimpleNamespace(input_price=Decimal("10"), output_price=Decimal("20"))

    async def go():
        service = budgets.get_budgets()
        decision = await service.admit(limits, request_id="dead-1", tokens=300, microcents=5_000)
        fields = budgets.journal_fields(decision.reservation, price_entry)  # what its journal line kept
        for _ in range(2):  # a recovery run twice counts once
            await budgets.settle_recovered(fields, tenant_id=world.tenant.pk, request_id="dead-1", input_tokens=40, output_tokens=12)
        return await service.snapshot(limits)

    try:
        counters = run(go())
    finally:
        budgets.reset_budgets()
    assert (counters["mu"], counters["mr"], counters["k7:nu"], counters["k7:nr"]) == (40 * 10 + 12 * 20, 0, 52, 0)
