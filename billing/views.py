"""Billing pages: tenant console (usage and cost so far, invoices, pay, payment methods), the staff cost
allocation page, and the read-only billing API under /api/tenants/<tenant_slug>/billing/.

Console views are `tenant_view`s (members read; admins write); objects are looked up inside the URL's
tenant, so another tenant's invoice id is a 404.
"""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from billing import periods, prices, rating, selectors, services, stripe_gateway
from billing.models import BillingSettings, Invoice, InvoiceLine, format_cents, format_price_per_million, utc_today
from common.charts import stacked_chart
from tenants.access import TenantContext, tenant_view
from tenants.api_base import TENANT_SLUG, TenantAPIView
from tenants.models import Role


def _render(request, ctx: TenantContext, template: str, context: dict | None = None, status: int = 200):
    return render(request, template, {"tenant": ctx.tenant, "section": "billing", "can_write": ctx.can(Role.ADMIN), **(context or {})}, status=status)


def _cents(value) -> str:
    return format_cents(prices.round_cents(Decimal(value)))


# ---- console -------------------------------------------------------------------------------------


@tenant_view()
def usage(request, ctx: TenantContext):
    """The period's spend so far (rated rows plus today's ledger) and forecast, per day and per line, unpaid invoices
    with Pay, and (admins, Stripe configured) payment methods through Stripe's Customer Portal."""
    spend = selectors.spend_so_far(tenant=ctx.tenant)
    cost, currency = spend.cost, spend.currency
    # Every day of the period so far, days without usage included (the chart's x axis is time).
    days = [cost.period + timedelta(days=i) for i in range((min(utc_today(), spend.period_last_day) - cost.period).days + 1)]
    # Split by model, as the Usage page's tokens chart is (one series: plain bars).
    models = sorted({m for per_model in cost.daily_model_cents.values() for m in per_model})
    series = [(m, [cost.daily_model_cents.get(day, {}).get(m, Decimal(0)) for day in days]) for m in models]
    chart = stacked_chart([f"{day:%d %b}" for day in days], series, height=160, fmt=lambda cents: f"{_cents(cents)} {currency}")
    lines = [{"line": line, "input_price": _price(line, "input_price"), "output_price": _price(line, "output_price"),
              "training_price": _price(line, "training_price")} for line in cost.lines]
    price_rows, price_currency = selectors.price_list(tenant=ctx.tenant)
    return _render(request, ctx, "billing/usage.html", {
        "price_rows": price_rows, "price_currency": price_currency,
        "spend": spend, "cost": cost, "lines": lines, "chart": chart, "currency": currency, "period_last_day": spend.period_last_day,
        "open_invoices": selectors.unpaid_invoices(tenant=ctx.tenant), "stripe_configured": stripe_gateway.is_configured(),
    })


def _price(line: rating.RatedLine, field: str) -> str | None:
    """A line's price per million tokens in the currency's units ("0.075"), or None without a price."""
    return format_price_per_million(getattr(line.price, field)) if line.price is not None else None


@tenant_view()
def invoice_list(request, ctx: TenantContext):
    return _render(request, ctx, "billing/invoices.html", {"invoices": selectors.invoices_for(tenant=ctx.tenant)})


def _invoice_or_404(ctx: TenantContext, invoice_id: int) -> Invoice:
    invoice = selectors.invoice_get(tenant=ctx.tenant, invoice_id=invoice_id)
    if invoice is None:
        raise Http404("No such invoice.")
    return invoice


@tenant_view()
def invoice_detail(request, ctx: TenantContext, invoice_id: int):
    invoice = _invoice_or_404(ctx, invoice_id)
    lines = InvoiceLine.objects.for_tenant(ctx.tenant).filter(invoice=invoice)
    return _render(request, ctx, "billing/invoice.html", {"invoice": invoice, "lines": lines})


@tenant_view()
def invoice_print(request, ctx: TenantContext, invoice_id: int):
    invoice = _invoice_or_404(ctx, invoice_id)
    lines = InvoiceLine.objects.for_tenant(ctx.tenant).filter(invoice=invoice)
    return render(request, "billing/invoice_print.html", {"tenant": ctx.tenant, "invoice": invoice, "lines": lines})


@tenant_view()
@require_POST
def payment_methods(request, ctx: TenantContext):
    """Admins: open Stripe's Customer Portal (payment methods, invoice history)."""
    back = request.build_absolute_uri(reverse("billing-usage", args=[ctx.tenant.slug]))
    try:
        url = services.portal_url(tenant=ctx.tenant, return_url=back)
    except stripe_gateway.GatewayError:
        url = None
    if not url:
        messages.warning(request, "Online payment is not available yet, so payment methods cannot be managed here. "
                                  "Contact support to pay an invoice or to change how you pay.")
        return redirect("billing-usage", ctx.tenant.slug)
    return redirect(url)


# ---- staff ---------------------------------------------------------------------------------------


@staff_member_required
def staff_allocation(request):
    """Staff: per pool and per tenant, allocated GPU cost beside revenue, for a month (?period=YYYY-MM)."""
    current = period = selectors.current_period()
    raw = request.GET.get("period", "")
    if raw:
        try:
            period = date.fromisoformat(f"{raw}-01")
        except ValueError:
            messages.error(request, "Use a period like 2026-01.")
    if period > current:
        messages.warning(request, f"{period:%B %Y} has not started yet; showing {current:%B %Y}.")
        period = current
    first = selectors.first_usage_period() or current
    pools, tenants = selectors.cost_allocation(period=period)
    margins = [{"slug": row.tenant.slug, "cost": row.cost_cents, "revenue": row.revenue_cents, "margin": row.margin_cents} for row in tenants]
    top = max([max(m["cost"], m["revenue"]) for m in margins] or [1]) or 1
    for i, m in enumerate(margins):
        m["y"] = 8 + i * 26
        m["cost_w"] = round(m["cost"] / top * 400, 1)
        m["revenue_w"] = round(m["revenue"] / top * 400, 1)
    return render(request, "billing/staff_allocation.html", {
        "period": period, "pools": pools, "tenants": tenants, "margins": margins,
        "chart_height": 16 + 26 * len(margins),
        # Links only to months that have started, and not to months before the first usage (nothing to allocate).
        "previous": periods.previous_period(period) if period > first else None,
        "next": periods.next_period(period) if period < current else None,
    })


# ---- API -----------------------------------------------------------------------------------------


class UsageLineOutput(serializers.Serializer):
    kind = serializers.CharField()
    model = serializers.CharField()
    adapter = serializers.CharField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    trained_tokens = serializers.IntegerField()
    input_price = serializers.DecimalField(max_digits=18, decimal_places=6, help_text="Cents per million tokens.")
    output_price = serializers.DecimalField(max_digits=18, decimal_places=6, help_text="Cents per million tokens.")
    training_price = serializers.DecimalField(max_digits=18, decimal_places=6, help_text="Cents per million tokens.")
    amount_cents = serializers.IntegerField()


class UsageOutput(serializers.Serializer):
    period_start = serializers.DateField()
    period_end = serializers.DateField(help_text="Exclusive.")
    currency = serializers.CharField()
    total_cents = serializers.IntegerField()
    lines = UsageLineOutput(many=True)
    daily_cents = serializers.DictField(child=serializers.CharField(), help_text="Unrounded cents per UTC day.")


def _line_data(line) -> dict:
    price = line.price
    return {
        "kind": line.kind, "model": line.model, "adapter": line.adapter, "input_tokens": line.input_tokens,
        "output_tokens": line.output_tokens, "trained_tokens": line.trained_tokens,
        "input_price": price.input_price if price else 0, "output_price": price.output_price if price else 0,
        "training_price": price.training_price if price else 0, "amount_cents": line.amount_cents,
    }


class BillingUsageApi(TenantAPIView):
    """Cost so far in the current period, per model/adapter line (C = T_in·p_in + T_out·p_out, cents)."""

    @extend_schema(operation_id="billing_usage_retrieve", parameters=[TENANT_SLUG], responses=UsageOutput)
    def get(self, request, tenant_slug):
        """Cost so far in the current billing period: one line per model/adapter with tokens, prices and cents, the
        total, and cents per UTC day. Any member, or an API key with management:read or management:write. 404 when
        the tenant is not yours.
        """
        cost = selectors.period_cost_so_far(tenant=self.ctx.tenant)
        return Response(UsageOutput({
            "period_start": cost.period, "period_end": periods.next_period(cost.period), "currency": BillingSettings.load().currency,
            "total_cents": cost.total_cents, "lines": [_line_data(l) for l in cost.lines],
            "daily_cents": {d.isoformat(): str(c) for d, c in cost.daily_cents.items()},
        }).data)


class InvoiceOutput(serializers.Serializer):
    id = serializers.IntegerField()
    number = serializers.CharField()
    billed_to_name = serializers.CharField(help_text="The tenant's name when the invoice was issued.")
    period_start = serializers.DateField()
    period_end = serializers.DateField()
    status = serializers.CharField()
    currency = serializers.CharField()
    total_cents = serializers.IntegerField()
    closed_at = serializers.DateTimeField()
    paid_at = serializers.DateTimeField(allow_null=True)
    voided_at = serializers.DateTimeField(allow_null=True)
    void_pending = serializers.BooleanField(help_text="Voided by staff; Stripe has not confirmed yet. Nothing is owed.")
    delivery = serializers.CharField()
    hosted_invoice_url = serializers.CharField(allow_blank=True)


class InvoiceLineOutput(serializers.Serializer):
    kind = serializers.CharField()
    model = serializers.CharField()
    adapter = serializers.CharField()
    description = serializers.CharField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    trained_tokens = serializers.IntegerField()
    input_price = serializers.DecimalField(max_digits=18, decimal_places=6)
    output_price = serializers.DecimalField(max_digits=18, decimal_places=6)
    training_price = serializers.DecimalField(max_digits=18, decimal_places=6)
    amount_cents = serializers.IntegerField()


class InvoiceDetailOutput(InvoiceOutput):
    lines = InvoiceLineOutput(many=True)


class BillingInvoiceListApi(TenantAPIView):
    @extend_schema(operation_id="billing_invoices_list", parameters=[TENANT_SLUG], responses=InvoiceOutput(many=True))
    def get(self, request, tenant_slug):
        """The tenant's invoices, newest period first (paginated). Any member, or an API key with management:read or
        management:write. 404 when the tenant is not yours.
        """
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(selectors.invoices_for(tenant=self.ctx.tenant), request, view=self)
        return paginator.get_paginated_response(InvoiceOutput(page, many=True).data)


class BillingInvoiceDetailApi(TenantAPIView):
    @extend_schema(operation_id="billing_invoices_retrieve", parameters=[TENANT_SLUG], responses=InvoiceDetailOutput)
    def get(self, request, tenant_slug, invoice_id):
        """One invoice with its lines. Any member, or an API key with management:read or management:write. 404 for an
        invoice id that is not this tenant's.
        """
        invoice = self.get_scoped_or_404(Invoice, pk=invoice_id)
        invoice.lines_data = list(self.scoped(InvoiceLine).filter(invoice=invoice))
        data = InvoiceOutput(invoice).data
        data["lines"] = InvoiceLineOutput(invoice.lines_data, many=True).data
        return Response(data)
