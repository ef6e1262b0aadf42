"""Staff tools: prices, billing settings, invoices (close a period, push to Stripe, void, mark uncollectible), Stripe events."""

from __future__ import annotations

from datetime import date

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path

from billing import invoicing, services, stripe_gateway
from billing.models import BillingAccount, BillingSettings, DailyUsage, Invoice, InvoiceLine, Price, StripeEvent, utc_today
from billing.tasks import invoice_push
from tenants.admin import AllTenantsAdmin
from tenants.models import Tenant
from tenants.services import Actor


class PriceForm(forms.ModelForm):
    reprice_confirmed = forms.BooleanField(
        required=False, label="Reprice usage already rated",
        help_text="Needed for a start from the 1st of this month up to today: the entry then also prices usage already "
                  "rated this month, and tenants' cost so far changes. Days of ended or invoiced months are never allowed.",
    )

    # No Meta: the admin builds the form for Price with its own field callback, which offers every tenant's
    # adapters through AllTenantsAdmin (a form class built here would ask Adapter's default manager, which refuses).

    def clean(self):
        cleaned = super().clean()
        self.instance.reprice_confirmed = bool(cleaned.get("reprice_confirmed"))  # read by Price.clean (model validation)
        return cleaned


@admin.register(Price)
class PriceAdmin(AllTenantsAdmin, admin.ModelAdmin):
    form = PriceForm
    list_display = ("base_model", "adapter", "pool", "input_price", "output_price", "training_price", "effective_from")
    list_filter = ("base_model",)
    autocomplete_fields = ("adapter",)  # searched by name or tenant (AdapterAdmin's search fields)
    readonly_fields = ("created_at",)

    def get_actions(self, request):
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would skip the per-entry check below
        return actions

    def has_change_permission(self, request, obj=None):
        # A price in force for a past day is history: change prices by adding an entry with a new date.
        if obj is not None and obj.effective_from <= utc_today():
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        # Removing an entry in force would reprice the days it priced, as much as editing it would.
        if obj is not None and obj.effective_from <= utc_today():
            return False
        return super().has_delete_permission(request, obj)


@admin.register(BillingSettings)
class BillingSettingsAdmin(admin.ModelAdmin):
    list_display = ("__str__", "grace_days", "days_until_due", "currency")


@admin.register(BillingAccount)
class BillingAccountAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("tenant", "stripe_customer_id", "suspended_for_nonpayment")
    search_fields = ("tenant__slug", "stripe_customer_id")


class InvoiceLineInline(AllTenantsAdmin, admin.TabularInline):
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


class StaffStatusForm(forms.Form):
    reason = forms.CharField(
        max_length=300, widget=forms.Textarea(attrs={"rows": 3, "cols": 70}),
        help_text="Required. Kept with the invoice and in the tenant's audit log, which the tenant's admins can read.",
    )


# status -> (service, button label, what it means), for the void / mark-uncollectible pages.
STAFF_STATUS_CHANGES = {
    Invoice.Status.VOID: (services.invoice_void, "Void", (
        "Voiding writes the amount off: the usage is not billed again, the tenant owes nothing for this invoice, and a "
        "suspension for non-payment that rests only on it is lifted. If Stripe holds the invoice it is voided there "
        "first; until Stripe confirms, the invoice shows “void pending”. Paid invoices cannot be voided (refund them in Stripe).")),
    Invoice.Status.UNCOLLECTIBLE: (services.invoice_mark_uncollectible, "Mark uncollectible", (
        "Records the amount as bad debt. The invoice stays payable and dunning still applies. "
        "Only open invoices can be marked; if Stripe holds the invoice it is marked there first.")),
}


@admin.register(Invoice)
class InvoiceAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("number", "tenant", "period_start", "status", "pending_status", "total_cents", "delivery", "closed_at")
    list_filter = ("status", "pending_status", "delivery", "period_start")
    search_fields = ("number", "tenant__slug", "stripe_invoice_id")
    readonly_fields = [f.name for f in Invoice._meta.fields]
    inlines = [InvoiceLineInline]
    actions = ["push_to_stripe", "void_selected", "mark_uncollectible_selected"]
    change_list_template = "billing/admin_invoice_changelist.html"
    change_form_template = "billing/admin_invoice_change_form.html"

    def has_add_permission(self, request):
        return False

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("close-period/", view(self.close_period_view), name="billing_invoice_close_period"),
            path("<int:invoice_id>/void/", view(self.status_view), {"status": Invoice.Status.VOID}, name="billing_invoice_void"),
            path("<int:invoice_id>/mark-uncollectible/", view(self.status_view), {"status": Invoice.Status.UNCOLLECTIBLE},
                 name="billing_invoice_mark_uncollectible"),
            *super().get_urls(),
        ]

    def status_view(self, request, invoice_id, status):
        """The "Void…" / "Mark uncollectible…" buttons of one invoice: a reason, then the change."""
        invoice = get_object_or_404(self.get_queryset(request).select_related("tenant"), pk=invoice_id)  # every tenant's
        if not self.has_change_permission(request, invoice):
            raise PermissionDenied
        return self._staff_status_change(request, [invoice], status) or redirect("admin:billing_invoice_change", invoice.pk)

    @admin.action(description="Void selected invoices… (asks for a reason)", permissions=["change"])
    def void_selected(self, request, queryset):
        return self._staff_status_change(request, list(queryset.select_related("tenant")), Invoice.Status.VOID, action="void_selected")

    @admin.action(description="Mark selected invoices uncollectible… (asks for a reason)", permissions=["change"])
    def mark_uncollectible_selected(self, request, queryset):
        return self._staff_status_change(request, list(queryset.select_related("tenant")), Invoice.Status.UNCOLLECTIBLE,
                                         action="mark_uncollectible_selected")

    def _staff_status_change(self, request, invoices, status, action=""):
        """Ask for the reason; once given, apply to each invoice and explain each refusal. None when done."""
        service, label, meaning = STAFF_STATUS_CHANGES[status]
        form = StaffStatusForm(request.POST if "apply" in request.POST else None)
        if not form.is_valid():
            return render(request, "billing/admin_invoice_status.html", {
                **self.admin_site.each_context(request), "title": f"{label}: {', '.join(i.number for i in invoices)}",
                "form": form, "invoices": invoices, "label": label, "meaning": meaning, "action": action, "opts": self.model._meta,
            })
        for invoice in invoices:
            try:
                outcome = service(invoice=invoice, reason=form.cleaned_data["reason"], actor=Actor(user=request.user))
            except ValidationError as exc:
                self.message_user(request, f"Not changed: {exc.messages[0]}", messages.ERROR)
            else:
                self.message_user(request, outcome, messages.SUCCESS)
        return None

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
            invoice_push.delay(invoice.pk, invoice.tenant_id)
        self.message_user(request, "Queued.")


@admin.register(StripeEvent)
class StripeEventAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("event_id", "type", "created", "source", "invoice", "outcome")
    list_filter = ("type", "source")
    search_fields = ("event_id",)


@admin.register(DailyUsage)
class DailyUsageAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("tenant", "day", "period", "kind", "model", "adapter", "pool", "input_tokens", "output_tokens", "trained_tokens")
    list_filter = ("kind", "period")

    def has_change_permission(self, request, obj=None):
        return False

    def has_add_permission(self, request):
        return False
