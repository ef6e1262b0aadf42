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


def test_staff_set_the_ceiling_in_the_admin_and_a_rotated_keys_old_hash_is_not_shown(client, world, django_user_model):
    from datetime import timedelta

    from tenants.models import Policy
    from tests.support.admin import change_form

    staff = django_user_model.objects.create_superuser("staff@platform.test", "staff@platform.test", "pw-staff-123456")
    client.force_login(staff)
    policy = Policy.objects.for_tenant(world.tenant).get()
    url = f"/admin/tenants/policy/{policy.pk}/change/"
    form = change_form(client, url)
    form["budget_ceiling_cents"] = "250000"
    assert client.post(url, form).status_code == 302
    assert Policy.objects.for_tenant(world.tenant).get().budget_ceiling_cents == 250_000
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="policy.updated")
    assert event.actor_is_staff and event.data["budget_ceiling_cents"] == {"from": 0, "to": 250_000}

    key, _ = services.api_key_create(tenant=world.tenant, name="k", scopes=["inference"], actor=Actor(user=world.owner))
    key, _ = services.api_key_rotate(key=key, grace=timedelta(hours=1), actor=Actor(user=world.owner))
    page = client.get(f"/admin/tenants/apikey/{key.pk}/change/").content.decode()
    assert key.previous_secret_hash not in page and key.secret_hash not in page
