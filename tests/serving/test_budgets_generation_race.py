"""A request settled just before its tenant's budget generation changes, whose ledger record is not yet written when
the new generation is seeded from the ledger, is counted once (serving.budgets; docs/limits.md, "Seeding from the
ledger"): found by helper H10 reading serving/budgets.py. Before the fix the settle looked only for a generation seeded
after the request was *admitted* (`seeded_ms > admitted_ms`); a record is written after its settle (group commit,
serving/ledger.py), so a seed made after the settle and before the write missed it, and a hard limit could be overshot
by it. Now a settled request stays in its tenant's month's pending set until its record is in the database, and a seed
adds the pending requests its read of the ledger does not hold. The tests below cover each order of a settle, a record,
its `recorded` mark and a seed, in-process and in Redis."""

from __future__ import annotations

import asyncio
from datetime import date

import pytest
from asgiref.sync import sync_to_async
from django.utils import timezone

from serving.budgets import BudgetLimits, LocalBudgets, RedisBudgets, generation_of
from tests.support.billing import price, usage
from tests.support.gateway import make_base_model


@pytest.fixture(params=["local", "redis"])
def service(request):
    if request.param == "local":
        return LocalBudgets()
    return RedisBudgets(request.getfixturevalue("redis_url"))


@pytest.mark.django_db(transaction=True)
def test_a_request_settled_before_a_generation_change_but_recorded_after_its_seed_is_still_counted(world, service):
    price(make_base_model("tiny-chat"), effective_from=date(2025, 12, 1), inp="100", out="200")
    before = BudgetLimits(tenant_id=world.tenant.pk, tenant_hard_microcents=1_000_000,
                          generation=generation_of(tenant_hard=True, budgeted_keys=()))
    # An admin then gives key 7 a monthly budget: a new generation, seeded from the ledger by the next request.
    after = BudgetLimits(tenant_id=world.tenant.pk, key_id=7, tenant_hard_microcents=1_000_000, key_month_microcents=10**9,
                         budgeted_keys=(7,), generation=generation_of(tenant_hard=True, budgeted_keys=(7,)))

    async def go():
        first = await service.admit(before, request_id="r1", tokens=3_000, microcents=400_000)
        assert first.allowed
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)  # settled; its record is being written
        second = await service.admit(after, request_id="r2", tokens=10, microcents=1_000)  # seeds the new generation
        assert second.allowed
        await sync_to_async(usage)(world.tenant, at=timezone.now(), model="tiny-chat", inp=3_000)  # r1's record lands: 300,000 µ¢
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(after)

    counters = asyncio.run(go())
    assert counters["mu"] == 300_000  # the ledger's spend; the bug leaves 0


# ---- the pending set: every case of a record and a seed, counted once ---------------------------------------------

OLD = dict(tenant_hard_microcents=1_000_000, generation=generation_of(tenant_hard=True, budgeted_keys=()))
NEW = dict(key_id=7, tenant_hard_microcents=1_000_000, key_month_microcents=10**9, budgeted_keys=(7,),
           generation=generation_of(tenant_hard=True, budgeted_keys=(7,)))


def _record(tenant, request_id, *, inp=0, out=0, key_id=None):
    """The request's ledger record (`request_id` as the gateway's), written now."""
    from serving.models import UsageRecord
    return UsageRecord.all_tenants.create(tenant=tenant, request_id=request_id, api_key_id=key_id, endpoint="chat",
                                          model="tiny-chat", input_tokens=inp, output_tokens=out, status="ok",
                                          duration_ms=10, created_at=timezone.now())


async def _recorded(service, reservation):
    done = service.recorded(reservation)
    if done is not None:
        await done


async def _pending(service, tenant_id):
    got = service.pending(tenant_id)
    return (await got) if asyncio.iscoroutine(got) else got


@pytest.fixture
def priced(world):
    price(make_base_model("tiny-chat"), effective_from=date(2025, 12, 1), inp="100", out="200")
    return world


@pytest.mark.django_db(transaction=True)
def test_a_request_recorded_before_the_seed_is_counted_once_from_the_ledger(priced, service):
    tenant = priced.tenant

    async def go():
        first = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        await sync_to_async(_record)(tenant, "r1", inp=3_000)
        await _recorded(service, first.reservation)
        assert "r1" in await _pending(service, tenant.pk)  # kept for PENDING_GRACE_MS after its record
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    assert asyncio.run(go())["mu"] == 300_000  # the ledger's, not 600,000


@pytest.mark.django_db(transaction=True)
def test_a_record_written_but_not_yet_marked_recorded_is_counted_once(priced, service):
    """The process died (or has not yet said so) between its record's commit and `recorded`: the seed's read holds it."""
    tenant = priced.tenant

    async def go():
        first = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        await sync_to_async(_record)(tenant, "r1", inp=3_000)
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    assert asyncio.run(go())["mu"] == 300_000


@pytest.mark.django_db(transaction=True)
def test_a_request_settled_between_the_seeds_listing_and_its_end_is_counted_once(priced, service, monkeypatch):
    """A settle after the seed listed the pending set: its record cannot be in the read; the seed's end adds it."""
    from billing import spend

    tenant = priced.tenant
    late = {}

    def loader(tenant_id, month, key_ids, *, pending=None):
        def listing():
            ids = list(pending())
            if "reservation" in late:  # r3 settles now, on the event loop, while the seed is under way
                asyncio.run_coroutine_threadsafe(service.settle(late.pop("reservation"), tokens=1_000, microcents=100_000),
                                                 late["loop"]).result(5)
            return ids
        return spend.budget_seed_usage(tenant_id, month, key_ids, pending=listing)

    monkeypatch.setattr("serving.budgets.SEED_LOADER", "tests.serving.test_budgets_generation_race._loader")
    monkeypatch.setattr(f"{__name__}._loader", loader, raising=False)

    async def go():
        late["loop"] = asyncio.get_running_loop()
        first = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        third = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r3", tokens=1_000, microcents=100_000)
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        late["reservation"] = third.reservation
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, key_id=7, **{k: v for k, v in NEW.items() if k != "key_id"}),
                                     request_id="r2", tokens=10, microcents=1_000)
        assert second.allowed and "reservation" not in late
        for rid, inp in (("r1", 3_000), ("r3", 1_000)):
            await sync_to_async(_record)(tenant, rid, inp=inp)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    assert asyncio.run(go())["mu"] == 400_000


@pytest.mark.django_db(transaction=True)
def test_a_listing_later_than_the_grace_after_the_read_began_is_done_again(priced, service, monkeypatch):
    """An entry is forgotten PENDING_GRACE_MS after its record: a seed that listed later than that after its read began
    may have missed one, so it is seeded again."""
    import time

    from billing import spend

    tenant = priced.tenant
    calls = []

    def loader(tenant_id, month, key_ids, *, pending=None):
        def listing():
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.3)
            return list(pending())
        return spend.budget_seed_usage(tenant_id, month, key_ids, pending=listing)

    monkeypatch.setattr("serving.budgets.PENDING_GRACE_MS", 200)
    monkeypatch.setattr("serving.budgets.SEED_LOADER", "tests.serving.test_budgets_generation_race._loader")
    monkeypatch.setattr(f"{__name__}._loader", loader, raising=False)

    async def go():
        first = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        assert second.allowed
        await sync_to_async(_record)(tenant, "r1", inp=3_000)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    counters = asyncio.run(go())
    assert len(calls) == 3  # the first seed of each generation; the new one's first listing came too late: once more
    assert counters["mu"] == 300_000


@pytest.mark.django_db(transaction=True)
def test_a_request_of_a_key_without_a_budget_is_counted_when_one_is_switched_on(priced, service):
    """Not counted where it ran (its key had only a rate limit), settled, not yet recorded: the tenant's new hard budget
    is seeded with it from the pending set, and the key's new budget too."""
    tenant = priced.tenant
    rates = BudgetLimits(tenant_id=tenant.pk, key_id=7, key_requests_per_minute=100,
                         generation=generation_of(tenant_hard=False, budgeted_keys=()))

    async def go():
        first = await service.admit(rates, request_id="r1", tokens=3_000, microcents=400_000)
        assert first.allowed and not first.reservation.counted
        await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        await sync_to_async(_record)(tenant, "r1", inp=3_000, key_id=None)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    counters = asyncio.run(go())
    assert (counters["mu"], counters["k7:mu"], counters["k7:nu"]) == (300_000, 300_000, 3_010)


@pytest.mark.django_db(transaction=True)
def test_a_request_admitted_under_the_old_generation_after_the_new_one_was_seeded_is_counted_in_it(priced, service):
    """A process whose configuration is not yet reloaded admits under the old generation after another seeded the new."""
    tenant = priced.tenant

    async def go():
        before = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r00", tokens=10, microcents=1_000)
        await service.settle(before.reservation, tokens=10, microcents=0)  # the old generation, in use until now
        seeding = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r0", tokens=10, microcents=1_000)
        await service.settle(seeding.reservation, tokens=10, microcents=0)
        stale = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        await service.settle(stale.reservation, tokens=3_000, microcents=300_000)
        await sync_to_async(_record)(tenant, "r1", inp=3_000)
        return await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    assert asyncio.run(go())["mu"] == 300_000


@pytest.mark.django_db(transaction=True)
def test_a_settle_run_twice_counts_once_and_a_released_request_leaves_nothing_pending(priced, service):
    tenant = priced.tenant

    async def go():
        first = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        refused = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r9", tokens=10, microcents=1_000)
        await service.release(refused.reservation)  # the tenant's admission refused it: it never ran, has no record
        for _ in range(2):
            await service.settle(first.reservation, tokens=3_000, microcents=300_000)
        pending = await _pending(service, tenant.pk)
        second = await service.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        await service.settle(second.reservation, tokens=10, microcents=0)
        return pending, await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **OLD)), await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW))

    pending, old, new = asyncio.run(go())
    assert pending == {"r1": (None, 3_000, 300_000)}
    assert (old["mu"], old["mr"], new["mu"]) == (300_000, 0, 300_000)


@pytest.mark.django_db(transaction=True)
def test_recorded_entries_are_forgotten_after_the_grace_and_the_set_expires_with_the_month(priced, service, monkeypatch):
    from serving import budgets

    monkeypatch.setattr("serving.budgets.PENDING_GRACE_MS", 100)
    tenant = priced.tenant

    async def go():
        out = []
        for rid in ("r1", "r2"):
            d = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id=rid, tokens=10, microcents=1_000)
            await service.settle(d.reservation, tokens=10, microcents=500)
            out.append(d.reservation)
        await _recorded(service, out[0])
        kept = set(await _pending(service, tenant.pk))
        await asyncio.sleep(0.25)
        await _recorded(service, out[1])  # forgets r1 (recorded 0.25 s ago), keeps r2 for its grace
        ttl = None
        if isinstance(service, RedisBudgets):
            ttl = await service._client().ttl(service._pending_keys(tenant.pk, out[0].month)[0])
        return kept, set(await _pending(service, tenant.pk)), ttl

    kept, after, ttl = asyncio.run(go())
    assert (kept, after) == ({"r1", "r2"}, {"r2"})
    if ttl is not None:
        assert 0 < ttl <= budgets.MONTH_TTL_S


@pytest.mark.django_db(transaction=True)
def test_a_dead_processs_request_is_recovered_into_the_pending_set_and_counted_once(priced, redis_url, settings):
    """The process settled and died before its record: the recovery's settle counts nothing more, its record is written,
    `recorded_recovered` marks it; a seed before the record counts it from the pending set, one after from the ledger."""
    from decimal import Decimal
    from types import SimpleNamespace

    from serving import budgets

    settings.REDIS_URL = redis_url
    budgets.reset_budgets()
    tenant = priced.tenant
    price_entry = SimpleNamespace(input_price=Decimal("100"), output_price=Decimal("200"))

    async def go():
        service = budgets.get_budgets()
        died = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="dead-1", tokens=3_000, microcents=400_000)
        fields = budgets.journal_fields(died.reservation, price_entry)
        await service.settle(died.reservation, tokens=3_000, microcents=300_000)  # its settle, then the process died
        for _ in range(2):  # the recovery (run twice): settle again, then the record
            await budgets.settle_recovered(fields, tenant_id=tenant.pk, request_id="dead-1", input_tokens=3_000, output_tokens=0)
        new_limits = BudgetLimits(tenant_id=tenant.pk, **NEW)
        before = await service.admit(new_limits, request_id="r2", tokens=10, microcents=1_000)  # seeded before the record
        await service.settle(before.reservation, tokens=10, microcents=0)
        await sync_to_async(_record)(tenant, "dead-1", inp=3_000)
        await budgets.recorded_recovered(fields, tenant_id=tenant.pk, request_id="dead-1")
        never_settled = await service.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="dead-2", tokens=10, microcents=1_000)
        fields2 = budgets.journal_fields(never_settled.reservation, price_entry)
        await sync_to_async(_record)(tenant, "dead-2", inp=10)  # its record written, its settle never reached Redis
        await budgets.settle_recovered(fields2, tenant_id=tenant.pk, request_id="dead-2", input_tokens=10, output_tokens=0, recorded=True)
        return (await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **OLD)), await service.snapshot(new_limits),
                await service.pending(tenant.pk), await service._client().zrange(service._pending_keys(tenant.pk, died.reservation.month)[1], 0, -1))

    try:
        old, new, pending, marked = asyncio.run(go())
    finally:
        budgets.reset_budgets()
    assert (old["mu"], old["mr"]) == (300_000 + 1_000, 0)
    assert new["mu"] == 300_000  # dead-1 once; dead-2's settle came after its record: its own generation only
    assert set(pending) == {"dead-1", "r2"} and marked == ["dead-1"]  # r2: settled, its record not written


@pytest.mark.django_db(transaction=True)
def test_two_processes_on_redis_one_settling_the_other_seeding(priced, redis_url):
    """Two gateway processes' services (each its own clients): the one with the old configuration settles, the one with
    the new seeds; the record lands after the seed."""
    tenant = priced.tenant

    async def go():
        a, b = RedisBudgets(redis_url), RedisBudgets(redis_url)
        first = await a.admit(BudgetLimits(tenant_id=tenant.pk, **OLD), request_id="r1", tokens=3_000, microcents=400_000)
        await a.settle(first.reservation, tokens=3_000, microcents=300_000)
        second = await b.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r2", tokens=10, microcents=1_000)
        await sync_to_async(_record)(tenant, "r1", inp=3_000)
        await _recorded(a, first.reservation)
        await b.settle(second.reservation, tokens=10, microcents=0)
        third = await a.admit(BudgetLimits(tenant_id=tenant.pk, **NEW), request_id="r3", tokens=10, microcents=800_000)
        return await b.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW)), third

    counters, third = asyncio.run(go())
    assert counters["mu"] == 300_000
    assert (third.allowed, third.code) == (False, "insufficient_quota")  # 300,000 + 800,000 > 1,000,000


@pytest.mark.parametrize("spooled", [False, True])
def test_the_accounting_marks_a_request_recorded_only_once_its_record_is_in_the_database(spooled):
    """serving/gateway/accounting.py: settle, record, then `recorded` — not when the record only reached the spool (the
    database may be back for another process's seed before this one's spool is replayed)."""
    import time
    from types import SimpleNamespace

    from serving.gateway import endpoints as E
    from serving.gateway.accounting import Accounting
    from serving.gateway.budget_gate import BudgetHold

    class Ledger:
        def __init__(self):
            self.spooled = 0

        async def record(self, entry):
            self.spooled = 1 if spooled else 0
            return True

    service = LocalBudgets()
    limits = BudgetLimits(tenant_id=7, key_id=5, key_requests_per_minute=100)

    async def go():
        decision = await service.admit(limits, request_id="r1", tokens=50, microcents=500)
        acct = Accounting(request_id="r1", endpoint=E.CHAT, tenant=SimpleNamespace(id=7, slug="t"), key_id=5, model="m",
                          adapter="", pool=SimpleNamespace(id=3), started_at=time.perf_counter(), prompt_estimate=40,
                          reservation=None, admission=None, ledger=Ledger(), background=set(),
                          budget=BudgetHold(decision.reservation, None, service))
        await acct.complete(SimpleNamespace(prompt_tokens=40, completion_tokens=2), 2)
        return decision.reservation

    reservation = asyncio.run(go())
    assert "r1" in service.pending(7)  # settled, in the pending set (marked, kept for its grace, or not marked)
    assert reservation.recorded is (not spooled)


@pytest.mark.django_db(transaction=True)
def test_a_generation_switched_back_on_has_counted_what_was_spent_meanwhile(priced, service):
    """A key's budget switched on, then off again: the tenant's first generation is in use again, and its counters hold
    what was spent under the other one (every seeded generation of the month counts every settle after its seed)."""
    tenant = priced.tenant

    async def go():
        for rid, limits, cost in (("r1", OLD, 100_000), ("r2", NEW, 200_000), ("r3", OLD, 50_000)):
            d = await service.admit(BudgetLimits(tenant_id=tenant.pk, **limits), request_id=rid, tokens=cost // 100, microcents=cost)
            assert d.allowed
            await service.settle(d.reservation, tokens=cost // 100, microcents=cost)
            await sync_to_async(_record)(tenant, rid, inp=cost // 100)
            await _recorded(service, d.reservation)
        return (await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **OLD)),
                await service.snapshot(BudgetLimits(tenant_id=tenant.pk, **NEW)))

    old, new = asyncio.run(go())
    assert (old["mu"], new["mu"], new["k7:mu"]) == (350_000, 350_000, 200_000)
