"""What one e-mail address can do to the platform: sign-ups, tenants, invitations, and the plan new tenants start on."""

from __future__ import annotations

import pytest
from django.core import mail
from django.urls import reverse

from tenants import services
from tenants.models import Invitation, Membership, PlatformSettings, Policy, Tenant
from tests.support.users import PASSWORD, make_user


def _signup(client, n: int, **extra):
    return client.post(reverse("signup"), {"email": f"user{n}@example.test", "name": f"Team {n}", "slug": "",
                                           "password1": PASSWORD, "password2": PASSWORD}, **extra)


def test_a_self_service_tenant_starts_on_the_staff_defined_plan(client, db):
    plan = PlatformSettings.load()
    plan.new_tenant_quota_tokens, plan.new_tenant_requests_per_minute = 250_000, 30
    plan.save()
    assert _signup(client, 1).status_code == 302
    policy = Policy.objects.for_tenant(Tenant.objects.get(slug="team-1")).get()
    assert (policy.quota_tokens, policy.quota_mode, policy.requests_per_minute, policy.max_concurrent_requests) == (250_000, "hard", 30, 4)
    response = client.post(reverse("tenant-create"), {"name": "Second", "slug": "second"})
    assert response.status_code == 302
    assert Policy.objects.for_tenant(Tenant.objects.get(slug="second")).get().quota_tokens == 250_000


def test_tenants_made_by_staff_tools_stay_unlimited(db):
    tenant = services.tenant_create(slug="big", name="Big", owner=make_user("big@example.test"))
    assert Policy.objects.for_tenant(tenant).get().quota_tokens == 0


def test_one_account_may_create_a_bounded_number_of_tenants(client, db, settings):
    settings.PLATFORM_MAX_TENANTS_PER_USER = 2
    assert _signup(client, 1).status_code == 302
    assert client.post(reverse("tenant-create"), {"name": "Two", "slug": "two"}).status_code == 302
    response = client.post(reverse("tenant-create"), {"name": "Three", "slug": "three"})
    assert response.status_code == 400 and "the most one account may create" in response.content.decode()
    assert not Tenant.objects.filter(slug="three").exists()


def test_sign_ups_from_one_address_are_limited(client, db, settings):
    settings.PLATFORM_SIGNUPS_PER_IP = 3
    for n in range(3):
        assert _signup(client, n, REMOTE_ADDR="198.51.100.7").status_code == 302
        client.logout()
    response = _signup(client, 9, REMOTE_ADDR="198.51.100.7")
    assert response.status_code == 400 and "Too many accounts were created from your network" in response.content.decode()
    assert not Tenant.objects.filter(slug="team-9").exists()
    assert _signup(client, 10, REMOTE_ADDR="198.51.100.8").status_code == 302  # another address is unaffected


def test_invitations_per_tenant_are_limited_per_hour(world, settings):
    settings.PLATFORM_INVITATIONS_PER_HOUR = 5
    actor = services.Actor(user=world.owner)
    for n in range(5):
        services.invitation_create(tenant=world.tenant, email=f"p{n}@example.test", role="viewer", actor=actor)
    with pytest.raises(services.ValidationError) as refused:
        services.invitation_create(tenant=world.tenant, email="p6@example.test", role="viewer", actor=actor)
    assert "5 invitations in the last hour" in str(refused.value)
    assert Invitation.objects.for_tenant(world.tenant).count() == 5
    services.invitation_create(tenant=world.other_tenant, email="q@example.test", role="viewer", actor=services.Actor(user=world.outsider))


def test_the_tenant_name_is_never_the_subject_of_an_invitation(world, django_capture_on_commit_callbacks):
    services.tenant_rename(tenant=world.tenant, name="Your account is locked - verify at evil.example", actor=services.SYSTEM)
    with django_capture_on_commit_callbacks(execute=True):
        services.invitation_create(tenant=world.tenant, email="p@example.test", role="viewer", actor=services.Actor(user=world.owner))
    [message] = mail.outbox
    assert "locked" not in message.subject and "evil" not in message.subject
    assert "owner@acme.test invited you" in message.body and "“Your account is locked - verify at evil.example”" in message.body
    assert Membership.objects.for_tenant(world.tenant).count() == 4
