"""The management API: happy paths, API-key auth, validation, staff-only policy writes.

Isolation (outsiders, foreign keys, viewers writing) is covered for every route by tests/test_isolation.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from tenants import services
from tenants.api_base import TenantAPIView
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, PlatformSettings, Policy, SystemPromptVersion
from tenants.services import Actor
from tests.support.management_api import as_key, as_user, make_key, url
from tests.support.users import make_user

ALL_SCOPES = [s.value for s in ApiKey.Scope]


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def membership_of(world, user) -> Membership:
    return Membership.objects.for_tenant(world.tenant).get(user=user)


# ---- authentication ------------------------------------------------------------------------------


def test_anonymous_gets_401(world):
    response = APIClient().get(url(world, "members/"))
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"


def test_session_writes_need_csrf_token(world):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(world.admin)
    response = client.post(url(world, "prompts/"), {"text": "Be brief."}, format="json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not SystemPromptVersion.objects.for_tenant(world.tenant).exists()


def test_key_with_read_scope_reads_but_cannot_write(world):
    _, secret = make_key(world.tenant, scopes=["management:read"])
    client = as_key(secret)
    assert client.get(url(world, "members/")).status_code == 200
    response = client.post(url(world, "prompts/"), {"text": "x"}, format="json")
    assert response.status_code == 403
    assert "management:write" in response.json()["detail"]


def test_key_write_scope_implies_read(world):
    _, secret = make_key(world.tenant, scopes=["management:write"])
    client = as_key(secret)
    assert client.get(url(world, "keys/")).status_code == 200
    assert client.post(url(world, "prompts/"), {"text": "Hi", "note": "via key"}, format="json").status_code == 201
    event = AuditEvent.objects.for_tenant(world.tenant).filter(action="prompt.saved").get()
    assert event.actor_key is not None and event.actor is None


def test_key_without_management_scope_is_refused(world):
    _, secret = make_key(world.tenant, scopes=["inference"])
    assert as_key(secret).get(url(world, "members/")).status_code == 403
    assert as_key(secret).get("/api/tenants/").status_code == 403


def test_revoked_key_gets_401(world):
    key, secret = make_key(world.tenant)
    services.api_key_revoke(key=key, actor=services.SYSTEM)
    assert as_key(secret).get(url(world, "members/")).status_code == 401


def test_expired_key_gets_401(world):
    key, secret = make_key(world.tenant, expires_at=timezone.now() + timedelta(hours=1))
    ApiKey.objects.for_tenant(world.tenant).filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert as_key(secret).get(url(world, "members/")).status_code == 401


def test_malformed_authorization_header_gets_401(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer mtl_not_a_real_key")
    assert client.get(url(world, "members/")).status_code == 401


def test_key_of_another_tenant_gets_404(world):
    _, secret = make_key(world.other_tenant, scopes=ALL_SCOPES)
    assert as_key(secret).get(url(world, "members/")).status_code == 404


# ---- tenants -------------------------------------------------------------------------------------


def test_tenant_list_shows_the_callers_tenants_with_role(world):
    body = as_user(world.viewer).get("/api/tenants/").json()
    assert body["count"] == 1
    assert body["results"][0]["slug"] == "acme" and body["results"][0]["role"] == "viewer"
    assert [t["slug"] for t in as_user(world.outsider).get("/api/tenants/").json()["results"]] == ["globex"]


def test_tenant_list_for_a_key_is_its_own_tenant(world):
    _, secret = make_key(world.tenant, scopes=["management:read"])
    body = as_key(secret).get("/api/tenants/").json()
    assert [(t["slug"], t["role"]) for t in body["results"]] == [("acme", None)]


def test_tenant_detail_and_rename(world):
    assert as_user(world.viewer).get(url(world)).json()["name"] == "Acme"
    response = as_user(world.admin).patch(url(world), {"name": "Acme Corp"}, format="json")
    assert response.status_code == 200 and response.json()["name"] == "Acme Corp"
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme Corp"
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="tenant.renamed").exists()


@pytest.mark.parametrize("name", ["x" * 121, "", 42, None, ["Acme"]])
def test_tenant_rename_rejects_bad_names(world, name):
    response = as_user(world.admin).patch(url(world), {"name": name}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"


def test_bad_json_is_400_with_a_clear_message(world):
    response = as_user(world.admin).generic("PATCH", url(world), '{"name": ', content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_json_that_is_not_an_object_is_400(world):
    response = as_user(world.admin).post(url(world, "keys/"), ["ci"], format="json")
    assert response.status_code == 400
    assert "non_field_errors" in response.json()


# ---- members -------------------------------------------------------------------------------------


def test_members_list(world):
    body = as_user(world.viewer).get(url(world, "members/")).json()
    assert {(m["email"], m["role"]) for m in body["results"]} == {
        ("owner@acme.test", "owner"),
        ("admin@acme.test", "admin"),
        ("developer@acme.test", "developer"),
        ("viewer@acme.test", "viewer"),
    }


def test_admin_changes_a_role(world):
    member = membership_of(world, world.developer)
    response = as_user(world.admin).patch(url(world, f"members/{member.pk}/"), {"role": "viewer"}, format="json")
    assert response.status_code == 200 and response.json()["role"] == "viewer"
    member.refresh_from_db()
    assert member.role == "viewer"
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="member.role_changed").exists()


def test_only_owners_grant_ownership(world):
    member = membership_of(world, world.developer)
    assert as_user(world.admin).patch(url(world, f"members/{member.pk}/"), {"role": "owner"}, format="json").status_code == 403
    assert as_user(world.owner).patch(url(world, f"members/{member.pk}/"), {"role": "owner"}, format="json").status_code == 200


def test_admin_cannot_demote_an_owner(world):
    owner = membership_of(world, world.owner)
    assert as_user(world.admin).patch(url(world, f"members/{owner.pk}/"), {"role": "viewer"}, format="json").status_code == 403
    assert as_user(world.admin).delete(url(world, f"members/{owner.pk}/")).status_code == 403


@pytest.mark.parametrize("role", ["superuser", "", 3])
def test_unknown_role_is_400(world, role):
    member = membership_of(world, world.developer)
    response = as_user(world.admin).patch(url(world, f"members/{member.pk}/"), {"role": role}, format="json")
    assert response.status_code == 400 and "role" in response.json()
    member.refresh_from_db()
    assert member.role == "developer"


def test_demoting_the_last_owner_is_400(world):
    owner = membership_of(world, world.owner)
    response = as_user(world.owner).patch(url(world, f"members/{owner.pk}/"), {"role": "admin"}, format="json")
    assert response.status_code == 400 and "role" in response.json()


def test_admin_removes_a_member(world):
    member = membership_of(world, world.developer)
    assert as_user(world.admin).delete(url(world, f"members/{member.pk}/")).status_code == 204
    assert not Membership.objects.for_tenant(world.tenant).filter(pk=member.pk).exists()
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="member.removed").exists()


def test_a_viewer_can_leave(world):
    member = membership_of(world, world.viewer)
    assert as_user(world.viewer).delete(url(world, f"members/{member.pk}/")).status_code == 204
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="member.left").exists()


def test_the_last_owner_cannot_leave(world):
    owner = membership_of(world, world.owner)
    response = as_user(world.owner).delete(url(world, f"members/{owner.pk}/"))
    assert response.status_code == 400
    assert "last owner" in response.json()["membership"][0]
    assert Membership.objects.for_tenant(world.tenant).filter(pk=owner.pk).exists()


# ---- invitations ---------------------------------------------------------------------------------


def test_invite_accept_flow(world, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = as_user(world.admin).post(url(world, "invitations/"), {"email": "New@Example.test", "role": "developer"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert body["email"] == "new@example.test" and body["state"] == "pending"
    assert "token" not in body and "token_hash" not in body
    assert body["accept_url"] in mail.outbox[0].body
    token = body["accept_url"].rstrip("/").rsplit("/", 1)[-1]

    newcomer = make_user("new@example.test")
    accepted = as_user(newcomer).post("/api/invitations/accept/", {"token": token}, format="json")
    assert accepted.status_code == 201
    assert accepted.json()["tenant"] == "acme" and accepted.json()["role"] == "developer"
    assert membership_of(world, newcomer).role == "developer"
    listed = as_user(world.admin).get(url(world, "invitations/")).json()["results"]
    assert listed[0]["state"] == "accepted"


def test_a_write_key_invites_as_in_the_docs(world, django_capture_on_commit_callbacks):
    """docs/api.md invites with a management:write key; a key has no user to record as the inviter."""
    _, secret = make_key(world.tenant)
    with django_capture_on_commit_callbacks(execute=True):
        response = as_key(secret).post(url(world, "invitations/"), {"email": "dev@example.test", "role": "developer"}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["invited_by"] is None and response.json()["accept_url"] in mail.outbox[0].body
    assert Invitation.objects.for_tenant(world.tenant).get().invited_by is None


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"email": "not-an-email", "role": "viewer"}, "email"),
        ({"email": "a@b.test", "role": "emperor"}, "role"),
        ({"email": "viewer@acme.test", "role": "viewer"}, "email"),  # already a member
        ({"role": "viewer"}, "email"),
    ],
)
def test_bad_invitations_are_400_and_not_saved(world, payload, field):
    response = as_user(world.admin).post(url(world, "invitations/"), payload, format="json")
    assert response.status_code == 400 and field in response.json()
    assert not Invitation.objects.for_tenant(world.tenant).exists()


def test_only_owners_invite_owners(world):
    payload = {"email": "boss@example.test", "role": "owner"}
    assert as_user(world.admin).post(url(world, "invitations/"), payload, format="json").status_code == 403
    assert as_user(world.owner).post(url(world, "invitations/"), payload, format="json").status_code == 201


def test_expired_invitation_is_refused(world):
    invitation, token = services.invitation_create(tenant=world.tenant, email="late@example.test", role="viewer", actor=Actor(user=world.admin))
    Invitation.objects.for_tenant(world.tenant).filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    response = as_user(make_user("late@example.test")).post("/api/invitations/accept/", {"token": token}, format="json")
    assert response.status_code == 400
    assert "expired" in response.json()["token"][0]
    assert Membership.objects.for_tenant(world.tenant).count() == 4


def test_unknown_invitation_token_is_400(world):
    response = as_user(world.outsider).post("/api/invitations/accept/", {"token": "nope"}, format="json")
    assert response.status_code == 400 and "token" in response.json()


def test_accepting_with_an_api_key_is_refused(world):
    _, secret = make_key(world.tenant, scopes=ALL_SCOPES)
    assert as_key(secret).post("/api/invitations/accept/", {"token": "x"}, format="json").status_code == 403


def test_revoke_invitation(world):
    invitation, _ = services.invitation_create(tenant=world.tenant, email="x@example.test", role="viewer", actor=Actor(user=world.admin))
    client = as_user(world.admin)
    assert client.delete(url(world, f"invitations/{invitation.pk}/")).status_code == 204
    assert client.get(url(world, f"invitations/{invitation.pk}/")).json()["state"] == "revoked"
    again = client.delete(url(world, f"invitations/{invitation.pk}/"))
    assert again.status_code == 400 and "invitation" in again.json()


# ---- API keys ------------------------------------------------------------------------------------


def test_create_key_shows_the_secret_once(world):
    client = as_user(world.admin)
    response = client.post(url(world, "keys/"), {"name": "ci", "scopes": ["inference", "management:read"]}, format="json")
    assert response.status_code == 201
    body = response.json()
    secret = body["secret"]
    assert secret.startswith(body["prefix"] + "_") and body["state"] == "active"
    listed = client.get(url(world, "keys/"))
    assert secret not in listed.content.decode() and "secret" not in listed.json()["results"][0]
    detail = client.get(url(world, f"keys/{body['id']}/"))
    assert secret not in detail.content.decode()
    assert as_key(secret).get(url(world, "members/")).status_code == 200


def test_create_key_with_expiry(world):
    expires = (timezone.now() + timedelta(days=30)).isoformat()
    response = as_user(world.admin).post(url(world, "keys/"), {"name": "temp", "scopes": ["inference"], "expires_at": expires}, format="json")
    assert response.status_code == 201 and response.json()["expires_at"] is not None


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"name": "x" * 101, "scopes": ["inference"]}, "name"),
        ({"name": 7, "scopes": ["inference"]}, "name"),
        ({"name": "ci", "scopes": ["inference", "root"]}, "scopes"),
        ({"name": "ci", "scopes": []}, "scopes"),
        ({"name": "ci", "scopes": "inference"}, "scopes"),
        ({"name": "ci", "scopes": ["inference"], "expires_at": "yesterday"}, "expires_at"),
        ({"name": "ci", "scopes": ["inference"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_bad_key_requests_are_400_and_not_saved(world, payload, field):
    response = as_user(world.admin).post(url(world, "keys/"), payload, format="json")
    assert response.status_code == 400 and field in response.json(), response.json()
    assert not ApiKey.objects.for_tenant(world.tenant).exists()


def test_revoke_key_by_post_and_by_delete(world):
    client = as_user(world.admin)
    first, first_secret = make_key(world.tenant)
    second, _ = make_key(world.tenant)
    response = client.post(url(world, f"keys/{first.pk}/revoke/"))
    assert response.status_code == 200 and response.json()["state"] == "revoked"
    assert client.delete(url(world, f"keys/{second.pk}/")).json()["state"] == "revoked"
    assert as_key(first_secret).get(url(world, "members/")).status_code == 401
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="api_key.revoked").count() == 2


def test_no_tenants_table_holds_a_key_secret(world):
    response = as_user(world.admin).post(url(world, "keys/"), {"name": "ci", "scopes": ALL_SCOPES}, format="json")
    secret = response.json()["secret"]
    # mtl_<hex prefix>_<token_urlsafe>: the token itself may contain "_", so split after the prefix only.
    random_part = secret.split("_", 2)[2]
    assert len(random_part) >= 40
    tables = [t for t in connection.introspection.table_names() if t.startswith("tenants_")]
    assert "tenants_apikey" in tables and "tenants_auditevent" in tables
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}"')  # noqa: S608 (names come from introspection)
            for row in cursor.fetchall():
                for value in row:
                    assert random_part not in str(value), f"{table} stores the key secret"


# ---- prompts -------------------------------------------------------------------------------------


def test_prompt_versions_activate_and_diff(world):
    client = as_user(world.admin)
    first = client.post(url(world, "prompts/"), {"text": "Be brief.\nBe kind.", "note": "first"}, format="json")
    assert first.status_code == 201 and first.json()["version"] == 1 and first.json()["is_active"]
    second = client.post(url(world, "prompts/"), {"text": "Be brief.\nBe precise."}, format="json")
    assert second.json()["version"] == 2

    listed = as_user(world.viewer).get(url(world, "prompts/")).json()["results"]
    assert [(p["version"], p["is_active"]) for p in listed] == [(2, True), (1, False)]
    assert as_user(world.viewer).get(url(world, "prompts/1/")).json()["text"] == "Be brief.\nBe kind."

    activated = client.post(url(world, "prompts/1/activate/"))
    assert activated.status_code == 200 and activated.json()["is_active"]
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1

    diff = client.get(url(world, "prompts/2/diff/"), {"against": 1}).json()
    assert diff["lines"] == [
        {"kind": " ", "line": "Be brief."},
        {"kind": "-", "line": "Be kind."},
        {"kind": "+", "line": "Be precise."},
    ]
    assert client.get(url(world, "prompts/2/diff/")).json()["against"] == 1  # default: the previous version
    assert client.get(url(world, "prompts/2/diff/"), {"against": 9}).status_code == 400
    assert client.get(url(world, "prompts/2/diff/"), {"against": "x"}).status_code == 400
    assert client.get(url(world, "prompts/9/")).status_code == 404


def test_prompt_saved_as_a_draft_is_not_active(world):
    client = as_user(world.admin)
    live = client.post(url(world, "prompts/"), {"text": "Be brief."}, format="json")
    assert live.json()["is_active"]  # without `draft`: active at once, as before
    draft = client.post(url(world, "prompts/"), {"text": "Be kind.", "draft": True}, format="json")
    assert draft.status_code == 201 and draft.json()["version"] == 2 and draft.json()["is_active"] is False
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1
    assert client.post(url(world, "prompts/2/activate/")).json()["is_active"]
    assert client.post(url(world, "prompts/"), {"text": "x", "draft": "maybe"}, format="json").status_code == 400


def test_prompt_over_the_limit_is_400(world, settings):
    settings.PLATFORM_MAX_PROMPT_CHARS = 100
    response = as_user(world.admin).post(url(world, "prompts/"), {"text": "x" * 101}, format="json")
    assert response.status_code == 400 and "limit is 100" in response.json()["text"][0]
    response = as_user(world.admin).post(url(world, "prompts/"), {"text": "ok", "note": "n" * 201}, format="json")
    assert response.status_code == 400 and "note" in response.json()
    assert not SystemPromptVersion.objects.for_tenant(world.tenant).exists()


def test_viewer_cannot_save_a_prompt(world):
    assert as_user(world.viewer).post(url(world, "prompts/"), {"text": "x"}, format="json").status_code == 403


# ---- policy --------------------------------------------------------------------------------------


@pytest.fixture
def staff(db):
    user = make_user("ops@platform.test")
    user.is_staff = True
    user.save(update_fields=["is_staff"])
    return user


def test_members_and_keys_read_the_policy(world):
    body = as_user(world.viewer).get(url(world, "policy/")).json()
    assert body["weight"] == 1 and body["effective_quota_tokens"] == 0
    _, secret = make_key(world.tenant, scopes=["management:read"])
    assert as_key(secret).get(url(world, "policy/")).status_code == 200


def test_staff_changes_any_tenants_policy(world, staff):
    client = as_user(staff)  # not a member of acme
    assert client.get(url(world, "policy/")).status_code == 200
    response = client.patch(url(world, "policy/"), {"quota_tokens": 5000, "quota_mode": "hard"}, format="json")
    assert response.status_code == 200
    assert response.json()["quota_tokens"] == 5000 and response.json()["effective_quota_tokens"] == 5000
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="policy.updated")
    assert event.actor_is_staff and event.data["quota_tokens"] == {"from": 0, "to": 5000}


def test_staff_put_needs_every_field(world, staff):
    response = as_user(staff).put(url(world, "policy/"), {"weight": 2}, format="json")
    assert response.status_code == 400 and "quota_tokens" in response.json()
    full = {
        "weight": 2, "fair_share": False, "quota_tokens": 10, "quota_window": "day", "quota_mode": "soft",
        "requests_per_minute": 60, "tokens_per_minute": 0, "max_concurrent_requests": 4,
    }  # fmt: skip
    assert as_user(staff).put(url(world, "policy/"), full, format="json").json()["quota_window"] == "day"


@pytest.mark.parametrize("payload", [{"weight": 0}, {"weight": 1001}, {"quota_tokens": -1}, {"quota_window": "year"}, {"weight": "heavy"}])
def test_bad_policy_is_400_and_not_saved(world, staff, payload):
    response = as_user(staff).patch(url(world, "policy/"), {**payload, "quota_tokens": payload.get("quota_tokens", 7)}, format="json")
    assert response.status_code == 400
    assert Policy.objects.for_tenant(world.tenant).get().quota_tokens == 0


def test_non_staff_cannot_change_the_policy(world):
    for user in (world.owner, world.admin, world.viewer):
        assert as_user(user).patch(url(world, "policy/"), {"weight": 5}, format="json").status_code == 403
    _, secret = make_key(world.tenant, scopes=ALL_SCOPES)
    assert as_key(secret).patch(url(world, "policy/"), {"weight": 5}, format="json").status_code == 403
    assert as_user(world.outsider).patch(url(world, "policy/"), {"weight": 5}, format="json").status_code == 404
    assert Policy.objects.for_tenant(world.tenant).get().weight == 1


def test_fair_share_quota_follows_weights(world, staff):
    """Q = R_total · w / Σ w over active fair-share tenants, recomputed after a weight change."""
    platform = PlatformSettings.load()
    platform.fair_share_total_tokens = 1_000_000
    platform.save()
    client = as_user(staff)
    client.patch(url(world, "policy/"), {"fair_share": True, "weight": 1}, format="json")
    client.patch("/api/tenants/globex/policy/", {"fair_share": True, "weight": 3}, format="json")
    assert as_user(world.viewer).get(url(world, "policy/")).json()["effective_quota_tokens"] == 250_000  # 1e6 · 1/4

    response = client.patch(url(world, "policy/"), {"weight": 2}, format="json")
    assert response.json()["effective_quota_tokens"] == 400_000  # 1e6 · 2/5
    assert as_user(world.outsider).get("/api/tenants/globex/policy/").json()["effective_quota_tokens"] == 600_000  # 1e6 · 3/5


# ---- audit ---------------------------------------------------------------------------------------


def test_audit_log_newest_first_with_action_filter(world):
    client = as_user(world.admin)
    client.post(url(world, "keys/"), {"name": "ci", "scopes": ["inference"]}, format="json")
    client.post(url(world, "prompts/"), {"text": "Hello"}, format="json")
    events = client.get(url(world, "audit/")).json()["results"]
    assert [e["action"] for e in events[:3]] == ["prompt.saved", "api_key.created", "tenant.created"]
    assert events[0]["actor"] == "admin@acme.test"
    filtered = client.get(url(world, "audit/"), {"action": "api_key."}).json()
    assert [e["action"] for e in filtered["results"]] == ["api_key.created"] and filtered["count"] == 1


def test_audit_log_is_for_admins_and_read_keys(world):
    assert as_user(world.developer).get(url(world, "audit/")).status_code == 403
    _, secret = make_key(world.tenant, scopes=["management:read"])
    assert as_key(secret).get(url(world, "audit/")).status_code == 200


def test_lists_are_paginated(world):
    body = as_user(world.viewer).get(url(world, "members/"), {"limit": 2}).json()
    assert body["count"] == 4 and len(body["results"]) == 2 and body["next"]


# ---- schema, docs, the base class ----------------------------------------------------------------


def test_schema_and_offline_docs_page(db):
    client = APIClient()
    schema = client.get("/api/schema/", {"format": "json"})
    assert schema.status_code == 200
    assert "/api/tenants/{tenant_slug}/keys/" in schema.json()["paths"]
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "keys_create" in html and "/api/tenants/{tenant_slug}/policy/" in html
    assert "cdn" not in html.lower() and "<script" not in html


def test_schema_does_not_describe_endpoints_with_our_base_views_notes(db):
    """Endpoints without a docstring of their own used to inherit TenantAPIView's / OpenAIView's notes for developers."""
    paths = APIClient().get("/api/schema/", {"format": "json"}).json()["paths"]
    descriptions = [op.get("description", "") for ops in paths.values() for op in ops.values()]
    assert not [d for d in descriptions if d.startswith("Base of")]
    assert "Accept an invitation" in paths["/api/invitations/accept/"]["post"]["description"]  # a view's own docstring still is


@pytest.mark.parametrize("method", ["dispatch", "initial", "resolve_context", "scoped", "get_scoped_or_404", "require_role"])
def test_subclasses_cannot_bypass_tenant_resolution(method):
    with pytest.raises(TypeError, match="may not override"):
        type("Sneaky", (TenantAPIView,), {method: lambda self, *a, **k: None})


# ---- pagination bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["members/", "audit/"])
def test_huge_limit_is_capped_and_bad_paging_is_a_400_naming_the_parameter(world, suffix):
    client = as_user(world.admin)
    body = client.get(url(world, suffix), {"limit": 10**20}).json()  # overflowed the database's integer: a 500
    assert "results" in body and len(body["results"]) <= 500
    assert client.get(url(world, suffix), {"limit": 10**20}).status_code == 200
    for params, name in [({"offset": 10**20}, "offset"), ({"offset": -1}, "offset"), ({"limit": 0}, "limit"), ({"limit": "x"}, "limit")]:
        response = client.get(url(world, suffix), params)
        assert response.status_code == 400 and name in response.json(), (params, response.content)
