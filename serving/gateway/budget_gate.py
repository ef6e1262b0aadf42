"""The admit stage's money budgets and per-key limits (serving.budgets), beside the tenant's admission.

`admit_budgets` runs before the tenant's admission: it reserves the request's tokens (prompt + max tokens) and their
cost at the model's price of the day — the prompt at the input price, the max tokens at the output price, each no more
than the reservation — against the tenant's hard money limit and the key's own limits. When the tenant's admission
then refuses, `release` gives that reservation back whole. `settle_figures` are what the request's Accounting settles:
the tokens its ledger record holds and their exact cost (nothing for a backend error, which is not billed).
`recorded` follows the ledger write: the settled request leaves the pending set a later seed reads (docs/limits.md,
"Seeding from the ledger").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from serving.budgets import BudgetDecision, get_budgets, request_cost_microcents
from serving.gateway.errors import ApiError


@dataclass(slots=True)
class BudgetHold:
    """A request's budget reservation and the price it was reserved at (the same price settles it)."""

    reservation: object  # serving.budgets.BudgetReservation
    price: object  # billing's Price entry, or None (an unpriced model costs nothing)
    service: object


def price_for(snap, plan):
    """The price entry in force today for the request's model, adapter and pool (None: unpriced)."""
    if snap.prices is None:
        return None
    route = plan.route
    return snap.prices.resolve(model=route.name, adapter=route.adapter or "", pool_id=plan.pool.id,
                               day=datetime.now(timezone.utc).date())


def bound_microcents(plan, price) -> int:
    """The most the request can cost: its prompt at the input price and its max tokens at the output price, each no more
    than its reservation (prompt + max tokens, capped at the context for a bound)."""
    reserve = plan.reserve_tokens
    return request_cost_microcents(min(plan.prompt.tokens, reserve), min(plan.max_tokens, reserve), price)


async def admit_budgets(snap, tenant, key, plan, request_id: str) -> BudgetHold | None:
    """Reserve against the budgets (None when the request has none); ApiError 429/503 when refused."""
    limits = snap.budget_limits_for(tenant.id, key)
    if limits is None:
        return None
    price = price_for(snap, plan)  # counted or not: its settle puts its cost in the pending set a later seed reads
    service = get_budgets()
    decision: BudgetDecision = await service.admit(limits, request_id=request_id, tokens=plan.reserve_tokens,
                                                   microcents=bound_microcents(plan, price))
    if not decision.allowed:
        raise ApiError(decision.status, decision.message, type=decision.error_type, code=decision.code, headers=decision.headers or {})
    return BudgetHold(decision.reservation, price, service)


async def release(hold: BudgetHold | None) -> None:
    """The tenant's admission refused the request: its budget reservation back, whole."""
    if hold is not None:
        await hold.service.release(hold.reservation)


def settle_figures(hold: BudgetHold, *, input_tokens: int, output_tokens: int, status: str) -> tuple[int, int]:
    """(tokens, µ¢) the request used, as its ledger record says; a backend error costs nothing (billing.rating)."""
    cost = 0 if status == "error" else request_cost_microcents(input_tokens, output_tokens, hold.price)
    return input_tokens + output_tokens, cost


async def settle(hold: BudgetHold | None, *, input_tokens: int, output_tokens: int, status: str) -> None:
    if hold is None:
        return
    tokens, cost = settle_figures(hold, input_tokens=input_tokens, output_tokens=output_tokens, status=status)
    await hold.service.settle(hold.reservation, tokens=tokens, microcents=cost)


def recorded(hold: BudgetHold | None):
    """The request's ledger record is in the database (not only in the spool): its entry in the pending set goes.
    Batched with the other requests recorded meanwhile, not awaited (returns the batch's future, or None)."""
    if hold is None:
        return None
    try:
        return hold.service.recorded(hold.reservation)
    except Exception:  # the entry then stays for the month: it counts nothing twice
        return None
