"""Console billing pages, included under `t/<slug:tenant_slug>/billing/`."""

from django.urls import path

from billing import views

urlpatterns = [
    path("", views.usage, name="billing-usage"),
    path("invoices/", views.invoice_list, name="billing-invoices"),
    path("invoices/<int:invoice_id>/", views.invoice_detail, name="billing-invoice"),
    path("invoices/<int:invoice_id>/print/", views.invoice_print, name="billing-invoice-print"),
    path("payment-methods/", views.payment_methods, name="billing-payment-methods"),
]
