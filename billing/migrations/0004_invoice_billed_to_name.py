"""Invoices store the name they are billed to (a rename of the tenant no longer changes an issued invoice).

Existing invoices get the tenant's name as it is now: the best record there is of what they showed."""

from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def fill_billed_to_name(apps, schema_editor):
    Invoice = apps.get_model("billing", "Invoice")
    Tenant = apps.get_model("tenants", "Tenant")
    # all_tenants: the default manager (a historical model has no `objects`).
    Invoice.all_tenants.filter(billed_to_name="").update(
        billed_to_name=Subquery(Tenant.objects.filter(pk=OuterRef("tenant_id")).values("name")[:1])
    )


class Migration(migrations.Migration):

    dependencies = [
        ("billing", "0003_price_starts_tomorrow_by_default"),
        ("tenants", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="invoice",
            name="billed_to_name",
            field=models.CharField(default="", help_text="The tenant's name when the invoice was issued (what the document shows).", max_length=120),
            preserve_default=False,
        ),
        migrations.RunPython(fill_billed_to_name, migrations.RunPython.noop),
    ]
