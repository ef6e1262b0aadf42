"""Sign-in and password-reset throttling (tenants/throttle.py) through the real pages, on a controlled clock."""

from __future__ import annotations

import logging
import math
import re
import time
from datetime import datetime, timezone as dt_timezone

import pytest
from django.core import mail
from django.test import Client, RequestFactory
from django.urls import reverse

from tenants import throttle
from tenants.models import AuditEvent, Membership
from tests.support.users import PASSWORD

WRONG = "not-the-password-1"
NEW_PASSWORD = "a-new-long-pass-77"
ACCOUNT_LIMIT, IP_LIMIT, WINDOW_S, LOCKOUT_S = 3, 5, 900, 600
LOCKED = "Too many failed sign-in attempts for this account"


class Clock:
    def __init__(self):
        self.t = float(math.ceil(time.time() / 3600) * 3600)  # a window boundary (3600 is a multiple of WINDOW_S)

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(throttle, "now", lambda: c.t)
    return c


@pytest.fixture(autouse=True)
def limits(settings):
    settings.PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT = ACCOUNT_LIMIT
    settings.PLATFORM_SIGNIN_FAILURES_PER_IP = IP_LIMIT
    settings.PLATFORM_SIGNIN_WINDOW_S = WINDOW_S
    settings.PLATFORM_SIGNIN_LOCKOUT_S = LOCKOUT_S
    settings.PLATFORM_PASSWORD_RESETS_PER_EMAIL = 2
    settings.PLATFORM_PASSWORD_RESETS_PER_IP = 4
    settings.PLATFORM_PASSWORD_RESET_WINDOW_S = 3600
    settings.PLATFORM_TRUSTED_PROXY_COUNT = 0


def sign_in(email: str, password: str, ip: str = "203.0.113.7"):
    """A fresh browser each time (no session carried over), from `ip`."""
    return Client(REMOTE_ADDR=ip).post(reverse("login"), {"username": email, "password": password})


def signed_in(response) -> bool:
    return response.status_code == 302 and response.url == reverse("console-home")


def fail(email: str, times: int, ip: str = "203.0.113.7") -> None:
    for _ in range(times):
        response = sign_in(email, WRONG, ip)
        assert response.status_code == 200 and "Please enter a correct" in response.content.decode()


def lock_out(email: str, ip: str = "203.0.113.7") -> None:
    fail(email, ACCOUNT_LIMIT - 1, ip)
    assert sign_in(email, WRONG, ip).status_code == 429


# ---- per account -------------------------------------------------------------------------------------


def test_below_the_limit_the_right_password_still_signs_in(world, clock):
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)
    assert signed_in(sign_in("owner@acme.test", PASSWORD))


def test_the_nth_failure_locks_the_account_and_says_when_to_try_again(world, clock):
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)
    response = sign_in("owner@acme.test", WRONG)
    assert response.status_code == 429
    assert response["Retry-After"] == str(LOCKOUT_S)
    until = datetime.fromtimestamp(clock.t + LOCKOUT_S, tz=dt_timezone.utc).strftime("%H:%M UTC")
    content = response.content.decode()
    assert f"{LOCKED}, so sign-in is paused. Try again in 10 minutes (after {until}), or reset your password." in content


def test_a_locked_account_refuses_even_the_right_password_with_the_same_message(world, clock):
    lock_out("owner@acme.test")
    clock.advance(60)
    right, wrong = sign_in("owner@acme.test", PASSWORD), sign_in("Owner@ACME.test", WRONG)
    assert right.status_code == wrong.status_code == 429
    assert right.context["form"].non_field_errors() == wrong.context["form"].non_field_errors()
    assert "Try again in 9 minutes" in right.context["form"].non_field_errors()[0]
    assert "_auth_user_id" not in right.wsgi_request.session


def test_the_lockout_ends_after_the_cooldown(world, clock):
    lock_out("owner@acme.test")
    clock.advance(LOCKOUT_S - 1)
    assert sign_in("owner@acme.test", PASSWORD).status_code == 429
    clock.advance(1)  # still the window of the failures: the lockout starts a fresh count all the same
    fail("owner@acme.test", ACCOUNT_LIMIT - 1, ip="198.51.100.9")  # (another address: only the account counts)
    assert signed_in(sign_in("owner@acme.test", PASSWORD))


def test_an_account_locks_again_after_a_lockout_ends(world, clock):
    lock_out("owner@acme.test")
    clock.advance(LOCKOUT_S)  # the ended lock may still sit in the cache (Redis expires it on its own clock)
    lock_out("owner@acme.test", ip="198.51.100.9")
    assert sign_in("owner@acme.test", PASSWORD).status_code == 429


def test_failures_count_within_a_window_and_expire_with_it(world, clock):
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)
    clock.advance(WINDOW_S)  # the next window: the earlier failures no longer count
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)
    assert signed_in(sign_in("owner@acme.test", PASSWORD))
    fail("viewer@acme.test", ACCOUNT_LIMIT - 1, ip="198.51.100.9")  # another address: only the account counts
    clock.advance(WINDOW_S - 1)  # still the same window: they add up
    response = sign_in("viewer@acme.test", WRONG, ip="198.51.100.9")
    assert response.status_code == 429 and LOCKED in response.content.decode()


def test_a_successful_sign_in_clears_the_account_failures(world, clock):
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)
    assert signed_in(sign_in("owner@acme.test", PASSWORD))
    fail("owner@acme.test", ACCOUNT_LIMIT - 1)  # would have locked without the reset
    assert signed_in(sign_in("owner@acme.test", PASSWORD))


def test_an_unknown_account_locks_like_a_real_one(db, clock):
    fail("nobody@nowhere.test", ACCOUNT_LIMIT - 1)
    response = sign_in("nobody@nowhere.test", WRONG)
    assert response.status_code == 429 and LOCKED in response.content.decode()


def test_a_completed_password_reset_lifts_the_account_lockout(world, clock):
    lock_out("owner@acme.test")
    browser = Client(REMOTE_ADDR="203.0.113.7")
    browser.post(reverse("password_reset"), {"email": "owner@acme.test"})
    path = re.search(r"https?://testserver(/\S+)", mail.outbox[0].body).group(1)
    form_url = browser.get(path, follow=True).redirect_chain[-1][0]
    assert browser.post(form_url, {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}).status_code == 302
    assert signed_in(sign_in("owner@acme.test", NEW_PASSWORD))


def test_accounts_lock_independently(world, clock):
    lock_out("owner@acme.test")
    assert signed_in(sign_in("viewer@acme.test", PASSWORD))


# ---- per client address ------------------------------------------------------------------------------


def test_failures_from_one_address_across_accounts_lock_that_address(world, clock):
    emails = [f"user{i}@spray.test" for i in range(IP_LIMIT)]  # one failure each: no account reaches its limit
    for email in emails[:-1]:
        fail(email, 1)
    response = sign_in(emails[-1], WRONG)
    assert response.status_code == 429
    assert "Too many failed sign-in attempts from your network" in response.content.decode()
    # From that address even a right password of an untouched account is refused; from another it works.
    assert sign_in("owner@acme.test", PASSWORD).status_code == 429
    assert signed_in(sign_in("owner@acme.test", PASSWORD, ip="198.51.100.9"))


def test_a_success_does_not_clear_the_address_failures(world, clock):
    for i in range(IP_LIMIT - 1):
        fail(f"user{i}@spray.test", 1)
    assert signed_in(sign_in("owner@acme.test", PASSWORD))
    assert sign_in("user9@spray.test", WRONG).status_code == 429


def test_forwarded_for_is_ignored_unless_proxies_are_trusted(settings):
    rf = RequestFactory()
    request = rf.get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="1.1.1.1, 203.0.113.7")
    assert throttle.client_ip(request) == "10.0.0.2"
    settings.PLATFORM_TRUSTED_PROXY_COUNT = 1
    assert throttle.client_ip(request) == "203.0.113.7"  # the entry our proxy appended, not the client's own
    settings.PLATFORM_TRUSTED_PROXY_COUNT = 2
    assert throttle.client_ip(request) == "1.1.1.1"
    settings.PLATFORM_TRUSTED_PROXY_COUNT = 3  # fewer entries than proxies: the request went around them
    assert throttle.client_ip(request) == "10.0.0.2"
    settings.PLATFORM_TRUSTED_PROXY_COUNT = 1
    assert throttle.client_ip(rf.get("/", REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="not-an-address")) == "10.0.0.2"


def test_ipv6_clients_are_keyed_by_their_64(settings):
    rf = RequestFactory()
    a = throttle.client_ip(rf.get("/", REMOTE_ADDR="2001:db8:1:2::1"))
    b = throttle.client_ip(rf.get("/", REMOTE_ADDR="2001:db8:1:2:ffff::9"))
    assert a == b == "2001:db8:1:2::/64"
    assert throttle.client_ip(rf.get("/", REMOTE_ADDR="::ffff:192.0.2.1")) == "192.0.2.1"


def test_a_forged_forwarded_for_does_not_escape_the_address_limit(world, clock):
    for i in range(IP_LIMIT):
        Client(REMOTE_ADDR="203.0.113.7", HTTP_X_FORWARDED_FOR=f"192.0.2.{i}").post(
            reverse("login"), {"username": f"user{i}@spray.test", "password": WRONG}
        )
    assert sign_in("owner@acme.test", PASSWORD).status_code == 429


# ---- audit and log -----------------------------------------------------------------------------------


def test_a_lockout_is_audited_in_the_accounts_tenants_and_logged_without_secrets(world, clock, caplog):
    with caplog.at_level(logging.WARNING, logger="tenants.throttle"):
        fail("viewer@acme.test", ACCOUNT_LIMIT - 1)
        assert not AuditEvent.objects.for_tenant(world.tenant).filter(action__startswith="security.").exists()
        sign_in("viewer@acme.test", WRONG)
        sign_in("viewer@acme.test", PASSWORD)  # refused; must not start a second event
    events = list(AuditEvent.objects.for_tenant(world.tenant).filter(action="security.signin_locked"))
    assert len(events) == 1
    event = events[0]
    assert event.actor_id is None and event.actor_label == "system"
    assert event.target_id == str(Membership.objects.for_tenant(world.tenant).get(user=world.viewer).pk)
    assert event.data["user"] == "viewer@acme.test" and event.data["ip"] == "203.0.113.7"
    assert event.data["attempts"] == ACCOUNT_LIMIT
    assert not AuditEvent.objects.for_tenant(world.other_tenant).filter(action__startswith="security.").exists()
    records = [r.getMessage() for r in caplog.records if "security.signin_locked" in r.getMessage()]
    assert len(records) == 1 and "viewer@acme.test" in records[0]
    for text in [str(event.data), *records]:
        assert PASSWORD not in text and WRONG not in text


def test_an_unknown_account_name_is_not_logged(db, clock, caplog):
    typed = "hunter2-typed-as-a-name"  # the admin form takes any name: it could be a password
    with caplog.at_level(logging.WARNING, logger="tenants.throttle"):
        for _ in range(ACCOUNT_LIMIT):
            Client(REMOTE_ADDR="203.0.113.7").post(reverse("admin:login"), {"username": typed, "password": WRONG})
    records = [r.getMessage() for r in caplog.records if "security.signin_locked" in r.getMessage()]
    assert len(records) == 1 and typed not in records[0] and "no such account" in records[0]


# ---- Django admin ------------------------------------------------------------------------------------


def test_the_admin_sign_in_shares_the_account_throttle(world, clock):
    world.owner.is_staff = True
    world.owner.save()
    lock_out("owner@acme.test")
    response = Client(REMOTE_ADDR="198.51.100.9").post(reverse("admin:login"), {"username": "owner@acme.test", "password": PASSWORD})
    assert response.status_code == 200  # the admin's own view; it shows the message
    assert LOCKED in response.content.decode()
    assert "_auth_user_id" not in response.wsgi_request.session


def test_a_non_staff_right_password_at_the_admin_is_not_a_failure(world, clock):
    for _ in range(ACCOUNT_LIMIT):
        Client(REMOTE_ADDR="203.0.113.7").post(reverse("admin:login"), {"username": "viewer@acme.test", "password": PASSWORD})
    assert signed_in(sign_in("viewer@acme.test", PASSWORD))


# ---- password reset ----------------------------------------------------------------------------------


def reset(email: str, ip: str = "203.0.113.7"):
    return Client(REMOTE_ADDR=ip).post(reverse("password_reset"), {"email": email})


def test_password_reset_requests_are_limited_per_email(world, clock):
    assert reset("viewer@acme.test").status_code == 302
    assert reset("Viewer@acme.test", ip="198.51.100.9").status_code == 302  # same e-mail, another address
    response = reset("viewer@acme.test", ip="192.0.2.44")
    assert response.status_code == 429
    assert "Too many password-reset e-mails were requested for this address" in response.content.decode()
    assert "try again in 60 minutes" in response.content.decode()
    assert len(mail.outbox) == 2
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="security.password_reset_locked").count() == 1
    clock.advance(3600)
    assert reset("viewer@acme.test").status_code == 302
    assert len(mail.outbox) == 3


def test_password_reset_requests_are_limited_per_address(world, clock):
    for i in range(4):
        assert reset(f"someone{i}@elsewhere.test").status_code == 302
    response = reset("viewer@acme.test")
    assert response.status_code == 429
    assert "Too many password-reset requests from your network" in response.content.decode()
    assert mail.outbox == []  # none of the others had an account; the refused one sent nothing
    assert reset("viewer@acme.test", ip="198.51.100.9").status_code == 302
    assert len(mail.outbox) == 1
