"""Tenants, who belongs to them, their API keys, system prompts, policies and the audit log."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta, timezone as dt_timezone

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.utils import timezone

from tenants.scoping import TenantOwnedModel

slug_validator = RegexValidator(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$", "Use 1–40 lowercase letters, digits and hyphens; start and end with a letter or digit.")


class Tenant(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        SUSPENDED = "suspended", "Suspended"

    class Tenancy(models.TextChoices):
        SHARED = "shared", "Shared model"
        ADAPTER = "adapter", "Adapter on a shared base (hybrid)"
        ISOLATED = "isolated", "Isolated (dedicated backends)"

    slug = models.SlugField(max_length=40, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=120)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    suspended_reason = models.CharField(max_length=300, blank=True)
    tenancy = models.CharField(max_length=16, choices=Tenancy.choices, default=Tenancy.SHARED)
    active_prompt = models.ForeignKey(
        "tenants.SystemPromptVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_active(self) -> bool:
        return self.status == self.Status.ACTIVE


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    VIEWER = "viewer", "Viewer"


# Higher rank can do everything a lower rank can.
ROLE_RANK = {Role.VIEWER: 0, Role.DEVELOPER: 1, Role.ADMIN: 2, Role.OWNER: 3}


class Membership(TenantOwnedModel):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="one_membership_per_user_and_tenant")]
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant_id} ({self.role})"

    def has_role(self, minimum: str) -> bool:
        return ROLE_RANK[Role(self.role)] >= ROLE_RANK[Role(minimum)]


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Invitation(TenantOwnedModel):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")  # blank: an API key invites too
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]

    @staticmethod
    def new_token() -> tuple[str, str]:
        """Return (token for the link, hash to store). Only the hash is kept."""
        token = secrets.token_urlsafe(32)
        return token, _token_hash(token)

    @staticmethod
    def hash_token(token: str) -> str:
        return _token_hash(token)

    @property
    def state(self) -> str:
        if self.accepted_at:
            return "accepted"
        if self.revoked_at:
            return "revoked"
        if self.expires_at <= timezone.now():
            return "expired"
        return "pending"


class ApiKey(TenantOwnedModel):
    """An API key. The secret is shown once; only its SHA-256 is stored (keys carry 256 bits of entropy)."""

    class Scope(models.TextChoices):
        INFERENCE = "inference", "Inference"
        FINETUNE = "finetune", "Fine-tuning"
        MANAGEMENT_READ = "management:read", "Management (read)"
        MANAGEMENT_WRITE = "management:write", "Management (write)"

    PREFIX_LEN = 12
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=32, unique=True, help_text="Visible part of the key, used for lookup.")
    secret_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Per-key controls, within the tenant's (0 = no limit of the key's own; the tenant's limits still apply).
    requests_per_minute = models.PositiveIntegerField(default=0, help_text="0 = only the tenant's limit.")
    tokens_per_minute = models.PositiveIntegerField(default=0, help_text="0 = only the tenant's limit.")
    monthly_token_budget = models.PositiveBigIntegerField(default=0, help_text="Tokens per calendar month (UTC); 0 = none.")
    monthly_budget_cents = models.PositiveBigIntegerField(default=0, help_text="Spend per calendar month (UTC), in cents; 0 = none.")
    allowed_models = models.JSONField(default=list, blank=True, help_text="Model names this key may call (within the tenant's); empty = all of the tenant's.")
    # Rotation: the secret before the last rotation stays valid until `previous_valid_until`, then is refused.
    previous_secret_hash = models.CharField(max_length=64, blank=True)
    previous_valid_until = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def previous_secret_valid(self, now=None) -> bool:
        """Whether the secret replaced by the last rotation is still accepted (its grace period has not ended)."""
        return bool(self.previous_secret_hash and self.previous_valid_until and self.previous_valid_until > (now or timezone.now()))

    @property
    def state(self) -> str:
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= timezone.now():
            return "expired"
        return "active"

    @property
    def is_usable(self) -> bool:
        return self.state == "active"

    @property
    def expires_on(self):
        """The last UTC day the key works, as its expiry was picked: an expiry at 00:00 UTC (the console's "Expires on
        30 Jun 2027" is stored as 1 Jul 2027 00:00, the end of 30 Jun) belongs to the day before. None: never expires."""
        if self.expires_at is None:
            return None
        return (self.expires_at.astimezone(dt_timezone.utc) - timedelta(microseconds=1)).date()

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


class SystemPromptVersion(TenantOwnedModel):
    """One saved version of a tenant's system prompt. Versions are never edited; a save makes a new one."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    version = models.PositiveIntegerField()
    text = models.TextField(blank=True)
    note = models.CharField(max_length=200, blank=True)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "version"], name="unique_prompt_version_per_tenant")]
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"v{self.version}"


class QuotaWindow(models.TextChoices):
    DAY = "day", "Day"
    MONTH = "month", "Month"


class QuotaMode(models.TextChoices):
    SOFT = "soft", "Soft (warn at 80 %, throttle at 100 %)"
    HARD = "hard", "Hard (reject at 100 %)"


class Policy(TenantOwnedModel):
    """A tenant's limits and scheduling weight. Set by staff; enforced by the gateway. 0 means unlimited."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="policy")
    weight = models.PositiveIntegerField(default=1, validators=[MinValueValidator(1), MaxValueValidator(1000)])
    fair_share = models.BooleanField(
        default=False, help_text="Derive the window quota from the weight: Q = R_total · w / Σ w over fair-share tenants."
    )
    quota_tokens = models.PositiveBigIntegerField(default=0, help_text="Tokens per window; 0 = unlimited.")
    quota_window = models.CharField(max_length=8, choices=QuotaWindow.choices, default=QuotaWindow.MONTH)
    quota_mode = models.CharField(max_length=8, choices=QuotaMode.choices, default=QuotaMode.SOFT)
    requests_per_minute = models.PositiveIntegerField(default=0, help_text="0 = unlimited.")
    tokens_per_minute = models.PositiveIntegerField(default=0, help_text="0 = unlimited.")
    max_concurrent_requests = models.PositiveIntegerField(default=0, help_text="0 = unlimited.")
    budget_ceiling_cents = models.PositiveBigIntegerField(
        default=0, help_text="Staff's ceiling on the tenant's monthly spend, in cents: a hard limit, and the most its admins may set "
                             "as their budget; 0 = no ceiling.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        verbose_name_plural = "policies"

    def __str__(self) -> str:
        return f"policy of {self.tenant_id}"


class PlatformSettings(models.Model):
    """Platform-wide knobs set by staff. One row (pk=1)."""

    fair_share_total_tokens = models.PositiveBigIntegerField(
        default=0, help_text="R_total: tokens per window shared among fair-share tenants by weight."
    )
    # The plan a self-service tenant (sign-up, "new tenant" in the console) starts on; staff raise it per tenant.
    # Unlimited by default meant free, unmetered GPU for anyone with an e-mail address until the first invoice.
    new_tenant_quota_tokens = models.PositiveBigIntegerField(default=1_000_000, help_text="New self-service tenants: tokens per window; 0 = unlimited.")
    new_tenant_quota_window = models.CharField(max_length=8, choices=QuotaWindow.choices, default=QuotaWindow.MONTH)
    new_tenant_quota_mode = models.CharField(max_length=8, choices=QuotaMode.choices, default=QuotaMode.HARD)
    new_tenant_requests_per_minute = models.PositiveIntegerField(default=60, help_text="0 = unlimited.")
    new_tenant_tokens_per_minute = models.PositiveIntegerField(default=100_000, help_text="0 = unlimited.")
    new_tenant_max_concurrent_requests = models.PositiveIntegerField(default=4, help_text="0 = unlimited.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = verbose_name_plural = "platform settings"

    def __str__(self) -> str:
        return "Platform settings"

    @classmethod
    def load(cls) -> "PlatformSettings":
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def new_tenant_plan(self) -> dict:
        """Policy fields for a new self-service tenant."""
        return {name: getattr(self, f"new_tenant_{name}") for name in (
            "quota_tokens", "quota_window", "quota_mode", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests")}


class AuditEvent(TenantOwnedModel):
    """Who changed what, when. Append-only."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor_is_staff = models.BooleanField(default=False)
    action = models.CharField(max_length=64, db_index=True)
    target_type = models.CharField(max_length=40, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor or self.actor_key or 'system'}"

    @property
    def actor_label(self) -> str:
        if self.actor_id:
            return f"{self.actor.email or self.actor.username}{' (staff)' if self.actor_is_staff else ''}"
        if self.actor_key_id:
            return f"API key “{self.actor_key.name}” ({self.actor_key.prefix}…)"
        return "system"

    @property
    def details(self) -> list[tuple[str, str]]:
        """The event's data as (label, text) pairs people read: "quota tokens: 0 → 5,000,000", "scopes: finetune, inference"."""
        return [(key.replace("_", " "), describe_value(value)) for key, value in self.data.items()]


def describe_value(value) -> str:
    """One audit value in words: numbers with separators, yes/no, lists joined, {from, to} changes as an arrow."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(describe_value(v) for v in value) or "—"
    if isinstance(value, dict):
        if set(value) == {"from", "to"}:
            return f"{describe_value(value['from'])} → {describe_value(value['to'])}"
        return "; ".join(f"{k.replace('_', ' ')}: {describe_value(v)}" for k, v in value.items())
    return str(value)


class BudgetMode(models.TextChoices):
    SOFT = "soft", "Soft (alerts only)"
    HARD = "hard", "Hard (refuse requests past it)"


def budget_hard_limit_cents(*, budget_cents: int, mode: str, ceiling_cents: int) -> int:
    """Spend per month past which requests are refused, in cents (0 = never): the staff ceiling, or the tenant's own
    hard budget when lower. A soft budget only alerts."""
    limits = [c for c in (ceiling_cents, budget_cents if mode == BudgetMode.HARD else 0) if c]
    return min(limits) if limits else 0


class SpendBudget(TenantOwnedModel):
    """A tenant's own monthly money budget, set by its admins within the staff ceiling (Policy.budget_ceiling_cents)."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="spend_budget")
    monthly_cents = models.PositiveBigIntegerField(default=0, help_text="Spend per calendar month (UTC), in cents; 0 = none.")
    mode = models.CharField(max_length=8, choices=BudgetMode.choices, default=BudgetMode.SOFT)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        pass

    def __str__(self) -> str:
        return f"budget of {self.tenant_id}"


def default_thresholds() -> list[int]:
    return [50, 80, 100]


class AlertSettings(TenantOwnedModel):
    """Where a tenant's alerts go: e-mail to chosen members, and optionally a signed webhook to its HTTPS endpoint."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="alert_settings")
    thresholds = models.JSONField(default=default_thresholds, help_text="Percentages of a budget or quota, e.g. [50, 80, 100].")
    recipients = models.ManyToManyField(Membership, blank=True, related_name="+", help_text="Members e-mailed when a threshold is crossed.")
    webhook_url = models.URLField(max_length=500, blank=True, help_text="HTTPS endpoint; public addresses only.")
    webhook_secret = models.CharField(max_length=64, blank=True, help_text="Signs each delivery (HMAC-SHA256).")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        pass


class AlertEvent(TenantOwnedModel):
    """One threshold crossed, once per subject, period and threshold (the unique constraint makes it fire once)."""

    class Subject(models.TextChoices):
        BUDGET = "budget", "Monthly budget"
        QUOTA = "quota", "Token quota"
        KEY_BUDGET = "key_budget", "Key's monthly budget"
        KEY_TOKENS = "key_tokens", "Key's monthly tokens"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=16, choices=Subject.choices)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    scope = models.CharField(max_length=40, help_text="What is measured: 'tenant' or 'key:<id>'.")
    period = models.CharField(max_length=8, help_text="YYYYMM, or YYYYMMDD for a daily quota.")
    threshold = models.PositiveSmallIntegerField(help_text="Percent.")
    used = models.PositiveBigIntegerField(help_text="Tokens, or cents for a budget, when it fired.")
    limit = models.PositiveBigIntegerField(help_text="Tokens, or cents for a budget.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "subject", "scope", "period", "threshold"], name="alert_once_per_threshold_and_period")]


class WebhookDelivery(TenantOwnedModel):
    """One webhook delivery (an alert, or a re-send of one) and how it went."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        DELIVERED = "delivered", "Delivered"
        FAILED = "failed", "Failed"
        REFUSED = "refused", "Refused (address not allowed)"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    event = models.ForeignKey(AlertEvent, null=True, blank=True, on_delete=models.SET_NULL, related_name="deliveries")
    url = models.URLField(max_length=500)
    body = models.TextField(help_text="The JSON sent, byte for byte (what the signature covers with the timestamp).")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)
    resend_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at", "-id"]
