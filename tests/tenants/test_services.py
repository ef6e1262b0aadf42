"""Tenant services: owners, invitations, API keys, prompts, policies, audit."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, PlatformSettings, Policy, Role, SystemPromptVersion
from tenants.selectors import effective_quota_tokens
from tests.support.users import make_user


def actions(tenant) -> list[str]:
    return list(AuditEvent.objects.for_tenant(tenant).order_by("id").values_list("action", flat=True))


def test_last_owner_can_neither_leave_nor_be_demoted(world):
    owner = Membership.objects.for_tenant(world.tenant).get(user=world.owner)
    with pytest.raises(ValidationError, match="at least one owner"):
        services.membership_change_role(membership=owner, role=Role.ADMIN, actor=services.Actor(user=world.owner))
    with pytest.raises(ValidationError, match="last owner"):
        services.membership_remove(membership=owner, actor=services.Actor(user=world.owner))
    owner.refresh_from_db()
    assert owner.role == Role.OWNER


def test_an_owner_can_leave_once_another_owner_exists(world):
    admin = Membership.objects.for_tenant(world.tenant).get(user=world.admin)
    services.membership_change_role(membership=admin, role=Role.OWNER, actor=services.Actor(user=world.owner))
    owner = Membership.objects.for_tenant(world.tenant).get(user=world.owner)
    services.membership_remove(membership=owner, actor=services.Actor(user=world.owner))
    assert not Membership.objects.for_tenant(world.tenant).filter(user=world.owner).exists()
    assert actions(world.tenant)[-2:] == ["member.role_changed", "member.left"]


def test_invitation_accept_creates_membership_once(world, mailoutbox):
    invitation, token = services.invitation_create(tenant=world.tenant, email="New@Example.test", role=Role.DEVELOPER, actor=services.Actor(user=world.admin))
    assert invitation.email == "new@example.test"
    assert Invitation.all_tenants.filter(token_hash=token).count() == 0  # only the hash is stored
    user = make_user("new@example.test")
    membership = services.invitation_accept(token=token, user=user)
    assert membership.role == Role.DEVELOPER and membership.tenant_id == world.tenant.pk
    with pytest.raises(ValidationError, match="accepted"):
        services.invitation_accept(token=token, user=user)


def test_expired_invitation_is_refused_and_nothing_is_saved(world):
    invitation, token = services.invitation_create(tenant=world.tenant, email="late@example.test", role=Role.VIEWER, actor=services.Actor(user=world.admin))
    Invitation.objects.for_tenant(world.tenant).filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    user = make_user("late@example.test")
    with pytest.raises(ValidationError, match="expired"):
        services.invitation_accept(token=token, user=user)
    assert not Membership.objects.for_tenant(world.tenant).filter(user=user).exists()


def test_invitation_rejects_unknown_role_and_existing_member(world):
    with pytest.raises(ValidationError) as err:
        services.invitation_create(tenant=world.tenant, email="x@example.test", role="superuser", actor=services.Actor(user=world.admin))
    assert "role" in err.value.message_dict
    with pytest.raises(ValidationError) as err:
        services.invitation_create(tenant=world.tenant, email="viewer@acme.test", role=Role.VIEWER, actor=services.Actor(user=world.admin))
    assert "already a member" in err.value.message_dict["email"][0]


def test_api_key_secret_is_never_stored(world):
    key, secret = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=services.Actor(user=world.admin))
    table = ApiKey._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table}")
        rows = cursor.fetchall()
    secret_part = secret.split("_", 2)[2]
    assert all(secret not in str(v) and secret_part not in str(v) for row in rows for v in row)
    assert services.api_key_authenticate(secret).pk == key.pk


def test_revoked_expired_and_malformed_keys_are_refused(world):
    key, secret = services.api_key_create(tenant=world.tenant, name="a", scopes=["inference"], actor=services.Actor(user=world.admin))
    services.api_key_revoke(key=key, actor=services.Actor(user=world.admin))
    assert services.api_key_authenticate(secret) is None
    key2, secret2 = services.api_key_create(tenant=world.tenant, name="b", scopes=["inference"], actor=services.Actor(user=world.admin), expires_at=timezone.now() + timedelta(seconds=30))
    ApiKey.objects.for_tenant(world.tenant).filter(pk=key2.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.api_key_authenticate(secret2) is None
    assert services.api_key_authenticate(secret2[:-1] + ("A" if secret2[-1] != "A" else "B")) is None
    assert services.api_key_authenticate("not-a-key") is None


def test_api_key_validation_is_field_level(world):
    with pytest.raises(ValidationError) as err:
        services.api_key_create(tenant=world.tenant, name="", scopes=["root"], actor=services.Actor(user=world.admin), expires_at=timezone.now() - timedelta(days=1))
    assert set(err.value.message_dict) == {"name", "scopes", "expires_at"}
    assert ApiKey.objects.for_tenant(world.tenant).count() == 0


def test_prompt_versions_and_rollback(world):
    actor = services.Actor(user=world.admin)
    v1 = services.system_prompt_save(tenant=world.tenant, text="Be brief.", note="first", actor=actor)
    v2 = services.system_prompt_save(tenant=world.tenant, text="Be brief.\nBe kind.", note="", actor=actor)
    assert (v1.version, v2.version) == (1, 2)
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt_id == v2.pk
    services.system_prompt_activate(tenant=world.tenant, version=v1, actor=actor)
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt_id == v1.pk
    assert SystemPromptVersion.objects.for_tenant(world.tenant).count() == 2
    other = services.system_prompt_save(tenant=world.other_tenant, text="x", note="", actor=services.Actor(user=world.outsider))
    with pytest.raises(ValidationError):
        services.system_prompt_activate(tenant=world.tenant, version=other, actor=actor)


def test_oversized_prompt_is_refused_and_nothing_saved(world, settings):
    settings.PLATFORM_MAX_PROMPT_CHARS = 100
    with pytest.raises(ValidationError) as err:
        services.system_prompt_save(tenant=world.tenant, text="x" * 101, note="", actor=services.Actor(user=world.admin))
    assert "limit is 100" in err.value.message_dict["text"][0]
    assert SystemPromptVersion.objects.for_tenant(world.tenant).count() == 0


def test_fair_share_quota_follows_weights(world):
    PlatformSettings.objects.update_or_create(pk=1, defaults={"fair_share_total_tokens": 1_000_000})
    staff = services.Actor(user=world.owner)
    services.policy_update(tenant=world.tenant, actor=staff, fair_share=True, weight=1)
    services.policy_update(tenant=world.other_tenant, actor=staff, fair_share=True, weight=3)
    acme = Policy.objects.for_tenant(world.tenant).get()
    assert effective_quota_tokens(acme) == 250_000  # Q = R_total · w / Σ w = 1e6 · 1 / 4
    services.policy_update(tenant=world.other_tenant, actor=staff, weight=1)
    assert effective_quota_tokens(acme) == 500_000


def test_policy_update_validates_every_field_before_saving(world):
    with pytest.raises(ValidationError) as err:
        services.policy_update(tenant=world.tenant, actor=services.Actor(user=world.owner), weight=0, quota_mode="maybe")
    assert {"weight", "quota_mode"} <= set(err.value.message_dict)
    assert Policy.objects.for_tenant(world.tenant).get().weight == 1


def test_a_refused_rename_leaves_the_tenant_as_it_was(world):
    with pytest.raises(ValidationError) as exc:
        services.tenant_rename(tenant=world.tenant, name="x" * 121, actor=services.Actor(user=world.owner))
    assert "name" in exc.value.message_dict
    assert world.tenant.name == "Acme"  # the caller's object, too (the console re-renders it)
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="tenant.renamed").exists()
