"""Fail-closed tenant scoping, the one mechanism every tenant-owned model uses.

`Model.objects` refuses to build a query until it is told the tenant: `Model.objects.for_tenant(t)`.
Any other use (`Model.objects.all()`, `.filter(...)`, `.get(...)`) raises `UnscopedQueryError`, so a
forgotten filter is a crash in tests, never a leak in production. Rows are created the same way:
`Model.objects.for_tenant(t).create(...)` (also get_or_create, update_or_create, bulk_create) makes them the
tenant's, and refuses a `tenant` that is another. The escape hatch for staff tools, migrations, work across
tenants and Django's own machinery is `Model.all_tenants`, a name that stands out in review.
"""

from __future__ import annotations

from django.db import models


class UnscopedQueryError(RuntimeError):
    """A tenant-owned model was queried without a tenant."""


class TenantQuerySet(models.QuerySet):
    """Rows of one tenant (what `for_tenant` returns); what it creates belongs to that tenant."""

    _tenant_id = None

    def _clone(self):
        clone = super()._clone()
        clone._tenant_id = self._tenant_id
        return clone

    def _claim(self, obj_or_kwargs) -> None:
        """Give a new row this query's tenant; another tenant's is refused, never silently replaced."""
        if isinstance(obj_or_kwargs, dict):
            tenant = obj_or_kwargs.get("tenant")
            if tenant is not None:  # a Tenant given stays (its row is then not fetched again)
                self._check(tenant.pk)
            else:
                obj_or_kwargs["tenant_id"] = self._check(obj_or_kwargs.get("tenant_id"))
        else:
            obj_or_kwargs.tenant_id = self._check(obj_or_kwargs.tenant_id)

    def _check(self, given):
        if self._tenant_id is None:
            raise UnscopedQueryError(f"{self.model.__name__}: create rows through objects.for_tenant(tenant).")
        if given is not None and given != self._tenant_id:
            raise UnscopedQueryError(f"{self.model.__name__}.objects.for_tenant({self._tenant_id}) cannot create a "
                                     f"row of tenant {given}.")
        return self._tenant_id

    def create(self, **kwargs):
        self._claim(kwargs)
        return super().create(**kwargs)

    def bulk_create(self, objs, *args, **kwargs):
        objs = list(objs)
        for obj in objs:
            self._claim(obj)
        return super().bulk_create(objs, *args, **kwargs)

    # get_or_create and update_or_create look up within the tenant and create through `create` above.


class TenantScopedManager(models.Manager.from_queryset(TenantQuerySet)):
    def get_queryset(self):
        raise UnscopedQueryError(
            f"{self.model.__name__}.objects needs a tenant: use {self.model.__name__}.objects.for_tenant(tenant) "
            f"(or {self.model.__name__}.all_tenants for staff-only code)."
        )

    def for_tenant(self, tenant) -> models.QuerySet:
        if tenant is None or getattr(tenant, "pk", tenant) is None:
            raise UnscopedQueryError(f"{self.model.__name__}.objects.for_tenant() was given no tenant.")
        tenant_id = getattr(tenant, "pk", tenant)
        qs = super().get_queryset().filter(tenant_id=tenant_id)
        qs._tenant_id = tenant_id
        return qs


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
