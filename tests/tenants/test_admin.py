"""Staff changes in the Django admin go through the product's services: same rules, same audit events."""

from __future__ import annotations

import pytest

from finetune.models import FineTuneJob
from tenants.models import AuditEvent, Membership, Policy, Role, Tenant
from tests.support.admin import change_form


@pytest.fixture
def staff_client(client, world, django_user_model):
    staff = django_user_model.objects.create_superuser("staff@platform.test", "staff@platform.test", "pw-staff-123456")
    client.force_login(staff)
    return client


def _member_row(form: dict, user) -> str:
    """The inline prefix (e.g. 'membership_set-0') of a user's membership row."""
    membership = Membership.objects.for_tenant(Tenant.objects.get(slug="acme")).get(user=user)
    return next(k[: -len("-id")] for k, v in form.items() if k.endswith("-id") and v == str(membership.pk) and not k.startswith("policy"))


def test_demoting_the_only_owner_is_refused(staff_client, world):
    url = f"/admin/tenants/tenant/{world.tenant.pk}/change/"
    form = change_form(staff_client, url)
    form[_member_row(form, world.owner) + "-role"] = Role.ADMIN
    response = staff_client.post(url, form)
    assert response.status_code == 200 and "must keep at least one owner" in response.content.decode()
    assert Membership.objects.for_tenant(world.tenant).get(user=world.owner).role == Role.OWNER


def test_handing_over_ownership_in_one_save_is_audited_as_staff(staff_client, world):
    url = f"/admin/tenants/tenant/{world.tenant.pk}/change/"
    form = change_form(staff_client, url)
    form[_member_row(form, world.owner) + "-role"] = Role.ADMIN
    form[_member_row(form, world.admin) + "-role"] = Role.OWNER
    assert staff_client.post(url, form).status_code == 302
    roles = dict(Membership.objects.for_tenant(world.tenant).values_list("user__email", "role"))
    assert roles["owner@acme.test"] == Role.ADMIN and roles["admin@acme.test"] == Role.OWNER
    events = AuditEvent.objects.for_tenant(world.tenant).filter(action="member.role_changed")
    assert events.count() == 2 and all(e.actor_is_staff for e in events)


def test_suspending_needs_a_reason_and_is_audited(staff_client, world):
    url = f"/admin/tenants/tenant/{world.tenant.pk}/change/"
    form = change_form(staff_client, url)
    form["status"] = Tenant.Status.SUSPENDED
    response = staff_client.post(url, form)
    assert response.status_code == 200 and "Say why" in response.content.decode()
    assert Tenant.objects.get(pk=world.tenant.pk).status == Tenant.Status.ACTIVE
    form["suspended_reason"] = "Unpaid invoice ACME-202611"
    assert staff_client.post(url, form).status_code == 302
    tenant = Tenant.objects.get(pk=world.tenant.pk)
    assert (tenant.status, tenant.suspended_reason) == (Tenant.Status.SUSPENDED, "Unpaid invoice ACME-202611")
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="tenant.suspended")
    assert event.actor_is_staff and event.data["reason"] == "Unpaid invoice ACME-202611"


def test_the_slug_is_not_editable(staff_client, world):
    url = f"/admin/tenants/tenant/{world.tenant.pk}/change/"
    form = change_form(staff_client, url)
    assert "slug" not in form
    form["slug"] = "renamed"
    assert staff_client.post(url, form).status_code == 302
    assert Tenant.objects.get(pk=world.tenant.pk).slug == "acme"


@pytest.mark.parametrize("where", ["inline", "policy page"])
def test_quota_edits_record_policy_updated(staff_client, world, where):
    policy = Policy.objects.for_tenant(world.tenant).get()
    if where == "inline":
        url = f"/admin/tenants/tenant/{world.tenant.pk}/change/"
        form = change_form(staff_client, url)
        key = next(k for k in form if k.endswith("-quota_tokens") and "policy" in k)
    else:
        url = f"/admin/tenants/policy/{policy.pk}/change/"
        form = change_form(staff_client, url)
        key = "quota_tokens"
    form[key] = "5000000"
    assert staff_client.post(url, form).status_code == 302
    assert Policy.objects.for_tenant(world.tenant).get().quota_tokens == 5_000_000
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="policy.updated")
    assert event.actor_is_staff and event.data["quota_tokens"]["to"] == 5_000_000


def test_fine_tune_jobs_are_read_only_for_staff(staff_client, world):
    from django.contrib import admin

    job_admin = admin.site._registry[FineTuneJob]
    editable = [f.name for f in FineTuneJob._meta.fields if f.editable and f.name not in job_admin.get_readonly_fields(None, None)]
    assert editable == []
    assert not job_admin.has_add_permission(None)
