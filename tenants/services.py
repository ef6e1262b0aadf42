"""Writes on tenants and what belongs to them. Every service records its audit event in the same transaction."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from common.text import sentence
from tenants.models import (
    AlertSettings,
    ApiKey,
    AuditEvent,
    BudgetMode,
    Invitation,
    Membership,
    PlatformSettings,
    Policy,
    Role,
    SpendBudget,
    SystemPromptVersion,
    Tenant,
)

User = get_user_model()
KEY_PREFIX = "mtl_"


@dataclass(frozen=True)
class Actor:
    """Who performs a change: a signed-in user, an API key, or the system (user=None, key=None)."""

    user: object | None = None
    key: ApiKey | None = None

    @property
    def is_staff(self) -> bool:
        return bool(self.user is not None and getattr(self.user, "is_staff", False))


SYSTEM = Actor()


def audit_record(*, tenant: Tenant, actor: Actor, action: str, target=None, data: dict | None = None) -> AuditEvent:
    """Append one audit event. Call inside the transaction of the change it describes."""
    user = actor.user if actor.user is not None and actor.user.is_authenticated else None
    return AuditEvent.objects.for_tenant(tenant).create(
        tenant=tenant,
        actor=user,
        actor_key=actor.key,
        actor_is_staff=actor.is_staff,
        action=action,
        target_type=type(target).__name__ if target is not None else "",
        target_id=str(getattr(target, "pk", "")) if target is not None else "",
        data=data or {},
    )


# ---- tenants and members -------------------------------------------------------------------------


@transaction.atomic
def tenant_create(*, slug: str, name: str, owner, tenancy: str = Tenant.Tenancy.SHARED, self_service: bool = False) -> Tenant:
    """Create a tenant, its policy and its first owner.

    `self_service` (sign-up, "new tenant" in the console): the tenant starts on the staff-defined plan of limits
    (PlatformSettings.new_tenant_*), and a user may own at most PLATFORM_MAX_TENANTS_PER_USER tenants. Staff and
    the platform's own tools create tenants unlimited.
    """
    if self_service and not owner.is_staff:
        owned = Membership.all_tenants.filter(user=owner, role=Role.OWNER).count()  # all_tenants: the user's, across tenants
        if owned >= settings.PLATFORM_MAX_TENANTS_PER_USER:
            raise ValidationError({"slug": f"You already own {owned} tenants, the most one account may create. "
                                           "Ask the platform team for more."})
    tenant = Tenant(slug=slug, name=name, tenancy=tenancy)
    tenant.full_clean()
    tenant.save()
    plan = PlatformSettings.load().new_tenant_plan() if self_service else {}
    Policy.objects.for_tenant(tenant).create(tenant=tenant, **plan)
    Membership.objects.for_tenant(tenant).create(tenant=tenant, user=owner, role=Role.OWNER)
    audit_record(tenant=tenant, actor=Actor(user=owner), action="tenant.created", target=tenant, data={"slug": slug})
    return tenant


@transaction.atomic
def tenant_rename(*, tenant: Tenant, name: str, actor: Actor) -> Tenant:
    """Rename a tenant (the display name; the slug, used in URLs, never changes)."""
    old = tenant.name
    tenant.name = name.strip()
    try:
        tenant.full_clean(validate_unique=False)
    except ValidationError:
        tenant.name = old  # the caller's object must not show a name that was refused
        raise
    Tenant.objects.filter(pk=tenant.pk).update(name=tenant.name)
    if old != tenant.name:
        audit_record(tenant=tenant, actor=actor, action="tenant.renamed", target=tenant, data={"from": old, "to": tenant.name})
    return tenant


@transaction.atomic
def tenant_set_status(*, tenant: Tenant, status: str, actor: Actor, reason: str = "") -> Tenant:
    """Suspend or reactivate a tenant. A suspended tenant's API calls are refused."""
    if status not in Tenant.Status.values:
        raise ValidationError({"status": f"Unknown status {status!r}."})
    Tenant.objects.filter(pk=tenant.pk).update(status=status, suspended_reason=reason if status == "suspended" else "")
    tenant.refresh_from_db()
    audit_record(tenant=tenant, actor=actor, action=f"tenant.{'suspended' if status == 'suspended' else 'reactivated'}", target=tenant, data={"reason": reason})
    return tenant


def _lock_owners(tenant: Tenant) -> int:
    """Lock this tenant's owner rows and count them, so two concurrent removals cannot both pass."""
    return len(list(Membership.objects.for_tenant(tenant).select_for_update().filter(role=Role.OWNER).values_list("id", flat=True)))


@transaction.atomic
def membership_change_role(*, membership: Membership, role: str, actor: Actor) -> Membership:
    """Change a member's role. The last owner cannot be demoted."""
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}: use one of {', '.join(Role.values)}."})
    tenant = membership.tenant
    if membership.role == Role.OWNER and role != Role.OWNER and _lock_owners(tenant) <= 1:
        raise ValidationError({"role": "A tenant must keep at least one owner: make someone else owner first."})
    old = membership.role
    Membership.objects.for_tenant(tenant).filter(pk=membership.pk).update(role=role)
    membership.role = role
    audit_record(tenant=tenant, actor=actor, action="member.role_changed", target=membership, data={"user": membership.user.email, "from": old, "to": role})
    return membership


@transaction.atomic
def membership_remove(*, membership: Membership, actor: Actor) -> None:
    """Remove a member (or leave, when the actor is that member). The last owner cannot go."""
    tenant = membership.tenant
    if membership.role == Role.OWNER and _lock_owners(tenant) <= 1:
        raise ValidationError({"membership": "The last owner cannot leave or be removed: make someone else owner first."})
    email = membership.user.email
    action = "member.left" if actor.user is not None and actor.user.pk == membership.user_id else "member.removed"
    audit_record(tenant=tenant, actor=actor, action=action, target=membership, data={"user": email, "role": membership.role})
    Membership.objects.for_tenant(tenant).filter(pk=membership.pk).delete()


# ---- invitations ---------------------------------------------------------------------------------


def invitation_url(token: str) -> str:
    return f"{settings.PUBLIC_URL}/invitations/{token}/"


@transaction.atomic
def invitation_create(*, tenant: Tenant, email: str, role: str, actor: Actor) -> tuple[Invitation, str]:
    """Invite someone by e-mail. Returns (invitation, token); the token is only in the e-mailed link."""
    email = User.objects.normalize_email(email).strip().lower()
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}: use one of {', '.join(Role.values)}."})
    if Membership.objects.for_tenant(tenant).filter(user__email__iexact=email).exists():
        raise ValidationError({"email": f"{email} is already a member of {sentence(tenant.name)}"})
    hour_ago = timezone.now() - timedelta(hours=1)
    recent = Invitation.objects.for_tenant(tenant).select_for_update().filter(created_at__gte=hour_ago).order_by("created_at")
    sent = list(recent.values_list("created_at", flat=True))
    if len(sent) >= settings.PLATFORM_INVITATIONS_PER_HOUR:
        at = sent[len(sent) - settings.PLATFORM_INVITATIONS_PER_HOUR] + timedelta(hours=1)
        raise ValidationError({"email": f"This tenant has sent {len(sent)} invitations in the last hour, the most it may; "
                                        f"try again after {at:%H:%M} UTC."})
    token, token_hash = Invitation.new_token()
    invitation = Invitation(
        tenant=tenant,
        email=email,
        role=role,
        token_hash=token_hash,
        invited_by=actor.user if actor.user is not None and actor.user.is_authenticated else None,
        expires_at=timezone.now() + timedelta(hours=settings.INVITATION_TTL_HOURS),
    )
    invitation.full_clean()
    invitation.save()
    audit_record(tenant=tenant, actor=actor, action="invitation.created", target=invitation, data={"email": email, "role": role})
    link = invitation_url(token)
    inviter = invitation.invited_by.email if invitation.invited_by else "the platform team"
    # The tenant's name is whatever its creator typed ("Your account is locked – verify now"): never the subject,
    # and quoted in the body as a name, beside who sent the invitation.
    transaction.on_commit(
        lambda: send_mail(
            subject="Invitation to a team on the LLM platform",
            message=(
                f"{inviter} invited you to join the team named “{tenant.name[:80]}” (console id: {tenant.slug}) "
                f"as {role} on the LLM platform.\n\n"
                f"Accept within {settings.INVITATION_TTL_HOURS} hours: {link}\n\n"
                "If you do not know the sender, ignore this e-mail: nothing happens unless you accept.\n"
            ),
            from_email=None,
            recipient_list=[email],
            fail_silently=True,
        )
    )
    return invitation, token


def invitation_by_token(token: str) -> Invitation | None:
    """The invitation a link points to (any tenant: the token itself is the credential)."""
    return Invitation.all_tenants.select_related("tenant").filter(token_hash=Invitation.hash_token(token)).first()


@transaction.atomic
def invitation_accept(*, token: str, user) -> Membership:
    """Accept an invitation link as `user`. Expired, revoked and used links are refused."""
    invitation = Invitation.all_tenants.select_for_update().filter(token_hash=Invitation.hash_token(token)).first()
    if invitation is None:
        raise ValidationError({"token": "This invitation link is not valid. Ask for a new invitation."})
    if invitation.state != "pending":
        raise ValidationError({"token": f"This invitation is {invitation.state}. Ask an admin of the tenant for a new one."})
    tenant = invitation.tenant
    try:
        with transaction.atomic():
            membership = Membership.objects.for_tenant(tenant).create(tenant=tenant, user=user, role=invitation.role)
    except IntegrityError:
        raise ValidationError({"token": f"You are already a member of {sentence(tenant.name)}"}) from None
    invitation.accepted_at = timezone.now()
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    audit_record(tenant=tenant, actor=Actor(user=user), action="invitation.accepted", target=invitation, data={"email": invitation.email, "role": invitation.role})
    return membership


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor: Actor) -> None:
    if invitation.state != "pending":
        raise ValidationError({"invitation": f"This invitation is already {invitation.state}."})
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_record(tenant=invitation.tenant, actor=actor, action="invitation.revoked", target=invitation, data={"email": invitation.email})


# ---- API keys ------------------------------------------------------------------------------------


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@transaction.atomic
def api_key_create(
    *, tenant: Tenant, name: str, scopes: list[str], actor: Actor, expires_at: datetime | None = None
) -> tuple[ApiKey, str]:
    """Create a key. Returns (key, full secret); the secret is shown once and never stored."""
    errors = {}
    if not name.strip():
        errors["name"] = "Give the key a name, e.g. 'production' or 'ci'."
    elif len(name) > 100:
        errors["name"] = "Use at most 100 characters."
    if not scopes:
        errors["scopes"] = "Choose at least one scope."
    unknown = sorted(set(scopes) - set(ApiKey.Scope.values))
    if unknown:
        errors["scopes"] = f"Unknown scope(s): {', '.join(unknown)}. Use: {', '.join(ApiKey.Scope.values)}."
    if expires_at is not None and expires_at <= timezone.now():
        errors["expires_at"] = "The expiry must be in the future."
    if errors:
        raise ValidationError(errors)
    prefix = KEY_PREFIX + secrets.token_hex(ApiKey.PREFIX_LEN // 2)
    full = f"{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.for_tenant(tenant).create(
        tenant=tenant,
        name=name.strip(),
        prefix=prefix,
        secret_hash=_hash_secret(full),
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
        created_by=actor.user if actor.user is not None and actor.user.is_authenticated else None,
    )
    audit_record(tenant=tenant, actor=actor, action="api_key.created", target=key, data={"name": key.name, "prefix": prefix, "scopes": key.scopes})
    return key, full


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor: Actor) -> ApiKey:
    """Revoke a key. Idempotent; the gateway's key cache drops it within about a second."""
    if key.revoked_at is None:
        ApiKey.objects.for_tenant(key.tenant_id).filter(pk=key.pk).update(revoked_at=timezone.now())
        key.refresh_from_db()
        audit_record(tenant=key.tenant, actor=actor, action="api_key.revoked", target=key, data={"name": key.name, "prefix": key.prefix})
    return key


MAX_ROTATION_GRACE = timedelta(days=30)
KEY_CONTROL_FIELDS = ("requests_per_minute", "tokens_per_minute", "monthly_token_budget", "monthly_budget_cents", "allowed_models")


@transaction.atomic
def api_key_rotate(*, key: ApiKey, grace: timedelta, actor: Actor) -> tuple[ApiKey, str]:
    """Give the key a new secret (same prefix, id, limits and usage). The old secret stays valid for `grace` (0 to 30
    days), then is refused; a second rotation ends the first one's grace at once (only one old secret is kept).
    Returns (key, new full secret); the secret is shown once and never stored."""
    if grace < timedelta(0) or grace > MAX_ROTATION_GRACE:
        raise ValidationError({"grace": "Choose a grace period from 0 to 30 days."})
    key = ApiKey.objects.for_tenant(key.tenant_id).select_for_update().get(pk=key.pk)
    if not key.is_usable:
        raise ValidationError({"key": f"This key is {key.state}; create a new key instead."})
    now = timezone.now()
    full = f"{key.prefix}_{secrets.token_urlsafe(32)}"
    key.previous_secret_hash = key.secret_hash if grace > timedelta(0) else ""
    key.previous_valid_until = now + grace if grace > timedelta(0) else None
    key.secret_hash = _hash_secret(full)
    key.rotated_at = now
    key.save(update_fields=["secret_hash", "previous_secret_hash", "previous_valid_until", "rotated_at"])
    audit_record(tenant=key.tenant, actor=actor, action="api_key.rotated", target=key,
                 data={"name": key.name, "prefix": key.prefix, "old_secret_valid_until": key.previous_valid_until.isoformat() if key.previous_valid_until else "now"})
    return key, full


@transaction.atomic
def api_key_controls_update(*, key: ApiKey, actor: Actor, tenant_models, **changes) -> ApiKey:
    """Set a key's own limits: requests/min, tokens/min, monthly tokens, monthly spend (cents) and allowed models.

    0 (or an empty model list) means the key has no limit of its own; the tenant's limits apply either way.
    `tenant_models`: the model names the tenant may call (serving.routing.tenant_routes); allowed models must be
    among them. Validates every field before saving any; records one audit event with what changed."""
    unknown = sorted(set(changes) - set(KEY_CONTROL_FIELDS))
    if unknown:
        raise ValidationError({name: "Unknown key control." for name in unknown})
    errors = {}
    for name in KEY_CONTROL_FIELDS[:4]:
        if name in changes and (not isinstance(changes[name], int) or isinstance(changes[name], bool) or changes[name] < 0):
            errors[name] = "Use a whole number, 0 or more (0 = no limit of the key's own)."
    if "allowed_models" in changes:
        models_ = changes["allowed_models"]
        if not isinstance(models_, (list, tuple)) or not all(isinstance(m, str) for m in models_):
            errors["allowed_models"] = "Give a list of model names."
        else:
            missing = sorted(set(models_) - set(tenant_models))
            if missing:
                errors["allowed_models"] = f"Not among this tenant's models: {', '.join(missing)}."
            changes["allowed_models"] = sorted(set(models_))
    if errors:
        raise ValidationError(errors)
    key = ApiKey.objects.for_tenant(key.tenant_id).select_for_update().get(pk=key.pk)
    before = {name: getattr(key, name) for name in changes}
    for name, value in changes.items():
        setattr(key, name, value)
    key.save(update_fields=list(changes) or None)
    diff = {name: {"from": before[name], "to": getattr(key, name)} for name in changes if before[name] != getattr(key, name)}
    if diff:
        audit_record(tenant=key.tenant, actor=actor, action="api_key.limits_changed", target=key, data={"key": key.prefix, **diff})
    return key


def split_key(raw: str) -> tuple[str, str] | None:
    """`mtl_<12 hex>_<secret>` -> (prefix, raw). None if it is not shaped like one of our keys."""
    n = len(KEY_PREFIX) + ApiKey.PREFIX_LEN
    if not raw.startswith(KEY_PREFIX) or len(raw) <= n + 1 or raw[n] != "_":
        return None
    return raw[:n], raw


def api_key_find(raw: str) -> ApiKey | None:
    """The key a presented secret belongs to, whatever its state (revoked, expired), or None. Lookup by prefix,
    constant-time hash comparison; the secret a rotation replaced counts until its grace period ends. Callers check
    `key.is_usable` (or `key.state`, to say why not)."""
    parts = split_key(raw.strip())
    if parts is None:
        return None
    prefix, full = parts
    key = ApiKey.all_tenants.select_related("tenant").filter(prefix=prefix).first()
    if key is None:
        return None
    digest = _hash_secret(full)
    if hmac.compare_digest(key.secret_hash, digest):
        return key
    if key.previous_secret_valid() and hmac.compare_digest(key.previous_secret_hash, digest):
        return key
    return None


def api_key_authenticate(raw: str) -> ApiKey | None:
    """The usable key for a presented secret, or None."""
    key = api_key_find(raw)
    return key if key is not None and key.is_usable else None


def api_key_touch(key: ApiKey, *, min_interval_s: int = 60) -> None:
    """Record last use, at most once a minute per key (a write per request would be waste)."""
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() >= min_interval_s:
        ApiKey.objects.for_tenant(key.tenant_id).filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now


# ---- system prompts ------------------------------------------------------------------------------


@transaction.atomic
def system_prompt_save(*, tenant: Tenant, text: str, note: str, actor: Actor, activate: bool = True) -> SystemPromptVersion:
    """Save a new version of the system prompt; make it active unless `activate` is False (a draft: the console saves
    drafts, to be tried in the playground and then activated with `system_prompt_activate`)."""
    errors = {}
    if len(text) > settings.PLATFORM_MAX_PROMPT_CHARS:
        errors["text"] = f"The prompt has {len(text)} characters; the limit is {settings.PLATFORM_MAX_PROMPT_CHARS}."
    if len(note) > 200:
        errors["note"] = "Use at most 200 characters."
    if errors:
        raise ValidationError(errors)
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()  # serialise version numbering per tenant
    last = SystemPromptVersion.objects.for_tenant(tenant).aggregate(m=Max("version"))["m"] or 0
    version = SystemPromptVersion.objects.for_tenant(tenant).create(
        tenant=tenant, version=last + 1, text=text, note=note.strip(), author=actor.user if actor.user is not None and actor.user.is_authenticated else None
    )
    if activate:
        Tenant.objects.filter(pk=tenant.pk).update(active_prompt=version)
        tenant.active_prompt = version
    audit_record(tenant=tenant, actor=actor, action="prompt.saved", target=version,
                 data={"version": version.version, "note": version.note, "activated": activate})
    return version


@transaction.atomic
def system_prompt_activate(*, tenant: Tenant, version: SystemPromptVersion, actor: Actor) -> SystemPromptVersion:
    """Make an existing version active (a roll back or forward). The version must be this tenant's."""
    if version.tenant_id != tenant.pk:
        raise ValidationError({"version": "No such version."})
    previous = tenant.active_prompt.version if tenant.active_prompt_id else None
    Tenant.objects.filter(pk=tenant.pk).update(active_prompt=version)
    tenant.active_prompt = version
    audit_record(tenant=tenant, actor=actor, action="prompt.activated", target=version, data={"version": version.version, "previous": previous})
    return version


# ---- policies ------------------------------------------------------------------------------------

POLICY_FIELDS = (
    "weight",
    "fair_share",
    "quota_tokens",
    "quota_window",
    "quota_mode",
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "budget_ceiling_cents",
)


@transaction.atomic
def policy_update(*, tenant: Tenant, actor: Actor, **changes) -> Policy:
    """Change a tenant's limits (staff only at the API layer). Validates every field before saving any."""
    unknown = sorted(set(changes) - set(POLICY_FIELDS))
    if unknown:
        raise ValidationError({name: "Unknown policy field." for name in unknown})
    policy = Policy.objects.for_tenant(tenant).select_for_update().get()
    before = {name: getattr(policy, name) for name in changes}
    for name, value in changes.items():
        setattr(policy, name, value)
    policy.full_clean()
    policy.save()
    diff = {name: {"from": before[name], "to": getattr(policy, name)} for name in changes if before[name] != getattr(policy, name)}
    if diff:
        audit_record(tenant=tenant, actor=actor, action="policy.updated", target=policy, data=diff)
    return policy


# ---- money budget and alerts -------------------------------------------------------------------


@transaction.atomic
def spend_budget_set(*, tenant: Tenant, monthly_cents: int, mode: str, actor: Actor) -> SpendBudget:
    """Set the tenant's monthly money budget (cents; 0 = none) and its mode: soft (alerts only) or hard (requests
    past it are refused). Must not exceed the staff ceiling (Policy.budget_ceiling_cents) when one is set."""
    errors = {}
    if not isinstance(monthly_cents, int) or isinstance(monthly_cents, bool) or monthly_cents < 0:
        errors["monthly_cents"] = "Use a whole number of cents, 0 or more (0 = no budget)."
    if mode not in BudgetMode.values:
        errors["mode"] = f"Use one of: {', '.join(BudgetMode.values)}."
    ceiling = Policy.objects.for_tenant(tenant).values_list("budget_ceiling_cents", flat=True).first() or 0
    if not errors and ceiling and monthly_cents > ceiling:
        errors["monthly_cents"] = (f"The most you can set is {ceiling / 100:,.2f}, the ceiling the platform team set for this "
                                   "tenant; ask them to raise it.")
    if errors:
        raise ValidationError(errors)
    budget, _ = SpendBudget.objects.for_tenant(tenant).select_for_update().get_or_create(tenant=tenant)
    before = {"monthly_cents": budget.monthly_cents, "mode": budget.mode}
    budget.monthly_cents, budget.mode = monthly_cents, mode
    budget.save()
    diff = {k: {"from": v, "to": getattr(budget, k)} for k, v in before.items() if v != getattr(budget, k)}
    if diff:
        audit_record(tenant=tenant, actor=actor, action="budget.updated", target=budget, data=diff)
    return budget


def alert_settings_get(*, tenant: Tenant) -> AlertSettings:
    """The tenant's alert settings, created with the defaults (50/80/100 %, no recipient, no webhook) on first use."""
    settings_, _ = AlertSettings.objects.for_tenant(tenant).get_or_create(tenant=tenant)
    return settings_


@transaction.atomic
def alert_settings_update(*, tenant: Tenant, actor: Actor, thresholds: list[int] | None = None,
                          recipient_ids: list[int] | None = None, webhook_url: str | None = None) -> AlertSettings:
    """Change where alerts go. `thresholds`: 1 to 10 percentages, 1–1000; `recipient_ids`: membership ids of this
    tenant; `webhook_url`: an https:// URL or "" (checked again, against private addresses, at every delivery).
    A webhook secret is made when a URL is first set (alert_webhook_secret_rotate makes a new one)."""
    from urllib.parse import urlsplit

    current = alert_settings_get(tenant=tenant)
    errors = {}
    if thresholds is not None:
        if (not isinstance(thresholds, (list, tuple)) or not 1 <= len(thresholds) <= 10
                or not all(isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 1000 for t in thresholds)):
            errors["thresholds"] = "Give 1 to 10 whole percentages from 1 to 1000, e.g. 50, 80, 100."
    members = []
    if recipient_ids is not None:
        members = list(Membership.objects.for_tenant(tenant).filter(pk__in=list(recipient_ids)))
        if len(members) != len(set(recipient_ids)):
            errors["recipient_ids"] = "Choose members of this tenant."
    if webhook_url:
        parts = urlsplit(webhook_url)
        if parts.scheme != "https" and not settings.PLATFORM_WEBHOOKS_ALLOW_LOOPBACK:
            errors["webhook_url"] = "Use an https:// URL."
        elif not parts.hostname or parts.username or parts.password or len(webhook_url) > 500:
            errors["webhook_url"] = "Use a URL like https://example.com/hooks/llm (no user name or password in it)."
    if errors:
        raise ValidationError(errors)
    changed = {}
    if thresholds is not None and sorted(set(thresholds)) != current.thresholds:
        changed["thresholds"] = {"from": current.thresholds, "to": sorted(set(thresholds))}
        current.thresholds = sorted(set(thresholds))
    if webhook_url is not None and webhook_url != current.webhook_url:
        changed["webhook_url"] = {"from": current.webhook_url, "to": webhook_url}
        current.webhook_url = webhook_url
        if webhook_url and not current.webhook_secret:
            current.webhook_secret = "whsec_" + secrets.token_hex(24)
    current.save()
    if recipient_ids is not None:
        before = sorted(m.user.email for m in current.recipients.select_related("user"))
        current.recipients.set(members)
        after = sorted(m.user.email for m in members)
        if before != after:
            changed["recipients"] = {"from": before, "to": after}
    if changed:
        audit_record(tenant=tenant, actor=actor, action="alerts.updated", target=current, data=changed)
    return current


@transaction.atomic
def alert_webhook_secret_rotate(*, tenant: Tenant, actor: Actor) -> AlertSettings:
    """A new webhook signing secret (the old one stops signing at once)."""
    current = alert_settings_get(tenant=tenant)
    current.webhook_secret = "whsec_" + secrets.token_hex(24)
    current.save(update_fields=["webhook_secret", "updated_at"])
    audit_record(tenant=tenant, actor=actor, action="alerts.webhook_secret_rotated", target=current)
    return current


# ---- console playground --------------------------------------------------------------------------

PLAYGROUND_PREFIX = "pgt_"
PLAYGROUND_TTL_S = 3600
PLAYGROUND_ROLE = Role.DEVELOPER  # the least role that may use the playground (console page and gateway alike)


def playground_token_issue(*, tenant: Tenant, user, system_prompt: str | None = None) -> str:
    """A short-lived inference credential for the console's playground, signed, never stored.

    The gateway accepts it like an API key with the inference scope, for this tenant only, for an hour, and
    only while the user is still an active member of the tenant with at least PLAYGROUND_ROLE. With
    `system_prompt` (the text of one of the tenant's prompt versions, e.g. a draft to try), the gateway applies that
    text instead of the live system prompt to the token's requests; it is signed with the rest, so only the console
    can choose it.
    """
    from django.core import signing

    data = {"t": tenant.pk, "u": user.pk}
    if system_prompt is not None:
        data["p"] = system_prompt
    return PLAYGROUND_PREFIX + signing.dumps(data, salt="playground", compress=True)


@dataclass(frozen=True)
class PlaygroundToken:
    tenant_id: int
    user_id: int
    system_prompt: str | None  # None: the tenant's live system prompt


def playground_token_read(raw: str) -> PlaygroundToken | None:
    """What a valid, unexpired playground token says, else None."""
    from django.core import signing

    if not raw.startswith(PLAYGROUND_PREFIX):
        return None
    try:
        data = signing.loads(raw[len(PLAYGROUND_PREFIX) :], salt="playground", max_age=PLAYGROUND_TTL_S)
    except signing.BadSignature:
        return None
    return PlaygroundToken(int(data["t"]), int(data["u"]), data.get("p"))


def playground_token_verify(raw: str) -> tuple[int, int] | None:
    """(tenant id, user id) of a valid, unexpired playground token, else None."""
    token = playground_token_read(raw)
    return (token.tenant_id, token.user_id) if token else None
