"""Rating is exact (against an independent computation over random ledgers), idempotent and price-aware."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import date, timedelta
from fractions import Fraction

import pytest

from billing import rating
from billing.models import DailyUsage
from tests.support.billing import price, random_ledger, usage, utc

JAN = date(2026, 1, 1)


def _expected_price(prices, *, model, adapter, pool_id, day):
    """Independent resolution: most specific scope first (adapter, pool, base), latest effective_from ≤ day."""
    def latest(cands):
        cands = [p for p in cands if p.effective_from <= day]
        return max(cands, key=lambda p: (p.effective_from, p.pk)) if cands else None

    mine = [p for p in prices if p.base_model.name == model]
    return (
        (latest([p for p in mine if p.adapter_id and p.adapter.name == adapter]) if adapter else None)
        or (latest([p for p in mine if p.pool_id and p.pool_id == pool_id and not p.adapter_id]) if pool_id else None)
        or latest([p for p in mine if not p.adapter_id and not p.pool_id])
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rollup_and_cost_match_an_independent_computation(world, catalog, prices, seed):
    rows = random_ledger(world, catalog, seed)
    rating.rate_range(JAN, date(2026, 1, 31), now=utc(2026, 2, 5))

    billed = [r for r in rows if r.status != "error"]
    expected_rollup = defaultdict(lambda: [0, 0, 0])
    for r in billed:
        key = (r.tenant_id, r.created_at.date(), r.model, r.adapter, r.pool_id)
        expected_rollup[key][0] += 1
        expected_rollup[key][1] += r.input_tokens
        expected_rollup[key][2] += r.output_tokens
    got = {
        (d.tenant_id, d.day, d.model, d.adapter, d.pool_id): [d.requests, d.input_tokens, d.output_tokens]
        for d in DailyUsage.all_tenants.all()
    }
    assert got == dict(expected_rollup)
    assert set(DailyUsage.all_tenants.values_list("period", flat=True)) == {JAN}

    for tenant in (world.tenant, world.other_tenant):
        lines = defaultdict(lambda: [0, 0])
        for r in billed:
            if r.tenant_id != tenant.pk:
                continue
            p = _expected_price(prices, model=r.model, adapter=r.adapter, pool_id=r.pool_id, day=r.created_at.date())
            key = (r.model, r.adapter, p.pk)
            lines[key][0] += r.input_tokens
            lines[key][1] += r.output_tokens
        by_pk = {p.pk: p for p in prices}
        expected = {}
        for (model, adapter, pk), (t_in, t_out) in lines.items():
            exact = (Fraction(t_in) * Fraction(by_pk[pk].input_price) + Fraction(t_out) * Fraction(by_pk[pk].output_price)) / 1_000_000
            expected[(model, adapter, pk)] = int(exact + Fraction(1, 2)) if exact >= 0 else None  # half up, once per line
        cost = rating.period_cost(tenant=tenant, period=JAN)
        assert {(l.model, l.adapter, l.price.pk): l.amount_cents for l in cost.lines} == expected
        assert cost.total_cents == sum(expected.values())


def test_rerating_changes_nothing(world, catalog, prices):
    random_ledger(world, catalog, seed=7, n=150)
    rating.rate_range(JAN, date(2026, 1, 31), now=utc(2026, 2, 5))
    fields = ("tenant_id", "period", "day", "kind", "model", "adapter", "pool_id", "requests", "input_tokens", "output_tokens", "duration_ms")
    before = Counter(DailyUsage.all_tenants.values_list(*fields))
    rating.rate_range(JAN, date(2026, 1, 31), now=utc(2026, 2, 5))
    rating.rate_range(JAN, date(2026, 1, 31), now=utc(2026, 2, 6))
    assert Counter(DailyUsage.all_tenants.values_list(*fields)) == before


def test_half_up_rounding_once_per_line(world, catalog):
    price(catalog.base, effective_from=date(2025, 12, 1), inp="1", out="0")
    # 500,000 tokens at 1 ¢/M = 0.5 ¢ per day; two days on one line = 1.0 ¢ (rounding per day would give 2).
    usage(world.tenant, at=utc(2026, 1, 3, 10), pool=catalog.shared, inp=250_000)
    usage(world.tenant, at=utc(2026, 1, 4, 10), pool=catalog.shared, inp=250_000)
    usage(world.tenant, at=utc(2026, 1, 4, 11), pool=catalog.shared, inp=500_000)
    rating.rate_range(JAN, date(2026, 1, 5), now=utc(2026, 1, 6))
    cost = rating.period_cost(tenant=world.tenant, period=JAN)
    assert [l.amount_cents for l in cost.lines] == [1]  # exactly 1.0 ¢
    usage(world.tenant, at=utc(2026, 1, 5, 11), pool=catalog.shared, inp=500_000)
    rating.rate_range(JAN, date(2026, 1, 5), now=utc(2026, 1, 6))
    assert rating.period_cost(tenant=world.tenant, period=JAN).total_cents == 2  # 1.5 ¢ → 2 ¢ (half up)


def test_a_fine_tuned_models_requests_are_priced_as_the_gateway_records_them(world, catalog):
    """The gateway's ledger row names the model the tenant called: for an adapter, model = adapter = its ft: name."""
    name = catalog.adapter.name
    price(catalog.base, effective_from=date(2025, 12, 1), inp="100", out="300")
    usage(world.tenant, at=utc(2026, 1, 3, 10), model=name, adapter=name, pool=catalog.shared, inp=1_000_000, out=1_000_000)
    rating.rate_range(JAN, date(2026, 1, 5), now=utc(2026, 1, 6))
    [line] = rating.period_cost(tenant=world.tenant, period=JAN).lines
    assert (line.model, line.adapter, line.amount_cents) == (name, name, 400)  # the base model's prices, not "no price"

    price(catalog.base, effective_from=date(2026, 1, 1), inp="1", out="2", adapter=catalog.adapter)  # its own entry wins
    assert rating.period_cost(tenant=world.tenant, period=JAN).lines[0].amount_cents == 3


def test_training_usage_is_rated(world, catalog):
    from finetune.models import FineTuneJob, TrainingFile, TrainingUsage

    model = rating.training_usage_model()
    assert model is TrainingUsage

    price(catalog.base, effective_from=date(2025, 12, 1), inp="15", out="60", train="300")
    for i, tokens in enumerate((1_234_567, 765_433)):
        file = TrainingFile.all_tenants.create(tenant=world.tenant, filename="t.jsonl", path="t.jsonl", status="ready")
        job = FineTuneJob.all_tenants.create(tenant=world.tenant, base_model=catalog.base, training_file=file)
        model.all_tenants.create(tenant=world.tenant, job=job, base_model="tiny-chat", trained_tokens=tokens, created_at=utc(2026, 1, 9 + i, 12))
    rating.rate_range(JAN, date(2026, 1, 31), now=utc(2026, 2, 2))
    rows = DailyUsage.objects.for_tenant(world.tenant).filter(kind=DailyUsage.Kind.TRAINING)
    assert sorted(rows.values_list("day", "trained_tokens")) == [(date(2026, 1, 9), 1_234_567), (date(2026, 1, 10), 765_433)]
    [line] = rating.period_cost(tenant=world.tenant, period=JAN).lines
    assert (line.kind, line.trained_tokens, line.amount_cents) == ("training", 2_000_000, 600)  # 2 M × 300 ¢/M
