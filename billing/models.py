"""Billing: prices (staff), the daily usage rollup, invoices and their lines, Stripe events, dunning state.

Money is integer cents; prices are `Decimal` cents per million tokens with 6 decimal places (so a price
of $0.075 per million tokens is 7.5, exactly). A rated amount is rounded once, per invoice line, half up.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta, timezone as dt_timezone
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Max
from django.utils import timezone

from serving.models import Adapter, BackendPool, BaseModel
from tenants.models import Tenant
from tenants.scoping import TenantOwnedModel

PRICE_FIELD = dict(max_digits=18, decimal_places=6, default=0)


def utc_today() -> date:
    return timezone.now().astimezone(dt_timezone.utc).date()


def utc_tomorrow() -> date:
    """The first day a new price can start without repricing usage already rated (the default)."""
    return utc_today() + timedelta(days=1)


def price_start_error(day: date, *, today: date, confirmed: bool = False) -> str | None:
    """Why a price entry may not start on `day` (None when it may). One rule for new entries and moved ones:

    * never on a day of a period that has ended or has an issued invoice: past periods never change;
    * from the 1st of the open month up to today only when staff confirm: it reprices usage already rated,
      which tenants see in their cost so far;
    * from tomorrow (UTC) on freely: nothing rated yet is priced by it.
    """
    open_from = today.replace(day=1)
    invoiced = Invoice.all_tenants.order_by().aggregate(end=Max("period_end"))["end"]  # batch check over every tenant
    if invoiced and invoiced > day:
        last = Invoice.all_tenants.filter(period_end__gt=day).order_by("-period_end", "number").first()
        return (f"{day:%d %b %Y} lies in a billing period already invoiced ({last.number}, {last.period_start:%B %Y}); "
                f"past periods never change. Choose {max(open_from, invoiced):%d %b %Y} or later.")
    if day < open_from:
        return (f"{day:%d %b %Y} lies in a billing period that has ended ({day:%B %Y}); its invoices use the prices "
                f"in force then, and past periods never change. Choose {open_from:%d %b %Y} or later.")
    if day <= today and not confirmed:
        return (f"From {day:%d %b %Y} this price would reprice usage already rated this month, which tenants already see "
                f"in their cost so far. Choose {today + timedelta(days=1):%d %b %Y} or later, or tick "
                "“Reprice usage already rated” to apply it to those days on purpose.")
    return None


class Price(models.Model):
    """A price list entry set by staff. In force from `effective_from` (00:00 UTC) until a later entry.

    The most specific entry wins: one for the adapter, else one for the dedicated pool, else the base
    model's. A change is a new row; old rows are kept so past periods keep their prices. An entry in force
    is history (not changed); when a new or moved entry may start: `price_start_error`.
    """

    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="+")
    adapter = models.ForeignKey(Adapter, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="Only for this adapter (optional).")
    pool = models.ForeignKey(BackendPool, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="Only on this (dedicated) pool (optional).")
    input_price = models.DecimalField(**PRICE_FIELD, help_text="Cents per million input tokens (6 decimals).")
    output_price = models.DecimalField(**PRICE_FIELD, help_text="Cents per million output tokens (6 decimals).")
    training_price = models.DecimalField(**PRICE_FIELD, help_text="Cents per million trained tokens (6 decimals).")
    effective_from = models.DateField(default=utc_tomorrow, help_text="In force from 00:00 UTC of this day.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["base_model__name", "-effective_from"]
        constraints = [
            models.UniqueConstraint(fields=["base_model", "adapter", "pool", "effective_from"], name="unique_price_per_scope_and_day"),
        ]

    def __str__(self) -> str:
        scope = self.adapter.name if self.adapter_id else (f"pool {self.pool.name}" if self.pool_id else "")
        return f"{self.base_model.name}{' · ' + scope if scope else ''} from {self.effective_from}"

    # Staff confirmed that this entry may reprice usage already rated this month (the admin form's checkbox).
    # Not stored: it only widens what `clean` accepts for this save.
    reprice_confirmed = False

    def clean(self):
        if self.adapter_id and self.pool_id:
            raise ValidationError("Set an adapter or a pool, not both.")
        if self.adapter_id and self.adapter.base_model_id != self.base_model_id:
            raise ValidationError({"adapter": "This adapter is trained on another base model."})
        if self.pool_id and self.pool.base_model_id != self.base_model_id:
            raise ValidationError({"pool": "This pool serves another base model."})
        today = utc_today()
        stored = Price.objects.filter(pk=self.pk).values_list("effective_from", flat=True).first() if self.pk else None
        if stored is not None and stored <= today:
            raise ValidationError(f"This entry is in force since {stored:%d %b %Y}: it is history and cannot be changed. "
                                  "Add a new entry with a later date instead.")
        if self.effective_from is not None:
            error = price_start_error(self.effective_from, today=today, confirmed=self.reprice_confirmed)
            if error:
                raise ValidationError({"effective_from": error})


class BillingSettings(models.Model):
    """Platform billing knobs set by staff. One row (pk=1); also the lock that serialises rating and closing."""

    grace_days = models.PositiveIntegerField(default=7, help_text="Days after a failed payment before the tenant is suspended.")
    days_until_due = models.PositiveIntegerField(default=14, help_text="Stripe invoices are due this many days after they are sent.")
    currency = models.CharField(max_length=3, default="usd")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = verbose_name_plural = "billing settings"

    def __str__(self) -> str:
        return "Billing settings"

    @classmethod
    def load(cls) -> "BillingSettings":
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj


class BillingAccount(TenantOwnedModel):
    """A tenant's billing identity at Stripe, and whether *billing* suspended it."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="billing_account")
    stripe_customer_id = models.CharField(max_length=64, blank=True)
    suspended_for_nonpayment = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        pass

    def __str__(self) -> str:
        return f"billing account of {self.tenant_id}"


class DailyUsage(TenantOwnedModel):
    """The ledger rolled up per (tenant, day, kind, model, adapter, pool), attributed to a billing `period`.

    Normally `period` is the month of `day`. Rows rated after that month was closed for the tenant
    (late usage) are attributed to the period open when they were rated; closed periods' rows are frozen.
    """

    class Kind(models.TextChoices):
        INFERENCE = "inference", "Inference"
        TRAINING = "training", "Training"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    period = models.DateField(help_text="First day of the billing month this row is billed in.")
    day = models.DateField(help_text="UTC day the usage happened.")
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.INFERENCE)
    model = models.CharField(max_length=200)
    adapter = models.CharField(max_length=200, blank=True)
    pool = models.ForeignKey(BackendPool, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    trained_tokens = models.BigIntegerField(default=0)
    duration_ms = models.BigIntegerField(default=0)

    class Meta(TenantOwnedModel.Meta):
        indexes = [
            models.Index(fields=["day", "period"], name="dailyusage_day_period"),
            models.Index(fields=["tenant", "period"], name="dailyusage_tenant_period"),
        ]
        ordering = ["day", "model", "adapter"]


class InvalidTransition(ValidationError):
    pass


class Invoice(TenantOwnedModel):
    """One invoice per tenant and billing month. States only move forward; paid and void are final.

    Staff may void an unpaid invoice or mark an open one uncollectible. When Stripe holds (or may hold) the
    invoice, the move waits for Stripe: `pending_status` says what was asked, `status` what is confirmed.
    """

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        OPEN = "open", "Open"
        PAID = "paid", "Paid"
        VOID = "void", "Void"
        UNCOLLECTIBLE = "uncollectible", "Uncollectible"

    class Delivery(models.TextChoices):
        NOT_SENT = "not_sent", "Not sent (Stripe not configured)"
        PENDING = "pending", "Sending to Stripe"
        SENT = "sent", "Sent"
        NOT_NEEDED = "not_needed", "Nothing to collect"

    # from-state -> states it may move to. Uncollectible may still be paid or voided (as at Stripe).
    TRANSITIONS = {
        Status.DRAFT: {Status.OPEN, Status.VOID},
        Status.OPEN: {Status.PAID, Status.VOID, Status.UNCOLLECTIBLE},
        Status.UNCOLLECTIBLE: {Status.PAID, Status.VOID},
        Status.PAID: set(),
        Status.VOID: set(),
    }

    uuid = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    number = models.CharField(max_length=60, unique=True)
    billed_to_name = models.CharField(max_length=120, help_text="The tenant's name when the invoice was issued (what the document shows).")
    period_start = models.DateField()
    period_end = models.DateField(help_text="Exclusive: the first day of the next period.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT)
    currency = models.CharField(max_length=3, default="usd")
    total_cents = models.BigIntegerField(default=0)
    closed_at = models.DateTimeField(help_text="When the period was closed; usage rated later goes to the next period.")
    finalized_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    voided_at = models.DateTimeField(null=True, blank=True)
    payment_failed_at = models.DateTimeField(null=True, blank=True, help_text="First failed payment: the dunning clock.")
    delivery = models.CharField(max_length=12, choices=Delivery.choices, default=Delivery.NOT_SENT)
    stripe_invoice_id = models.CharField(max_length=64, blank=True, db_index=True)
    hosted_invoice_url = models.URLField(max_length=500, blank=True)
    delivery_error = models.CharField(max_length=300, blank=True)
    pending_status = models.CharField(
        max_length=16, blank=True, choices=[(Status.VOID, "Void"), (Status.UNCOLLECTIBLE, "Uncollectible")],
        help_text="Asked for by staff, waiting for Stripe to confirm; cleared when the invoice reaches it or a final state.",
    )
    status_reason = models.CharField(max_length=300, blank=True, help_text="Why staff voided it or marked it uncollectible (also in the tenant's audit log).")
    status_requested_at = models.DateTimeField(null=True, blank=True, help_text="When staff asked for the pending status.")

    class Meta(TenantOwnedModel.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "period_start"], name="one_invoice_per_tenant_and_period")]
        ordering = ["-period_start"]

    def __str__(self) -> str:
        return self.number

    def can_move_to(self, status: str) -> bool:
        return status in self.TRANSITIONS[self.Status(self.status)]

    def move_to(self, status: str, *, at=None) -> bool:
        """Move forward to `status` (saved atomically against concurrent moves).

        Returns False when already there (a repeated event); raises InvalidTransition on a backwards move.
        """
        if self.status == status:
            return False
        if not self.can_move_to(status):
            raise InvalidTransition(f"Invoice {self.number} cannot go from {self.status} to {status}.")
        at = at or timezone.now()
        changes = {"status": status}
        if status == self.Status.OPEN:
            changes["finalized_at"] = at
        elif status == self.Status.PAID:
            changes["paid_at"] = at
        elif status == self.Status.VOID:
            changes["voided_at"] = at
        if self.pending_status and (status == self.pending_status or not self.TRANSITIONS[self.Status(status)]):
            changes["pending_status"] = ""  # reached what staff asked for, or a final state that overrides it
        # Claim the move: only succeeds from the state we read, so two workers cannot both apply it.
        claimed = self.own_row().filter(status=self.status).update(**changes)
        if claimed != 1:
            self.refresh_from_db()
            return self.move_to(status, at=at) if self.status != status else False
        for key, value in changes.items():
            setattr(self, key, value)
        return True

    @property
    def is_final(self) -> bool:
        return not self.TRANSITIONS[self.Status(self.status)]

    @property
    def void_pending(self) -> bool:
        """Staff voided it; Stripe has not confirmed yet. Nothing is to be paid or chased meanwhile."""
        return self.pending_status == self.Status.VOID

    @property
    def period_last_day(self) -> date:
        """The period's last day (period_end is exclusive): what a person reads on the invoice."""
        return self.period_end - timedelta(days=1)

    @property
    def total(self) -> str:
        return format_cents(self.total_cents)


def format_cents(cents: int) -> str:
    """Whole cents as money for people: 123456 → "1,234.56", -150 → "-1.50" (the one formatter of billing)."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100:,}.{cents % 100:02d}"


def format_price_per_million(cents_per_million) -> str:
    """A price in cents per million tokens as currency units per million, every significant digit kept and at least
    two decimals: 50 → "0.50", 7.5 → "0.075", 1234 → "12.34", 150000 → "1,500.00"."""
    units = (Decimal(cents_per_million) / 100).normalize()
    exponent = -units.as_tuple().exponent
    return f"{units:,.{max(2, exponent)}f}"


class InvoiceLine(TenantOwnedModel):
    """One line: a model/adapter (or training) at one price, tokens × price, rounded half up to a cent."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    kind = models.CharField(max_length=10, choices=DailyUsage.Kind.choices)
    model = models.CharField(max_length=200)
    adapter = models.CharField(max_length=200, blank=True)
    pool_name = models.CharField(max_length=100, blank=True)
    price = models.ForeignKey(Price, null=True, on_delete=models.PROTECT, related_name="+")
    input_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    trained_tokens = models.BigIntegerField(default=0)
    input_price = models.DecimalField(**PRICE_FIELD)
    output_price = models.DecimalField(**PRICE_FIELD)
    training_price = models.DecimalField(**PRICE_FIELD)
    amount_cents = models.BigIntegerField(default=0)
    description = models.CharField(max_length=300)
    stripe_invoice_item_id = models.CharField(max_length=64, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["id"]

    @property
    def amount(self) -> str:
        return format_cents(self.amount_cents)


class StripeEvent(models.Model):
    """Each Stripe event applied once: stored in the same transaction as its effect (event_id is unique)."""

    event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    created = models.DateTimeField(help_text="When Stripe created the event.")
    received_at = models.DateTimeField(default=timezone.now)
    source = models.CharField(max_length=12, default="webhook", help_text="webhook or reconcile")
    invoice = models.ForeignKey(Invoice, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    outcome = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"
