"""Throttling of password sign-in and password-reset e-mail, on Django's cache (LocMem embedded, Redis in production).

Each limit counts events per account (the normalised e-mail) and, separately, per client address, in fixed
windows: one counter per window, created with `cache.add` and bumped with `cache.incr` (both atomic on LocMem
and Redis). When a counter reaches its limit, a lock holding the time it ends is added; while it stands,
attempts are refused *before* any password is checked, so the right password during a lockout fails exactly
like a wrong one. Decisions use `now()` (tests replace it); the cache's own expiry only clears old keys.
Settings: `PLATFORM_SIGNIN_*`, `PLATFORM_PASSWORD_RESET*`, `PLATFORM_TRUSTED_PROXY_COUNT` (docs/configuration.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone as dt_timezone

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import transaction

from tenants.selectors import memberships_for_user
from tenants.services import SYSTEM, audit_record

log = logging.getLogger(__name__)


def now() -> float:
    """Seconds since the epoch: the one clock of this module."""
    return time.time()


class Throttled(Exception):
    """An attempt refused by a lockout. `message` is for the person; `until` is when it ends (epoch seconds)."""

    def __init__(self, message: str, until: float):
        super().__init__(message)
        self.message = message
        self.until = until

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.until - now()))


@dataclass(frozen=True)
class Limit:
    """At most `max_events` per `window_s` (a fixed window) for one `who`; reaching it locks `who` for `lockout_s`."""

    name: str
    max_events: int
    window_s: int
    lockout_s: int

    def _key(self, who: str) -> str:
        # Hashed: keys stay short and valid on every backend, and the cache holds no e-mail addresses.
        return f"throttle:{self.name}:{hashlib.sha256(who.encode()).hexdigest()[:32]}"

    def _counter_key(self, who: str, at: float) -> str:
        return f"{self._key(who)}:{int(at // self.window_s)}"

    def locked_until(self, who: str) -> float | None:
        until = cache.get(self._key(who) + ":lock")
        return until if until is not None and until > now() else None

    def count(self, who: str) -> float | None:
        """Count one event. Returns the lockout's end when this event starts one, else None."""
        at = now()
        key = self._counter_key(who, at)
        if cache.add(key, 1, timeout=self.window_s):
            n = 1
        else:
            try:
                n = cache.incr(key)
            except ValueError:  # expired between add and incr
                cache.add(key, 1, timeout=self.window_s)
                n = 1
        if n < self.max_events:
            return None
        lock_key, until = self._key(who) + ":lock", at + self.lockout_s
        if not cache.add(lock_key, until, timeout=self.lockout_s + 1):
            current = cache.get(lock_key)
            if current is not None and current > at:
                return None  # a concurrent request started this lockout
            cache.set(lock_key, until, timeout=self.lockout_s + 1)  # a stale lock the cache has not dropped yet
        cache.delete(key)  # after the lockout, a fresh count
        return until

    def clear(self, who: str, *, unlock: bool = False) -> None:
        cache.delete_many([self._counter_key(who, now())] + ([self._key(who) + ":lock"] if unlock else []))


def client_ip(request) -> str:
    """The client's address, as the throttles key it.

    REMOTE_ADDR, unless `PLATFORM_TRUSTED_PROXY_COUNT` = n > 0: then the n-th X-Forwarded-For entry from the
    right (each trusted proxy appends the address it received the request from; entries further left are
    whatever the client sent). With fewer entries than that, the request bypassed the proxies: REMOTE_ADDR.
    An IPv6 client is keyed by its /64, which one host usually holds whole.
    """
    remote = request.META.get("REMOTE_ADDR", "")
    candidate = remote
    hops = settings.PLATFORM_TRUSTED_PROXY_COUNT
    if hops:
        forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            candidate = forwarded[-hops]
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return remote or "unknown"
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _account(username: str) -> str:
    """Sign-in names are lower-cased e-mail addresses (tenants.forms.EmailAuthenticationForm)."""
    return username.strip().lower()


def _when(until: float) -> str:
    minutes = max(1, math.ceil((until - now()) / 60))
    at = datetime.fromtimestamp(until, tz=dt_timezone.utc).strftime("%H:%M UTC")
    return f"Try again in {minutes} minute{'s' if minutes != 1 else ''} (after {at})"


# ---- the two policies --------------------------------------------------------------------------------

SIGNIN_ACCOUNT_MESSAGE = "Too many failed sign-in attempts for this account, so sign-in is paused. {when}, or reset your password."
SIGNIN_IP_MESSAGE = "Too many failed sign-in attempts from your network, so sign-in is paused. {when}."
RESET_ACCOUNT_MESSAGE = "Too many password-reset e-mails were requested for this address. Use the link in the last one (check your spam folder), or {when_lower}."
RESET_IP_MESSAGE = "Too many password-reset requests from your network. {when}."


@dataclass(frozen=True)
class _Policy:
    action: str  # audit action when an account's lockout starts
    per_account: Limit
    per_ip: Limit
    account_message: str
    ip_message: str

    def _refuse(self, template: str, until: float) -> Throttled:
        when = _when(until)
        return Throttled(template.format(when=when, when_lower=when[0].lower() + when[1:]), until)

    def check(self, request, username: str) -> None:
        """Raise Throttled while the client's address or the account is locked out."""
        ip = client_ip(request) if request is not None else None
        if ip is not None and (until := self.per_ip.locked_until(ip)):
            raise self._refuse(self.ip_message, until)
        if until := self.per_account.locked_until(_account(username)):
            raise self._refuse(self.account_message, until)

    def count(self, request, username: str) -> None:
        """Count one event for the account and the address; record any lockout this starts."""
        account = _account(username)
        ip = client_ip(request) if request is not None else None
        if ip is not None and (until := self.per_ip.count(ip)):
            _lockout_started(self, self.per_ip, until, ip=ip)
        if until := self.per_account.count(account):
            _lockout_started(self, self.per_account, until, ip=ip, account=account)


def signin_policy() -> _Policy:
    s = settings
    return _Policy(
        "security.signin_locked",
        Limit("signin:account", s.PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT, s.PLATFORM_SIGNIN_WINDOW_S, s.PLATFORM_SIGNIN_LOCKOUT_S),
        Limit("signin:ip", s.PLATFORM_SIGNIN_FAILURES_PER_IP, s.PLATFORM_SIGNIN_WINDOW_S, s.PLATFORM_SIGNIN_LOCKOUT_S),
        SIGNIN_ACCOUNT_MESSAGE,
        SIGNIN_IP_MESSAGE,
    )


def password_reset_policy() -> _Policy:
    s = settings
    window = s.PLATFORM_PASSWORD_RESET_WINDOW_S
    return _Policy(
        "security.password_reset_locked",
        Limit("reset:account", s.PLATFORM_PASSWORD_RESETS_PER_EMAIL, window, window),
        Limit("reset:ip", s.PLATFORM_PASSWORD_RESETS_PER_IP, window, window),
        RESET_ACCOUNT_MESSAGE,
        RESET_IP_MESSAGE,
    )


def _lockout_started(policy: _Policy, limit: Limit, until: float, *, ip: str | None, account: str | None = None) -> None:
    """A security log line, and for an existing account an audit event in each of its tenants.

    No secret in either: an account name is written only when such an account exists (a name typed into
    the wrong field could be a password).
    """
    user = get_user_model().objects.filter(username=account).first() if account is not None else None
    ends = datetime.fromtimestamp(until, tz=dt_timezone.utc)
    who = f"address {ip}" if account is None else f"account {account if user else '(no such account)'} from {ip}"
    log.warning("%s: %s reached %d in %d s; refused until %s", policy.action, who, limit.max_events, limit.window_s, ends.isoformat())
    if user is None:
        return  # unknown accounts lock the same way (no enumeration), with no tenant to tell
    data = {"user": account, "ip": ip, "attempts": limit.max_events, "window_s": limit.window_s, "locked_until": ends.isoformat()}
    with transaction.atomic():
        for membership in memberships_for_user(user):
            audit_record(tenant=membership.tenant, actor=SYSTEM, action=policy.action, target=membership, data=data)


# ---- what the forms call ------------------------------------------------------------------------------


def signin_check(request, username: str) -> None:
    """Before checking a password: raise Throttled while the account or the client's address is locked out."""
    signin_policy().check(request, username)


def signin_failed(request, username: str) -> None:
    """After a wrong password: count it; raise Throttled when this (or a concurrent) failure started a lockout."""
    policy = signin_policy()
    policy.count(request, username)
    policy.check(request, username)


def signin_succeeded(username: str) -> None:
    """A right password clears the account's failures (not the address's: one success must not reset a spray)."""
    signin_policy().per_account.clear(_account(username))


def signin_unlock(username: str) -> None:
    """A completed password reset (it proves the mailbox) lifts the account's lockout and clears its failures."""
    signin_policy().per_account.clear(_account(username), unlock=True)


SIGNUP_IP_MESSAGE = "Too many accounts were created from your network in the last hour. {when}."


def signup_requested(request) -> None:
    """Before creating an account: raise Throttled once the client's address created PLATFORM_SIGNUPS_PER_IP
    accounts in an hour, else count this one."""
    limit = Limit("signup:ip", settings.PLATFORM_SIGNUPS_PER_IP, 3600, 3600)
    ip = client_ip(request)
    if until := limit.locked_until(ip):
        when = _when(until)
        raise Throttled(SIGNUP_IP_MESSAGE.format(when=when), until)
    if until := limit.count(ip):
        log.warning("signup:ip: address %s created %d accounts in an hour; refused until %s", ip, limit.max_events,
                    datetime.fromtimestamp(until, tz=dt_timezone.utc).isoformat())


def password_reset_requested(request, email: str) -> None:
    """Before sending a reset e-mail: raise Throttled while the address or the e-mail is locked out, else count it."""
    policy = password_reset_policy()
    policy.check(request, email)
    policy.count(request, email)
