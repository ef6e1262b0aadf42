"""The admit stage's budgets (serving.gateway.budget_gate) and the snapshot's budget limits (serving.config)."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from types import SimpleNamespace

from serving.config import load_snapshot
from serving.gateway.budget_gate import BudgetHold, bound_microcents, price_for, settle_figures
from serving.tokencount import PromptCount
from tenants import services
from tenants.services import Actor
from tests.support.billing import price
from tests.support.gateway import make_base_model, make_pool

PRICE = SimpleNamespace(input_price=Decimal("100"), output_price=Decimal("300"))


def _plan(prompt: int, max_tokens: int, reserve: int):
    return SimpleNamespace(prompt=PromptCount(prompt, exact=True), max_tokens=max_tokens, reserve_tokens=reserve)


def test_the_bound_prices_the_prompt_at_input_and_the_max_tokens_at_output_each_within_the_reservation():
    assert bound_microcents(_plan(40, 100, 140), PRICE) == 40 * 100 + 100 * 300
    assert bound_microcents(_plan(4000, 200, 4096), PRICE) == 4000 * 100 + 200 * 300
    assert bound_microcents(_plan(5000, 5000, 4096), PRICE) == 4096 * 100 + 4096 * 300  # a bound capped at the context
    assert bound_microcents(_plan(40, 100, 140), None) == 0  # an unpriced model costs nothing


def test_the_settle_counts_the_ledgers_tokens_and_their_exact_cost_and_nothing_for_an_error():
    hold = BudgetHold(None, SimpleNamespace(input_price=Decimal("0.5"), output_price=Decimal("3")), None)
    assert settle_figures(hold, input_tokens=3, output_tokens=2, status="ok") == (5, 8)  # ⌈1.5 + 6⌉
    assert settle_figures(hold, input_tokens=3, output_tokens=2, status="cancelled") == (5, 8)
    assert settle_figures(hold, input_tokens=3, output_tokens=2, status="error") == (5, 0)


def test_the_snapshot_holds_budget_limits_where_a_tenant_or_key_has_one_and_the_days_price(world):
    base = make_base_model("tiny-chat")
    pool = make_pool("shared", base, ["http://b:1"])
    price(base, effective_from=date(2025, 12, 1), inp="100", out="200")
    limited, _ = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=Actor(user=world.owner))
    plain, _ = services.api_key_create(tenant=world.tenant, name="plain", scopes=["inference"], actor=Actor(user=world.owner))
    snap = load_snapshot()
    assert snap.budget_limits_for(world.tenant.pk, snap.keys[limited.prefix]) is None and snap.prices is None  # nothing set: no cost

    services.api_key_controls_update(key=limited, actor=Actor(user=world.owner), tenant_models=set(), monthly_budget_cents=25,
                                     requests_per_minute=5)
    services.spend_budget_set(tenant=world.tenant, monthly_cents=1000, mode="hard", actor=Actor(user=world.owner))
    snap = load_snapshot()
    key_limits = snap.budget_limits_for(world.tenant.pk, snap.keys[limited.prefix])
    assert (key_limits.tenant_hard_microcents, key_limits.key_month_microcents, key_limits.key_requests_per_minute) == (
        1000 * 1_000_000, 25 * 1_000_000, 5)
    assert key_limits.budgeted_keys == (limited.pk,)
    assert snap.budget_limits_for(world.tenant.pk, snap.keys[plain.prefix]).tenant_hard_microcents == 1000 * 1_000_000
    assert snap.budget_limits_for(world.tenant.pk, None).key_id is None  # the playground: the tenant's budget only
    assert snap.budget_limits_for(world.other_tenant.pk, None) is None
    route = snap.tenants[world.tenant.pk].models["tiny-chat"]
    found = price_for(snap, SimpleNamespace(route=route, pool=SimpleNamespace(id=pool.pk)))
    assert (found.input_price, found.output_price) == (Decimal("100"), Decimal("200"))

    services.spend_budget_set(tenant=world.tenant, monthly_cents=1000, mode="soft", actor=Actor(user=world.owner))
    generation = key_limits.generation
    snap = load_snapshot()
    assert snap.budget_limits_for(world.tenant.pk, snap.keys[plain.prefix]) is None  # soft: alerts only, nothing at admission
    assert snap.budget_limits_for(world.tenant.pk, snap.keys[limited.prefix]).generation != generation  # other counters kept
