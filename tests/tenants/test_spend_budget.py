"""The tenant's monthly money budget: set by its admins within the ceiling staff set."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from tenants import services
from tenants.models import AuditEvent, SpendBudget
from tenants.services import Actor


def test_a_budget_above_the_staff_ceiling_is_refused(world):
    staff = Actor(user=world.owner)
    services.policy_update(tenant=world.tenant, actor=staff, budget_ceiling_cents=10_000)
    with pytest.raises(ValidationError) as refused:
        services.spend_budget_set(tenant=world.tenant, monthly_cents=10_001, mode="hard", actor=Actor(user=world.admin))
    assert "100.00" in refused.value.message_dict["monthly_cents"][0]
    services.spend_budget_set(tenant=world.tenant, monthly_cents=10_000, mode="hard", actor=Actor(user=world.admin))
    budget = SpendBudget.objects.for_tenant(world.tenant).get()
    assert (budget.monthly_cents, budget.mode) == (10_000, "hard")
    assert AuditEvent.objects.for_tenant(world.tenant).get(action="budget.updated").data["mode"] == {"from": "soft", "to": "hard"}


@pytest.mark.parametrize("cents, mode", [(-1, "soft"), (True, "soft"), (100, "sometimes")])
def test_a_budget_must_be_whole_cents_and_a_known_mode(world, cents, mode):
    with pytest.raises(ValidationError):
        services.spend_budget_set(tenant=world.tenant, monthly_cents=cents, mode=mode, actor=Actor(user=world.admin))
