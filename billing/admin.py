"""Staff tools: prices, billing settings, invoices (close a period on demand, push to Stripe), Stripe events."""

from __future__ import annotations

from datetime import date

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect, render
from django.urls import path

from billing import invoicing, stripe_gateway
from billing.models import BillingAccount, BillingSettings, DailyUsage, Invoice, InvoiceLine, Price, StripeEvent
from billing.tasks import invoice_push
from tenants.models import Tenant
from tenants.services import Actor


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = ("base_model", "adapter", "pool", "input_price", "output_price", "training_price", "effective_from")
    list_filter = ("base_model",)
    autocomplete_fields = ()
    raw_id_fields = ("adapter",)

    def has_change_permission(self, request, obj=None):
        # A price in force for a past day is history: change prices by adding an entry with a new date.
        if obj is not None and obj.effective_from <= date.today():
            return False
        return super().has_change_permission(request, obj)


@admin.register(BillingSettings)
class BillingSettingsAdmin(admin.ModelAdmin):
    list_display = ("__str__", "grace_days", "days_until_due", "currency")


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = ("tenant", "stripe_customer_id", "suspended_for_nonpayment")
    search_fields = ("tenant__slug", "stripe_customer_id")


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    can_delete = False
    fields = ("description", "input_tokens", "output_tokens", "trained_tokens", "input_price", "output_price", "training_price", "amount_cents", "stripe_invoice_item_id")
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


class ClosePeriodForm(forms.Form):
    period = forms.CharField(help_text="Month to close, YYYY-MM (must have ended).")
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.all(), required=False, help_text="Empty = every tenant with usage.")

    def clean_period(self):
        try:
            return date.fromisoformat(f"{self.cleaned_data['period']}-01")
        except ValueError:
            raise ValidationError("Use YYYY-MM, e.g. 2026-01.") from None


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin):
    list_display = ("number", "tenant", "period_start", "status", "total_cents", "delivery", "closed_at")
    list_filter = ("status", "delivery", "period_start")
    search_fields = ("number", "tenant__slug", "stripe_invoice_id")
    readonly_fields = [f.name for f in Invoice._meta.fields]
    inlines = [InvoiceLineInline]
    actions = ["push_to_stripe"]
    change_list_template = "billing/admin_invoice_changelist.html"

    def has_add_permission(self, request):
        return False

    def get_urls(self):
        return [path("close-period/", self.admin_site.admin_view(self.close_period_view), name="billing_invoice_close_period"), *super().get_urls()]

    def close_period_view(self, request):
        form = ClosePeriodForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                invoices = invoicing.period_close(period=form.cleaned_data["period"], tenant=form.cleaned_data["tenant"], actor=Actor(user=request.user))
            except ValidationError as exc:
                form.add_error("period", exc.messages[0])
            else:
                self.message_user(request, f"Closed {form.cleaned_data['period']:%B %Y}: {len(invoices)} invoice(s) issued.", messages.SUCCESS)
                return redirect("admin:billing_invoice_changelist")
        return render(request, "billing/admin_close_period.html", {**self.admin_site.each_context(request), "form": form, "title": "Close a billing period"})

    @admin.action(description="Push to Stripe (safe to repeat)")
    def push_to_stripe(self, request, queryset):
        if not stripe_gateway.is_configured():
            self.message_user(request, "Stripe is not configured (STRIPE_SECRET_KEY).", messages.ERROR)
            return
        for invoice in queryset.filter(status=Invoice.Status.OPEN):
            invoice_push.delay(invoice.pk)
        self.message_user(request, "Queued.")


@admin.register(StripeEvent)
class StripeEventAdmin(admin.ModelAdmin):
    list_display = ("event_id", "type", "created", "source", "invoice", "outcome")
    list_filter = ("type", "source")
    search_fields = ("event_id",)


@admin.register(DailyUsage)
class DailyUsageAdmin(admin.ModelAdmin):
    list_display = ("tenant", "day", "period", "kind", "model", "adapter", "pool", "input_tokens", "output_tokens", "trained_tokens")
    list_filter = ("kind", "period")

    def has_change_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False
