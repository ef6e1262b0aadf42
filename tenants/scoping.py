"""Fail-closed tenant scoping, the one mechanism every tenant-owned model uses.

`Model.objects` refuses to build a query until it is told the tenant: `Model.objects.for_tenant(t)`.
Any other use (`Model.objects.all()`, `.filter(...)`, `.get(...)`) raises `UnscopedQueryError`, so a
forgotten filter is a crash in tests, never a leak in production. Rows are created the same way:
`Model.objects.for_tenant(t).create(...)` (also get_or_create, update_or_create, bulk_create) makes them the
tenant's, and refuses a `tenant` that is another.

`objects` is also the model's *default* manager, the one Django's own generic paths reach for
(`Model._default_manager`): `get_object_or_404(Model, ...)`, a ModelForm's or ModelChoiceField's choices for a
foreign key to the model, a DRF related field, the admin, generic views, `dumpdata` without `--all`. Each of
them therefore raises too, until it is given a tenant-scoped queryset. Three paths stay open, each scoped by
something other than a tenant filter:

- the *base* manager (`base_manager_name = "all_tenants"`), which Django uses to follow a foreign key
  (`line.invoice`), for a reverse one-to-one (`job.usage`), to save, refresh and cascade deletes: the row
  is reached through a row already held, so the foreign key itself is the scope;
- reverse foreign-key and many-to-many managers (`job.events`, `invoice.lines`): Django builds them as
  subclasses of the default manager's class, and they filter by the parent row; rows they create get the
  parent's tenant (a parent that has none must be given one);
- the model's own `validate_unique()` / `validate_constraints()`: a unique constraint spans every tenant
  (as the database enforces it), so the check reads every tenant's rows and says only "already exists"
  (through `all_tenants_by_default(model)`, which only these and the staff admin's formsets use).

The escape hatch for staff tools, migrations, work across tenants and Celery tasks given tenant ids is
`Model.all_tenants`, a name that stands out in review; tests/tenants/test_fail_closed.py allows it only in
the places it lists, each with its reason (the staff admin reaches it through `tenants.admin.AllTenantsAdmin`).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

from django import forms
from django.db import models

# The tenant-owned models whose default manager currently answers with every tenant's rows (all_tenants_by_default).
_unscoped_models: contextvars.ContextVar[frozenset] = contextvars.ContextVar("tenant_scoping_unscoped", default=frozenset())


@contextmanager
def all_tenants_by_default(model):
    """Within this block, `model`'s default manager answers with every tenant's rows instead of refusing.

    Only for Django internals that cannot be handed a queryset and need the rows a constraint or a staff page
    already spans: the model's own uniqueness checks, and the admin formsets' row ids (tenants.admin). Code of
    ours asks `Model.all_tenants` instead, where a reader sees it.
    """
    token = _unscoped_models.set(_unscoped_models.get() | {model})
    try:
        yield
    finally:
        _unscoped_models.reset(token)


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


def _is_related_manager(manager) -> bool:
    """A reverse foreign-key or many-to-many manager (`job.events`): Django's, bound to one parent row."""
    return getattr(manager, "instance", None) is not None and hasattr(manager, "core_filters")


class TenantScopedManager(models.Manager.from_queryset(TenantQuerySet)):
    def get_queryset(self):
        if _is_related_manager(self):
            # Django filters these by the parent row (on top of this queryset); what they create is the parent's.
            qs = super().get_queryset()
            qs._tenant_id = getattr(self.instance, "tenant_id", None)
            return qs
        if self.model in _unscoped_models.get():
            return super().get_queryset()  # inside all_tenants_by_default(model)
        raise UnscopedQueryError(
            f"{self.model.__name__}.objects needs a tenant: use {self.model.__name__}.objects.for_tenant(tenant) "
            f"(or {self.model.__name__}.all_tenants for staff-only code)."
        )

    def for_tenant(self, tenant) -> models.QuerySet:
        if tenant is None or getattr(tenant, "pk", tenant) is None:
            raise UnscopedQueryError(f"{self.model.__name__}.objects.for_tenant() was given no tenant.")
        tenant_id = getattr(tenant, "pk", tenant)
        rows = self.get_queryset() if _is_related_manager(self) else super().get_queryset()
        qs = rows.filter(tenant_id=tenant_id)
        qs._tenant_id = tenant_id
        return qs


class TenantOwnedModel(models.Model):
    """Base for every model that belongs to one tenant."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")

    objects = TenantScopedManager()
    all_tenants = models.Manager()

    class Meta:
        abstract = True
        # `objects` is what Django's generic paths get (get_object_or_404, form and serializer choices, the
        # admin): they fail closed. Following a foreign key, saving and cascading use the base manager.
        default_manager_name = "objects"
        base_manager_name = "all_tenants"

    def own_row(self) -> models.QuerySet:
        """This row as a query within its own tenant, to lock or update a row already held:
        `invoice.own_row().select_for_update().get()`, `invoice.own_row().update(...)`."""
        return type(self).objects.for_tenant(self.tenant_id).filter(pk=self.pk)

    # A unique constraint spans every tenant, as the database enforces it: Django's checks read every tenant's rows
    # through the default manager and answer only "already exists".

    def validate_unique(self, exclude=None):
        with all_tenants_by_default(type(self)):
            super().validate_unique(exclude=exclude)

    def validate_constraints(self, exclude=None):
        with all_tenants_by_default(type(self)):
            super().validate_constraints(exclude=exclude)


def foreign_key_formfield(db_field: models.ForeignKey, queryset: models.QuerySet, **kwargs) -> forms.ModelChoiceField:
    """The form field of `db_field`, a foreign key to a tenant-owned model, choosing among `queryset`.

    `ForeignKey.formfield(queryset=...)` cannot be used: it asks the related model's default manager first, even when
    given a queryset (Django 5.2), and that manager refuses. This builds the same field without asking it.
    """
    return super(models.ForeignKey, db_field).formfield(**{
        "form_class": forms.ModelChoiceField, "queryset": queryset, "to_field_name": db_field.remote_field.field_name,
        **kwargs, "blank": db_field.blank,
    })
