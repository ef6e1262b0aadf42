"""Money budgets and per-key budgets through real gateway processes: 200 simultaneous requests through two gateways
(`uvicorn portal.asgi:application`) on one Redis never spend past a hard monthly budget or a key's monthly budget, and
the counters equal the ledger afterwards (docs/limits.md, "Money budgets and per-key limits")."""

from __future__ import annotations

import asyncio
import time
from datetime import date, timedelta

import pytest

from billing import spend
from serving.admission import window_id
from tenants import services
from tenants.models import ApiKey
from tests.support.billing import price
from tests.support.faults import UNLIMITED, database_url, faults, wait_until  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_200_simultaneous_requests_through_two_gateways_never_overspend(faults):
    backend = faults.start_backend(tokens_per_s=400)
    faults.create(backend, {"acme": UNLIMITED})
    tenant = faults.tenants["acme"]
    from serving.models import BaseModel

    # $100 and $200 per million tokens: a request of ~10 prompt + 20 output tokens costs about half a cent, and
    # reserves its bound (the prompt counted as a bound, ~90 tokens, + 20 max tokens): about 1.3 cents.
    price(BaseModel.objects.get(name="tiny-chat"), effective_from=date.today() - timedelta(days=1), inp="10000", out="20000")
    services.spend_budget_set(tenant=tenant, monthly_cents=30, mode="hard", actor=services.SYSTEM)
    key, key_secret = services.api_key_create(tenant=tenant, name="budgeted", scopes=["inference"], actor=services.SYSTEM)
    services.api_key_controls_update(key=key, actor=services.SYSTEM, tenant_models={"tiny-chat"}, monthly_budget_cents=8)
    faults.keys["budgeted"] = key_secret
    faults.tenants["budgeted"] = tenant
    gateways = [faults.start_gateway(), faults.start_gateway()]

    async def wave(n: int):
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(faults.request(session, gateways[i % 2], "budgeted" if i % 2 else "acme", 20) for i in range(n)))

    # faults.request sends with the key named ("budgeted": the key with its own budget); both keys are the tenant's.
    async def wave_of_key():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await faults.request(session, gateways[1], "budgeted", 20)

    first = asyncio.run(wave(200))  # 200 at once: each reserves its bound, so most are refused while the first run
    assert sum(r.status == 200 for r in first) > 10 and sum(r.status == 429 for r in first) > 100
    for _ in range(30):  # then waves of 20 at once until none gets through: the budgets are used up to their last request
        if not any(r.status == 200 for r in asyncio.run(wave(20))):
            break

    served = [r for r in faults.results if r.status == 200]
    refused = [r for r in faults.results if r.status == 429]
    assert len(served) + len(refused) == len(faults.results), [(r.status, r.error) for r in faults.results if r.status not in (200, 429)]
    assert all(r.error["error"]["code"] == "insufficient_quota" for r in refused)

    start, end = spend.month_bounds()
    by_key = wait_until(lambda: (lambda u: u if sum(x.requests for x in u.values()) == len(served) else None)(
        spend.ledger_usage_by_key(tenant=tenant, start=start, end=end)), 20)
    assert by_key, "ledger records missing"
    tenant_spent = sum(u.microcents for u in by_key.values())
    key_spent = by_key[key.pk].microcents
    assert tenant_spent <= 30 * spend.MICROCENTS_PER_CENT  # overshoot 0
    assert key_spent <= 8 * spend.MICROCENTS_PER_CENT  # overshoot 0
    bound = 2 * spend.MICROCENTS_PER_CENT  # more than one request's reservation (~1.3 cents)
    assert tenant_spent > 30 * spend.MICROCENTS_PER_CENT - bound  # used up to its last request
    # The key meets its own budget, not only the tenant's: which of the two runs out first in the waves depends on
    # which gateway's requests reach admission first, so raise the tenant's budget (a new generation, seeded from the
    # ledger) and spend the key alone until it is refused, one request at a time.
    services.spend_budget_set(tenant=tenant, monthly_cents=1_000, mode="hard", actor=services.SYSTEM)
    # The gateways see the new budget at their next configuration poll (every 0.5 s): until then a request may still
    # meet the old tenant budget, so an organisation refusal in the first seconds is waited out, not counted.
    reloaded_by = time.monotonic() + 5
    for _ in range(80):
        last = asyncio.run(wave_of_key())
        if last.status == 200:
            continue
        if "Your organisation has reached its monthly budget" in last.error["error"]["message"] and time.monotonic() < reloaded_by:
            time.sleep(0.2)
            continue
        break
    assert last.status == 429 and "This API key has reached its monthly spend budget" in last.error["error"]["message"], last.error
    served = [r for r in faults.results if r.status == 200]
    by_key = wait_until(lambda: (lambda u: u if sum(x.requests for x in u.values()) == len(served) else None)(
        spend.ledger_usage_by_key(tenant=tenant, start=start, end=end)), 20)
    assert by_key, "ledger records missing"
    tenant_spent = sum(u.microcents for u in by_key.values())
    key_spent = by_key[key.pk].microcents
    assert 8 * spend.MICROCENTS_PER_CENT - bound < key_spent <= 8 * spend.MICROCENTS_PER_CENT  # up to its last request, overshoot 0

    r = faults.redis.client()
    month = window_id("month")
    generation = r.get(f"mtl:{{t{tenant.pk}}}:bud:{month}:cur")
    counters = r.hgetall(f"mtl:{{t{tenant.pk}}}:bud:{month}:{generation}")
    assert (int(counters["mu"]), int(counters[f"k{key.pk}:mu"]), int(counters["mr"]), int(counters[f"k{key.pk}:mr"])) == (
        tenant_spent, key_spent, 0, 0)  # the counters equal the ledger
    assert ApiKey.objects.for_tenant(tenant).count() == 2
    # Every served request's record is in the database, so each pending entry is marked recorded (docs/limits.md,
    # "Seeding from the ledger"): the gateways' Accounting called `recorded` after their ledger writes.
    pend = f"mtl:{{t{tenant.pk}}}:bud:{month}:pend"
    marked = wait_until(lambda: (lambda p, m: m if p and p == m else None)(set(r.hkeys(pend)) - {"_seq"}, set(r.zrange(pend + ":rec", 0, -1))), 10)
    assert marked and len(marked) <= len(served)
