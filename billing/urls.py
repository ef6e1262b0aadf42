"""Billing routes outside the console.

- `urlpatterns` (include at the site root): the Stripe webhook and the staff cost-allocation page.
- `api_tenant_patterns` (include under `api/tenants/<slug:tenant_slug>/billing/`): the read-only billing API.
"""

from django.urls import path

from billing import views, webhooks

urlpatterns = [
    path("webhooks/stripe/", webhooks.stripe_webhook, name="billing-stripe-webhook"),
    path("staff/billing/allocation/", views.staff_allocation, name="billing-staff-allocation"),
]

api_tenant_patterns = [
    path("usage/", views.BillingUsageApi.as_view(), name="api-billing-usage"),
    path("invoices/", views.BillingInvoiceListApi.as_view(), name="api-billing-invoice-list"),
    path("invoices/<int:invoice_id>/", views.BillingInvoiceDetailApi.as_view(), name="api-billing-invoice-detail"),
]
