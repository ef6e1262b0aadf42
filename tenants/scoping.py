"""Fail-closed tenant scoping, the one mechanism every tenant-owned model uses.

`Model.objects` refuses to build a query until it is told the tenant: `Model.objects.for_tenant(t)`.
Any other use (`Model.objects.all()`, `.filter(...)`, `.get(...)`) raises `UnscopedQueryError`, so a
forgotten filter is a crash in tests, never a leak in production. The escape hatch for staff tools,
migrations and Django's own machinery is `Model.all_tenants`, a name that stands out in review.
"""

from __future__ import annotations

from django.db import models


class UnscopedQueryError(RuntimeError):
    """A tenant-owned model was queried without a tenant."""


class TenantScopedManager(models.Manager):
    def get_queryset(self):
        raise UnscopedQueryError(
            f"{self.model.__name__}.objects needs a tenant: use {self.model.__name__}.objects.for_tenant(tenant) "
            f"(or {self.model.__name__}.all_tenants for staff-only code)."
        )

    def for_tenant(self, tenant) -> models.QuerySet:
        if tenant is None or getattr(tenant, "pk", tenant) is None:
            raise UnscopedQueryError(f"{self.model.__name__}.objects.for_tenant() was given no tenant.")
        tenant_id = getattr(tenant, "pk", tenant)
        return super().get_queryset().filter(tenant_id=tenant_id)


class TenantOwnedModel(models.Model):
    """Base for every model that belongs to one tenant."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")

    objects = TenantScopedManager()
    all_tenants = models.Manager()

    class Meta:
        abstract = True
        # Django's internals (admin, related lookups, cascades) use the plain manager; our code uses `objects`.
        default_manager_name = "all_tenants"
        base_manager_name = "all_tenants"
