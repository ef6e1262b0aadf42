"""Rows of any model, made from its fields alone, so a test over every tenant-owned model needs no per-model code.

Each required field gets a plain value of its type (a choice field its first choice, a foreign key a row made the
same way: the same tenant's for a tenant-owned model). Values differ from call to call, so unique fields stay unique.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import models
from django.utils import timezone

from tenants.models import Tenant
from tenants.scoping import TenantOwnedModel

_serial = itertools.count(1)


def bare_tenant() -> Tenant:
    """A tenant with no rows of its own (not tenants.services.tenant_create, which adds a policy, members…)."""
    n = next(_serial)
    return Tenant.objects.create(slug=f"rows-{n}", name=f"Rows {n}")


def _value(field: models.Field, n: int):
    if field.choices:
        return field.choices[0][0]
    if isinstance(field, models.EmailField):
        return f"row{n}@rows.test"
    if isinstance(field, (models.CharField, models.TextField)):
        text = f"{field.name}-{n}"
        return text[-field.max_length:] if field.max_length else text
    if isinstance(field, models.BooleanField):
        return False
    if isinstance(field, (models.IntegerField, models.BigIntegerField, models.PositiveIntegerField)):
        return n
    if isinstance(field, models.DecimalField):
        return Decimal(0)
    if isinstance(field, models.FloatField):
        return 0.0
    if isinstance(field, models.DateTimeField):
        return timezone.now()
    if isinstance(field, models.DateField):
        return timezone.now().date()
    if isinstance(field, models.DurationField):
        return timedelta(0)
    if isinstance(field, models.JSONField):
        return {}
    if isinstance(field, models.UUIDField):
        return uuid.uuid4()
    if isinstance(field, models.BinaryField):
        return b""
    raise NotImplementedError(f"tests/tenants/rows.py: no value for {field.model.__name__}.{field.name} ({type(field).__name__})")


def make_row(model, tenant: Tenant, **given):
    """A saved row of `model` (tenant-owned: `tenant`'s) with every required field filled; `given` fields as given."""
    n = next(_serial)
    values = dict(given)
    for field in model._meta.concrete_fields:
        owned = issubclass(model, TenantOwnedModel)
        if field.name in given:
            continue
        if field.name == "tenant" and owned:
            continue  # objects.for_tenant(tenant) gives it
        if field.is_relation:
            if field.null:
                continue
            related = field.related_model
            if related is Tenant:
                values[field.name] = tenant
            elif related is get_user_model():
                values[field.name] = get_user_model().objects.create_user(username=f"rows{n}-{field.name}")
            else:
                values[field.name] = make_row(related, tenant)
        elif field.primary_key and (field.has_default() or isinstance(field, models.AutoField)):
            continue
        elif field.has_default() or field.null or field.generated:
            continue
        else:
            values[field.name] = _value(field, n)
    manager = model.objects.for_tenant(tenant) if issubclass(model, TenantOwnedModel) else model._default_manager
    return manager.create(**values)
