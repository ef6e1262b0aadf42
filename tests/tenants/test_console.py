"""The tenant console through Django's test client: pages, roles, isolation, and the write flows."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Role, SystemPromptVersion, Tenant
from tests.support.users import PASSWORD

User = get_user_model()

# Every tenant page that answers GET, with the kwargs it needs besides tenant_slug (filled by `objects`).
READABLE = ["console-dashboard", "console-members", "console-keys", "console-prompt", "console-limits", "console-settings"]


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # Runs before `world` (autouse first): the fixture hashes five passwords per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def objects(world):
    """One of each object, so every URL can be built."""
    owner = services.Actor(user=world.owner)
    key, _ = services.api_key_create(tenant=world.tenant, name="ci", scopes=["inference"], actor=owner)
    services.system_prompt_save(tenant=world.tenant, text="Be brief.", note="first", actor=owner)
    services.system_prompt_save(tenant=world.tenant, text="Be brief.\nBe kind.", note="second", actor=owner)
    invitation, _ = services.invitation_create(tenant=world.tenant, email="new@acme.test", role=Role.VIEWER, actor=owner)
    return {"key": key, "invitation": invitation}


def client_for(client, user):
    client.force_login(user)
    return client


def url(name, slug="acme", **kwargs):
    return reverse(name, kwargs={"tenant_slug": slug, **kwargs})


def all_tenant_urls(world, objects):
    membership = Membership.objects.for_tenant(world.tenant).get(user=world.viewer)
    return [
        url(n) for n in READABLE + ["console-audit", "console-key-create", "console-member-leave", "console-member-invite"]
    ] + [
        url("console-member-role", membership_id=membership.pk),
        url("console-member-remove", membership_id=membership.pk),
        url("console-invitation-revoke", invitation_id=objects["invitation"].pk),
        url("console-key-revoke", key_id=objects["key"].pk),
        url("console-prompt-version", version=1),
        url("console-prompt-activate", version=1),
        url("console-prompt-diff", version=1, other_version=2),
    ]


# ---- sign up, sign in ----------------------------------------------------------------------------


def test_signup_creates_user_tenant_and_owner_and_lands_on_dashboard(client, db):
    response = client.post(
        reverse("signup"),
        {"email": "Ada@Example.TEST", "name": "Analytical Engines", "slug": "", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 302
    assert response.url == url("console-dashboard", slug="analytical-engines")
    user = User.objects.get(username="ada@example.test")
    assert user.email == "ada@example.test"
    tenant = Tenant.objects.get(slug="analytical-engines")
    assert Membership.objects.for_tenant(tenant).get(user=user).role == Role.OWNER
    page = client.get(response.url)
    assert page.status_code == 200
    assert b"Analytical Engines" in page.content


def test_signup_with_taken_slug_keeps_nothing(client, world):
    response = client.post(reverse("signup"), {"email": "x@y.test", "name": "Acme 2", "slug": "acme", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 400
    assert "slug" in response.context["form"].errors
    assert not User.objects.filter(username="x@y.test").exists()


def test_signup_rejects_mismatched_and_weak_passwords(client, db):
    response = client.post(reverse("signup"), {"email": "x@y.test", "name": "X", "slug": "x", "password1": PASSWORD, "password2": "other-password-1"})
    assert "password2" in response.context["form"].errors
    response = client.post(reverse("signup"), {"email": "x@y.test", "name": "X", "slug": "x", "password1": "12345678901", "password2": "12345678901"})
    assert "password1" in response.context["form"].errors
    assert not User.objects.filter(username="x@y.test").exists()


def test_signup_with_empty_name_is_a_field_error(client, db):
    response = client.post(reverse("signup"), {"email": "x@y.test", "name": "  ", "slug": "", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 400
    assert "name" in response.context["form"].errors
    assert not Tenant.objects.exists()


def test_sign_in_by_email_is_case_insensitive_and_goes_home(client, world):
    response = client.post(reverse("login"), {"username": "Owner@ACME.test", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get(reverse("console-home")).url == url("console-dashboard")


def test_home_without_tenant_offers_to_create_one(client, db):
    user = User.objects.create_user(username="lone@x.test", email="lone@x.test", password=PASSWORD)
    client.force_login(user)
    response = client.get(reverse("console-home"), follow=True)
    assert b"Create your first tenant" in response.content
    response = client.post(reverse("tenant-create"), {"name": "Lone Co", "slug": "lone-co"})
    assert response.url == url("console-dashboard", slug="lone-co")


def test_password_reset_sends_a_working_link(client, world):
    client.post(reverse("password_reset"), {"email": "viewer@acme.test"})
    assert len(mail.outbox) == 1
    link = re.search(r"https?://\S+", mail.outbox[0].body).group(0)
    path = link.split("testserver", 1)[1]
    response = client.get(path, follow=True)
    assert b"Choose a new password" in response.content
    response = client.post(response.redirect_chain[-1][0], {"new_password1": "a-new-long-pass-77", "new_password2": "a-new-long-pass-77"})
    assert response.status_code == 302
    assert client.login(username="viewer@acme.test", password="a-new-long-pass-77")


# ---- roles and isolation -------------------------------------------------------------------------


@pytest.mark.parametrize("name", READABLE)
def test_viewer_can_read_each_page(client, world, objects, name):
    response = client_for(client, world.viewer).get(url(name))
    assert response.status_code == 200
    assert b'class="sidebar"' in response.content


def test_viewer_can_read_prompt_version_and_diff(client, world, objects):
    c = client_for(client, world.viewer)
    assert c.get(url("console-prompt-version", version=1)).status_code == 200
    assert c.get(url("console-prompt-diff", version=1, other_version=2)).status_code == 200


@pytest.mark.parametrize("role", ["viewer", "developer"])
def test_audit_log_is_admin_only(client, world, objects, role):
    assert client_for(client, world.user(role)).get(url("console-audit")).status_code == 403


def test_audit_log_lists_newest_first_and_filters_by_prefix(client, world, objects):
    c = client_for(client, world.admin)
    response = c.get(url("console-audit"))
    actions = [e.action for e in response.context["page"].object_list]
    assert actions[0] == "invitation.created"
    response = c.get(url("console-audit"), {"action": "prompt."})
    assert {e.action for e in response.context["page"].object_list} == {"prompt.saved"}


def test_audit_log_paginates_by_50(client, world):
    for i in range(60):
        services.audit_record(tenant=world.tenant, actor=services.SYSTEM, action=f"test.event{i}")
    c = client_for(client, world.admin)
    assert len(c.get(url("console-audit")).context["page"].object_list) == 50
    assert len(c.get(url("console-audit"), {"page": 2}).context["page"].object_list) == 61 - 50


def test_every_write_as_viewer_is_forbidden_and_changes_nothing(client, world, objects):
    c = client_for(client, world.viewer)
    before = AuditEvent.objects.for_tenant(world.tenant).count()
    for u in all_tenant_urls(world, objects):
        if u.endswith("/leave/"):
            continue  # anyone may leave
        assert c.post(u, {"name": "x", "scopes": ["inference"], "text": "hijack", "role": "owner", "email": "e@x.test"}).status_code == 403, u
    assert AuditEvent.objects.for_tenant(world.tenant).count() == before
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"


def test_outsider_gets_404_on_every_acme_page(client, world, objects):
    c = client_for(client, world.outsider)
    for u in all_tenant_urls(world, objects):
        assert c.get(u).status_code == 404, u
        assert c.post(u).status_code == 404, u


def test_another_tenants_object_ids_are_404(client, world, objects):
    """An acme admin addressing globex's key through acme's URL gets a 404."""
    globex_key, _ = services.api_key_create(tenant=world.other_tenant, name="g", scopes=["inference"], actor=services.Actor(user=world.outsider))
    c = client_for(client, world.admin)
    assert c.post(url("console-key-revoke", key_id=globex_key.pk)).status_code == 404
    globex_key.refresh_from_db()
    assert globex_key.revoked_at is None


def test_anonymous_is_sent_to_sign_in(client, world):
    response = client.get(url("console-dashboard"))
    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_tenant_switcher_lists_only_own_tenants(client, world):
    services.Membership.all_tenants.create(tenant=world.other_tenant, user=world.admin, role=Role.VIEWER)
    content = client_for(client, world.admin).get(url("console-dashboard")).content.decode()
    assert url("console-dashboard", slug="globex") in content
    assert "Globex" in content
    content = client_for(client, world.viewer).get(url("console-dashboard")).content.decode()
    assert "Globex" not in content


# ---- tenant settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["owner", "admin"])
def test_owner_or_admin_renames_the_tenant_and_the_slug_stays(client, world, role):
    c = client_for(client, world.user(role))
    response = c.post(url("console-settings"), {"name": "  Acme Corp  ", "slug": "hijack"})
    assert response.status_code == 302 and response.url == url("console-settings")
    world.tenant.refresh_from_db()
    assert (world.tenant.name, world.tenant.slug) == ("Acme Corp", "acme")
    event = AuditEvent.objects.for_tenant(world.tenant).get(action="tenant.renamed")
    assert event.actor == world.user(role) and event.data == {"from": "Acme", "to": "Acme Corp"}
    page = c.get(response.url).content.decode()
    assert "Renamed “Acme” to “Acme Corp”. The URL name stays acme." in page
    assert 'value="Acme Corp"' in page


def test_saving_the_same_name_changes_and_records_nothing(client, world):
    response = client_for(client, world.admin).post(url("console-settings"), {"name": "Acme"}, follow=True)
    assert "The name is already “Acme”; nothing changed." in response.content.decode()
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="tenant.renamed").exists()


@pytest.mark.parametrize("role", ["developer", "viewer"])
def test_developers_and_viewers_see_settings_without_the_form_and_cannot_rename(client, world, role):
    c = client_for(client, world.user(role))
    response = c.get(url("console-settings"))
    assert response.status_code == 200
    assert response.context["form"] is None
    content = response.content.decode()
    assert 'name="name"' not in content and "Only owners and admins can rename the tenant." in content
    response = c.post(url("console-settings"), {"name": "Pwned"})
    assert response.status_code == 403
    assert "This needs the admin role or higher" in response.content.decode()
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="tenant.renamed").exists()


def test_outsider_gets_404_on_settings_and_renames_nothing(client, world):
    c = client_for(client, world.outsider)
    assert c.get(url("console-settings")).status_code == 404
    assert c.post(url("console-settings"), {"name": "Pwned"}).status_code == 404
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"


@pytest.mark.parametrize(
    "name, message",
    [("   ", "Enter the organisation's name."), ("x" * 121, "Ensure this value has at most 120 characters (it has 121).")],
)
def test_bad_tenant_name_is_a_field_error_and_saves_nothing(client, world, name, message):
    response = client_for(client, world.owner).post(url("console-settings"), {"name": name})
    assert response.status_code == 400
    assert response.context["form"].errors["name"] == [message]
    assert message.replace("'", "&#x27;") in response.content.decode()
    world.tenant.refresh_from_db()
    assert world.tenant.name == "Acme"
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="tenant.renamed").exists()


def test_field_errors_are_linked_to_their_input_for_screen_readers(client, world):
    """Django points the input's aria-describedby at `{id}_error`; our field template must carry that id."""
    import re

    html = client_for(client, world.owner).post(url("console-settings"), {"name": ""}).content.decode()
    tag = re.search(r'<input[^>]*name="name"[^>]*>', html).group(0)
    described_by = re.search(r'aria-describedby="([^"]+)"', tag).group(1).split()
    assert 'aria-invalid="true"' in tag and "id_name_error" in described_by
    errors = re.search(r'<ul[^>]*id="id_name_error"[^>]*>(.*?)</ul>', html, re.S)
    assert errors and "organisation&#x27;s name" in errors.group(1)


def test_a_name_the_service_refuses_lands_on_the_field(client, world, monkeypatch):
    """The form checks shape only; what services.tenant_rename refuses is shown on the name field."""
    from django.core.exceptions import ValidationError

    def refuse(*, tenant, name, actor):
        raise ValidationError({"name": "Names may not mention competitors."})

    monkeypatch.setattr(services, "tenant_rename", refuse)
    response = client_for(client, world.owner).post(url("console-settings"), {"name": "Globex Killer"})
    assert response.status_code == 400
    assert response.context["form"].errors["name"] == ["Names may not mention competitors."]


def test_settings_is_in_the_navigation_for_every_member(client, world):
    for role in ("viewer", "owner"):
        content = client_for(client, world.user(role)).get(url("console-dashboard")).content.decode()
        assert f'href="{url("console-settings")}"' in content


# ---- members and invitations ---------------------------------------------------------------------


def test_invite_email_link_accepted_by_new_user_makes_member(client, world, django_capture_on_commit_callbacks):
    c = client_for(client, world.admin)
    with django_capture_on_commit_callbacks(execute=True):
        response = c.post(url("console-member-invite"), {"email": "New.Person@Example.test", "role": "developer"})
    assert response.status_code == 302
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["new.person@example.test"]
    path = re.search(r"https?://[^/\s]+(/invitations/\S+/)", mail.outbox[0].body).group(1)
    c.logout()

    page = c.get(path)
    assert page.status_code == 200
    assert b"Acme" in page.content and b"Developer" in page.content
    token = path.rstrip("/").rsplit("/", 1)[1]
    response = c.post(reverse("signup") + f"?invitation={token}", {"invitation": token, "email": "new.person@example.test", "password1": PASSWORD, "password2": PASSWORD})
    assert response.status_code == 302 and response.url == path
    assert not Tenant.objects.exclude(slug__in=["acme", "globex"]).exists()  # joining creates no tenant
    response = c.post(path)
    assert response.url == url("console-dashboard")
    member = Membership.objects.for_tenant(world.tenant).get(user__email="new.person@example.test")
    assert member.role == Role.DEVELOPER


def test_invitation_accept_by_existing_user_via_sign_in(client, world, objects):
    # Re-issue to get a token we know.
    invitation, token = services.invitation_create(tenant=world.tenant, email="admin@globex.test", role=Role.VIEWER, actor=services.Actor(user=world.owner))
    path = reverse("invitation-accept", kwargs={"token": token})
    response = client.post(path)
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    client.force_login(world.outsider)
    assert client.post(path).url == url("console-dashboard")
    assert Membership.objects.for_tenant(world.tenant).get(user=world.outsider).role == Role.VIEWER


def test_expired_invitation_is_refused(client, world):
    invitation, token = services.invitation_create(tenant=world.tenant, email="late@x.test", role=Role.ADMIN, actor=services.Actor(user=world.owner))
    Invitation.objects.for_tenant(world.tenant).filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(minutes=1))
    user = User.objects.create_user(username="late@x.test", email="late@x.test", password=PASSWORD)
    client.force_login(user)
    path = reverse("invitation-accept", kwargs={"token": token})
    for response in (client.get(path), client.post(path)):
        assert response.status_code == 400
        assert b"This invitation is expired" in response.content
    assert not Membership.objects.for_tenant(world.tenant).filter(user=user).exists()


def test_unknown_invitation_token_is_404_with_message(client, db):
    response = client.get(reverse("invitation-accept", kwargs={"token": "nope"}))
    assert response.status_code == 404
    assert b"not valid" in response.content


def test_revoked_invitation_link_stops_working(client, world, objects):
    invitation, token = services.invitation_create(tenant=world.tenant, email="r@x.test", role=Role.VIEWER, actor=services.Actor(user=world.owner))
    response = client_for(client, world.admin).post(url("console-invitation-revoke", invitation_id=invitation.pk))
    assert response.status_code == 302
    client.logout()
    response = client.get(reverse("invitation-accept", kwargs={"token": token}))
    assert response.status_code == 400 and b"revoked" in response.content


def test_admin_cannot_invite_an_owner_and_unknown_role_is_a_field_error(client, world):
    c = client_for(client, world.admin)
    for role in ("owner", "superuser"):
        response = c.post(url("console-member-invite"), {"email": "z@x.test", "role": role})
        assert response.status_code == 400
        assert "role" in response.context["invite_form"].errors
    assert not Invitation.objects.for_tenant(world.tenant).exists()


def test_invite_existing_member_is_a_field_error(client, world):
    response = client_for(client, world.admin).post(url("console-member-invite"), {"email": "viewer@acme.test", "role": "viewer"})
    assert response.status_code == 400
    assert "already a member" in response.context["invite_form"].errors["email"][0]


def test_change_role(client, world):
    m = Membership.objects.for_tenant(world.tenant).get(user=world.viewer)
    client_for(client, world.admin).post(url("console-member-role", membership_id=m.pk), {f"m{m.pk}-role": "developer"})
    m.refresh_from_db()
    assert m.role == Role.DEVELOPER


def test_demoting_or_removing_the_last_owner_is_refused(client, world):
    owner_m = Membership.objects.for_tenant(world.tenant).get(user=world.owner)
    c = client_for(client, world.owner)
    response = c.post(url("console-member-role", membership_id=owner_m.pk), {f"m{owner_m.pk}-role": "admin"}, follow=True)
    assert b"at least one owner" in response.content
    response = c.post(url("console-member-remove", membership_id=owner_m.pk), follow=True)
    assert b"last owner" in response.content
    response = c.post(url("console-member-leave"), follow=True)
    assert b"last owner" in response.content
    owner_m.refresh_from_db()
    assert owner_m.role == Role.OWNER
    assert Membership.objects.for_tenant(world.tenant).count() == 4


def test_admin_cannot_touch_an_owner(client, world):
    owner_m = Membership.objects.for_tenant(world.tenant).get(user=world.owner)
    c = client_for(client, world.admin)
    assert c.post(url("console-member-role", membership_id=owner_m.pk), {f"m{owner_m.pk}-role": "viewer"}).status_code == 403
    assert c.post(url("console-member-remove", membership_id=owner_m.pk)).status_code == 403
    owner_m.refresh_from_db()
    assert owner_m.role == Role.OWNER


def test_unknown_role_posted_by_hand_changes_nothing(client, world):
    m = Membership.objects.for_tenant(world.tenant).get(user=world.viewer)
    response = client_for(client, world.owner).post(url("console-member-role", membership_id=m.pk), {f"m{m.pk}-role": "god"}, follow=True)
    assert b"Role not changed" in response.content
    m.refresh_from_db()
    assert m.role == Role.VIEWER


def test_remove_member_and_viewer_leaves(client, world):
    dev = Membership.objects.for_tenant(world.tenant).get(user=world.developer)
    c = client_for(client, world.admin)
    assert c.get(url("console-member-remove", membership_id=dev.pk)).status_code == 200
    c.post(url("console-member-remove", membership_id=dev.pk))
    assert not Membership.objects.for_tenant(world.tenant).filter(pk=dev.pk).exists()
    c = client_for(client, world.viewer)
    assert c.get(url("console-member-leave")).status_code == 200
    assert c.post(url("console-member-leave")).url == reverse("console-home")
    assert not Membership.objects.for_tenant(world.tenant).filter(user=world.viewer).exists()


# ---- API keys ------------------------------------------------------------------------------------


def test_key_create_shows_secret_once_and_stores_no_secret(client, world):
    c = client_for(client, world.admin)
    response = c.post(url("console-key-create"), {"name": "prod", "scopes": ["inference", "finetune"]})
    assert response.status_code == 200
    secret = response.context["secret"]
    assert secret.startswith("mtl_") and secret.encode() in response.content
    assert "no-store" in response["Cache-Control"]
    assert 'Bearer $KEY" http://testserver/v1/models' in response.content.decode()  # a command to copy as it is
    key = ApiKey.objects.for_tenant(world.tenant).get(name="prod")
    assert key.scopes == ["finetune", "inference"]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {ApiKey._meta.db_table} WHERE id = %s", [key.pk])
        row = cursor.fetchone()
    assert not any(secret in str(col) or secret.split("_", 2)[2] in str(col) for col in row)
    listing = c.get(url("console-keys")).content.decode()
    assert key.prefix in listing and secret not in listing
    assert services.api_key_authenticate(secret) == key


def test_key_form_posted_twice_creates_one_key(client, world):
    """Reloading the page that showed the secret (or a double click) posts the same form again: no second key."""
    c = client_for(client, world.admin)
    form = c.get(url("console-key-create")).context["form"]
    data = {"name": "prod", "scopes": ["inference"], "submission": form.initial["submission"]}
    first = c.post(url("console-key-create"), data)
    assert first.status_code == 200 and "secret" in first.context
    again = c.post(url("console-key-create"), data, follow=True)
    assert again.redirect_chain[-1][0] == url("console-keys")
    key = ApiKey.objects.for_tenant(world.tenant).get(name="prod")  # exactly one
    page = again.content.decode()
    assert "already submitted" in page and key.prefix in page and first.context["secret"] not in page
    # A new form is a new key, and each rendering carries its own value.
    second_form = c.get(url("console-key-create")).context["form"]
    assert second_form.initial["submission"] != data["submission"]
    c.post(url("console-key-create"), {**data, "submission": second_form.initial["submission"]})
    assert ApiKey.objects.for_tenant(world.tenant).filter(name="prod").count() == 2


def test_key_form_refused_by_the_service_can_be_posted_again(client, world):
    c = client_for(client, world.admin)
    token = c.get(url("console-key-create")).context["form"].initial["submission"]
    data = {"name": "ci", "scopes": ["inference"], "submission": token}
    refused = c.post(url("console-key-create"), {**data, "expires_on": "2001-01-01"})  # the service refuses a past expiry
    assert refused.status_code == 400 and "secret" not in refused.context
    assert refused.context["form"]["submission"].value() == token  # the re-rendered form keeps its value
    fixed = c.post(url("console-key-create"), data)
    assert fixed.status_code == 200 and "secret" in fixed.context
    assert ApiKey.objects.for_tenant(world.tenant).filter(name="ci").count() == 1


def test_key_create_with_expiry(client, world):
    day = (timezone.now() + timedelta(days=3)).date()
    client_for(client, world.admin).post(url("console-key-create"), {"name": "tmp", "scopes": ["inference"], "expires_on": day.isoformat()})
    key = ApiKey.objects.for_tenant(world.tenant).get(name="tmp")
    assert key.expires_at.date() == day + timedelta(days=1)


def test_key_expiry_is_listed_as_picked(client, world):
    """Picked as 30 Jun 2027, stored as the end of that day (1 Jul 00:00 UTC): listed as 30 Jun 2027, not 1 Jul."""
    c = client_for(client, world.admin)
    created = c.post(url("console-key-create"), {"name": "summer", "scopes": ["inference"], "expires_on": "2027-06-30"}).content.decode()
    assert "30 Jun 2027 (works until the end of that day, UTC)" in created and "1 Jul 2027" not in created
    listing = c.get(url("console-keys")).content.decode()
    assert ">30 Jun 2027</time>" in listing and ">1 Jul 2027<" not in listing
    key = ApiKey.objects.for_tenant(world.tenant).get(name="summer")
    assert key.expires_on.isoformat() == "2027-06-30"
    key.expires_at = key.expires_at.replace(month=6, day=30, hour=15)  # set through the API at 15:00: that day
    assert key.expires_on.isoformat() == "2027-06-30"


@pytest.mark.parametrize(
    "data, field",
    [
        ({"name": "  ", "scopes": ["inference"]}, "name"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["root"]}, "scopes"),
        ({"name": "x", "scopes": ["inference"], "expires_on": "2001-01-01"}, "expires_on"),
    ],
)
def test_key_create_bad_input_is_a_field_error(client, world, data, field):
    response = client_for(client, world.admin).post(url("console-key-create"), data)
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert "secret" not in response.context
    assert not ApiKey.objects.for_tenant(world.tenant).exists()


def test_revoked_key_shows_revoked(client, world, objects):
    c = client_for(client, world.admin)
    key = objects["key"]
    assert c.get(url("console-key-revoke", key_id=key.pk)).status_code == 200
    c.post(url("console-key-revoke", key_id=key.pk))
    key.refresh_from_db()
    assert key.state == "revoked"
    content = c.get(url("console-keys")).content.decode()
    assert "state-revoked" in content


# ---- system prompt -------------------------------------------------------------------------------


def test_prompt_save_makes_a_draft_that_is_not_live(client, world):
    c = client_for(client, world.admin)
    response = c.post(url("console-prompt"), {"text": "Line one\r\nLine two", "note": "start"})
    assert response.status_code == 302 and response.url == url("console-prompt-version", version=1)
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt is None  # saved, not live
    [v1] = SystemPromptVersion.objects.for_tenant(world.tenant)
    assert v1.text == "Line one\nLine two"
    page = c.get(url("console-prompt-version", version=1)).content.decode()
    assert "data-draft" in page and f'href="{url("console-playground")}?prompt=1"' in page
    assert f'href="{url("console-prompt-activate", version=1)}"' in page
    services.system_prompt_activate(tenant=world.tenant, version=v1, actor=services.Actor(user=world.owner))
    c.post(url("console-prompt"), {"text": "Line one", "note": ""})
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1  # v2 is a draft: v1 stays live
    page = c.get(url("console-prompt")).content.decode()
    assert re.search(r'data-version="2">\s*<td>.*?data-draft', page, re.S) and re.search(r'data-version="1">\s*<td>.*?data-active', page, re.S)
    assert re.search(r'<textarea[^>]*>\s*Line one</textarea>', page)  # the editor goes on from the newest version (the draft)


def test_activating_a_prompt_asks_for_confirmation(client, world):
    c = client_for(client, world.admin)
    owner = services.Actor(user=world.owner)
    services.system_prompt_save(tenant=world.tenant, text="Be brief.", note="", actor=owner)
    services.system_prompt_save(tenant=world.tenant, text="Be kind.", note="", actor=owner, activate=False)
    confirm = c.get(url("console-prompt-activate", version=2))
    html = confirm.content.decode()
    assert confirm.status_code == 200 and "Make system prompt v2 live?" in html and "in place of v1" in html
    assert f'href="{url("console-prompt-diff", version=1, other_version=2)}"' in html and "data-confirm-activate" in html
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1  # asking changes nothing
    response = c.post(url("console-prompt-activate", version=2), follow=True)
    assert "Version 2 is now live" in response.content.decode()
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 2
    assert client_for(client, world.developer).get(url("console-prompt-activate", version=1)).status_code == 403
    assert client_for(client, world.outsider).get(url("console-prompt-activate", version=1)).status_code == 404


def test_saving_the_newest_text_again_makes_no_new_version(client, world):
    c = client_for(client, world.admin)
    c.post(url("console-prompt"), {"text": "Line one\r\nLine two", "note": "start"})
    response = c.post(url("console-prompt"), {"text": "Line one\r\nLine two", "note": ""}, follow=True)  # the form, untouched
    assert "Nothing to save: version 1 (a draft) already has this text." in response.content.decode()
    assert SystemPromptVersion.objects.for_tenant(world.tenant).count() == 1


def test_activate_old_version(client, world, objects):
    c = client_for(client, world.admin)
    c.post(url("console-prompt-activate", version=1))
    world.tenant.refresh_from_db()
    assert world.tenant.active_prompt.version == 1
    assert SystemPromptVersion.objects.for_tenant(world.tenant).count() == 2


def test_activate_unknown_version_is_404(client, world, objects):
    assert client_for(client, world.admin).post(url("console-prompt-activate", version=99)).status_code == 404


def test_diff_page_shows_added_and_removed_lines(client, world, objects):
    services.system_prompt_save(tenant=world.tenant, text="Be kind.\nBe exact.", note="", actor=services.Actor(user=world.owner))
    content = client_for(client, world.viewer).get(url("console-prompt-diff", version=2, other_version=3)).content.decode()
    assert re.search(r'diff-del">.*?Removed: </span>Be brief\.', content, re.S)
    assert re.search(r'diff-add">.*?Added: </span>Be exact\.', content, re.S)
    assert re.search(r'diff-same">.*?Be kind\.', content, re.S)


def diff_checked(old: str, new: str, monkeypatch) -> tuple[list, list[int]]:
    """prompt_diff(old, new), checked to hold both versions exactly, and the line pairs each matcher it ran was given."""
    import difflib
    from types import SimpleNamespace as V

    from tenants import selectors

    given: list[int] = []

    class Recording(difflib.SequenceMatcher):
        def __init__(self, isjunk, a, b):
            given.append(len(a) * len(b))
            super().__init__(isjunk, a, b, autojunk=True)

    monkeypatch.setattr(selectors.difflib, "SequenceMatcher", Recording)
    lines = selectors.prompt_diff(V(text=old), V(text=new))
    assert [line for k, line in lines if k in " -"] == old.splitlines()
    assert [line for k, line in lines if k in " +"] == new.splitlines()
    return lines, given


def test_diff_of_two_long_versions_compares_lines_not_characters(monkeypatch):
    # ndiff also compared the characters of similar changed lines: 8-35 s of CPU for two 8,000-character versions
    # of 50-200 similar lines, per GET, for any viewer to request. Now lines only (a matcher over 100 × 100 lines).
    import random

    rng = random.Random(3)
    old, new = ("\n".join("".join(rng.choice("ab") for _ in range(80)) for _ in range(100)) for _ in range(2))
    _, given = diff_checked(old, new, monkeypatch)
    assert given == [100 * 100]


def test_diff_of_many_short_repeated_lines_is_bounded(monkeypatch):
    # difflib's matcher is superlinear when lines repeat just under its junk threshold: two 20,000-character versions
    # of 2-character lines (100 distinct, each ~66 times) took 5 s of CPU per GET; these two of 40,000, half a minute.
    # Past DIFF_MAX_LINE_PAIRS no matcher runs: the middle is shown removed, then added. (CPU: bench/noisy_neighbour.py.)
    from tenants.selectors import DIFF_MAX_LINE_PAIRS

    n = 40_000 // 3
    old = "head\n" + "\n".join(f"{i % 100:02d}" for i in range(n)) + "\ntail"
    new = "head\n" + "\n".join(f"{(i * 7) % 100:02d}" for i in range(n)) + "\ntail"
    lines, given = diff_checked(old, new, monkeypatch)
    assert given == [] and n * n > DIFF_MAX_LINE_PAIRS
    assert lines[0] == (" ", "head") and lines[-1] == (" ", "tail")


def test_diff_keeps_common_first_and_last_lines_and_matches_the_middle():
    from types import SimpleNamespace as V

    from tenants.selectors import prompt_diff

    old = V(text="Be kind.\nBe brief.\nUse lists.\nSay thanks.\nSign off.")
    new = V(text="Be kind.\nBe exact.\nUse lists.\nSign off.")
    assert prompt_diff(old, new) == [(" ", "Be kind."), ("-", "Be brief."), ("+", "Be exact."), (" ", "Use lists."),
                                     ("-", "Say thanks."), (" ", "Sign off.")]


def test_oversized_prompt_is_a_field_error_and_saves_nothing(client, world, settings):
    settings.PLATFORM_MAX_PROMPT_CHARS = 100
    response = client_for(client, world.admin).post(url("console-prompt"), {"text": "x" * 101, "note": ""})
    assert response.status_code == 400
    assert "the limit is 100" in response.context["form"].errors["text"][0]
    assert not SystemPromptVersion.objects.for_tenant(world.tenant).exists()


# ---- limits and dashboard ------------------------------------------------------------------------


def test_limits_show_unlimited_and_fair_share_formula(client, world):
    c = client_for(client, world.viewer)
    content = c.get(url("console-limits")).content.decode()
    assert content.count("Unlimited") >= 4
    from tenants.models import PlatformSettings

    ps = PlatformSettings.load()
    ps.fair_share_total_tokens = 1_000_000
    ps.save()
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, fair_share=True, weight=3)
    services.policy_update(tenant=world.other_tenant, actor=services.SYSTEM, fair_share=True, weight=1)
    content = c.get(url("console-limits")).content.decode()
    assert "750,000" in content  # the tenant's quota
    # The derivation (the platform's pool, every tenant's weights) and the scheduling weight are platform internals.
    assert "R<sub>total</sub>" not in content and "Scheduling weight" not in content and "share of the platform's capacity" in content
    world.viewer.is_staff = True
    world.viewer.save()
    content = client_for(client, world.viewer).get(url("console-limits")).content.decode()
    assert "R<sub>total</sub>" in content and "Scheduling weight" in content


def test_dashboard_shows_role_counts_and_suspension(client, world, objects, settings):
    settings.REDIS_URL = ""  # the embedded-mode note shows only without Redis
    services.tenant_set_status(tenant=world.tenant, status="suspended", actor=services.SYSTEM, reason="unpaid invoice")
    response = client_for(client, world.developer).get(url("console-dashboard"))
    content = response.content.decode()
    assert response.context["member_count"] == 4
    assert response.context["active_key_count"] == 1
    assert "Developer" in content and "v2" in content
    assert "is suspended" in content and "unpaid invoice" in content
    assert "Embedded mode" not in content  # an operator's concern: staff only
    world.developer.is_staff = True
    world.developer.save()
    assert "Embedded mode" in client_for(client, world.developer).get(url("console-dashboard")).content.decode()
    world.developer.is_staff = False
    world.developer.save()
    assert "Try a model in the Playground" in content and "Fine-tune a model" in content  # a new user's next steps
    viewer = client_for(client, world.viewer).get(url("console-dashboard")).content.decode()
    assert "Playground" not in viewer  # developer+ pages, as in the side nav


def test_every_console_url_is_a_tenant_view_or_listed_as_public_or_user():
    from django.urls import URLPattern, URLResolver

    from portal import console_urls

    def walk(patterns, prefix=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern), p

    listed = console_urls.PUBLIC_URL_NAMES | console_urls.USER_URL_NAMES
    for route, p in walk(console_urls.urlpatterns):
        if "<slug:tenant_slug>" in route:
            assert hasattr(p.callback, "tenant_roles"), route  # a tenants.access.tenant_view
        else:
            assert p.name in listed, route


# ---- text people read ------------------------------------------------------------------------------


def test_sentence_adds_a_full_stop_only_when_missing():
    from common.text import sentence

    assert sentence("Acme") == "Acme." and sentence("Demo Inc.") == "Demo Inc." and sentence("Why? ") == "Why?"


def test_names_and_reasons_ending_in_a_full_stop_are_not_doubled(client, world):
    services.tenant_rename(tenant=world.tenant, name="Acme Inc.", actor=services.SYSTEM)
    services.tenant_set_status(tenant=world.tenant, status="suspended", reason="Suspended by staff.", actor=services.SYSTEM)
    c = client_for(client, world.admin)
    for page in ("console-limits", "console-dashboard"):
        html = c.get(url(page)).content.decode()
        assert ".." not in html.replace("...", ""), page
    assert "What the gateway enforces for Acme Inc. Platform staff" in c.get(url("console-limits")).content.decode()
    assert "API requests are refused: Suspended by staff. Contact support" in c.get(url("console-dashboard")).content.decode()


def test_audit_details_read_as_words(client, world):
    key, _ = services.api_key_create(tenant=world.tenant, name="deploy-bot", scopes=["management:write", "inference"], actor=services.SYSTEM)
    services.policy_update(tenant=world.tenant, actor=services.Actor(key=key), quota_tokens=5_000_000)
    html = client_for(client, world.admin).get(url("console-audit")).content.decode()
    assert "0 → 5,000,000" in html and "quota tokens" in html  # not {'from': 0, 'to': 5000000}
    assert "inference, management:write" in html and "[" not in re.sub(r"<[^>]+>", "", html.split("<tbody>")[1])
    assert f"API key “deploy-bot” ({key.prefix}…)" in html


# ---- leaving, and the tenant switcher --------------------------------------------------------------


def test_the_only_owner_is_not_offered_to_leave(client, world):
    c = client_for(client, world.owner)
    members = c.get(url("console-members")).content.decode()
    assert url("console-member-leave") not in members and "You are the only owner" in members
    leave = c.get(url("console-member-leave")).content.decode()
    assert "You are the only owner" in leave and "Leave tenant</button>" not in leave
    services.membership_change_role(membership=Membership.objects.for_tenant(world.tenant).get(user=world.admin), role=Role.OWNER,
                                    actor=services.SYSTEM)
    assert url("console-member-leave") in c.get(url("console-members")).content.decode()  # two owners: either may go
    assert "Leave tenant</button>" in c.get(url("console-member-leave")).content.decode()


def test_tenant_switcher_keeps_the_page_when_the_role_allows(client, world):
    Membership.objects.for_tenant(world.other_tenant).create(user=world.admin, role=Role.VIEWER)
    c = client_for(client, world.admin)

    def switch_link(path):
        response = c.get(path)
        return dict((m.tenant.slug, link) for m, link in response.context["tenant_switch"])["globex"]

    assert switch_link(url("console-keys")) == url("console-keys", slug="globex")
    assert switch_link(url("console-key-revoke", key_id=services.api_key_create(
        tenant=world.tenant, name="k", scopes=["inference"], actor=services.SYSTEM)[0].pk)) == url("console-keys", slug="globex")
    assert switch_link(reverse("finetune-jobs", args=["acme"])) == reverse("finetune-jobs", args=["globex"])
    assert switch_link(url("console-audit")) == url("console-dashboard", slug="globex")  # a viewer there: no audit log
    assert switch_link(url("console-dashboard")) == url("console-dashboard", slug="globex")


def test_client_errors_are_logged_without_a_traceback():
    import logging
    import sys

    from portal.logfilters import ClientErrorsWithoutTraceback

    try:
        raise PermissionError("x")
    except PermissionError:
        exc_info = sys.exc_info()
    refused = logging.LogRecord("django.request", logging.WARNING, "", 0, "Forbidden: /t/acme/", (), exc_info)
    refused.status_code = 403
    crashed = logging.LogRecord("django.request", logging.ERROR, "", 0, "Internal Server Error: /", (), exc_info)
    crashed.status_code = 500
    f = ClientErrorsWithoutTraceback()
    assert f.filter(refused) and refused.exc_info is None
    assert f.filter(crashed) and crashed.exc_info is not None
