"""Billing's Celery tasks take the tenant with the id and look the row up inside that tenant."""

from __future__ import annotations

from datetime import date

import pytest
from django.utils import timezone

from billing import tasks
from billing.models import Invoice


@pytest.mark.parametrize("task", [tasks.invoice_push, tasks.invoice_status_sync], ids=lambda t: t.name)
def test_invoice_tasks_find_the_invoice_only_in_the_tenant_they_name(world, task):
    invoice = Invoice.all_tenants.create(tenant=world.tenant, number="ACME-202601", period_start=date(2026, 1, 1),
                                         period_end=date(2026, 2, 1), closed_at=timezone.now())
    with pytest.raises(Invoice.DoesNotExist):
        task.run(invoice.pk, world.other_tenant.pk)
    assert isinstance(task.run(invoice.pk, world.tenant.pk), str)  # a draft: nothing to send or sync
