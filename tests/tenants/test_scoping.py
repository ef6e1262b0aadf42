"""Tenant scoping. The contract tests walk every tenant-owned model (every subclass of TenantOwnedModel that Django
knows), so a new model is held to them without editing this file; tests/tenants/rows.py makes its rows."""

import pytest
from django import forms
from django.apps import apps
from django.core.exceptions import ValidationError
from django.http import Http404
from django.shortcuts import get_list_or_404, get_object_or_404
from rest_framework import serializers

from tenants.models import AuditEvent, Membership
from tenants.scoping import TenantOwnedModel, UnscopedQueryError
from tests.support.rows import bare_tenant, make_row

TENANT_OWNED = sorted((m for m in apps.get_models() if issubclass(m, TenantOwnedModel)), key=lambda m: m._meta.label)
by_label = pytest.mark.parametrize("model", TENANT_OWNED, ids=lambda m: m._meta.label)


def test_the_walk_finds_the_tenant_owned_models_of_every_app():
    assert {m._meta.app_label for m in TENANT_OWNED} == {"tenants", "serving", "finetune", "billing"}
    assert len(TENANT_OWNED) >= 19


@by_label
def test_the_default_manager_refuses_unscoped_use(model):
    assert model._default_manager is model.objects
    for use in (lambda: list(model._default_manager.all()), lambda: model._default_manager.filter(pk=1),
                lambda: model._default_manager.count(), lambda: model._default_manager.using("default"),
                lambda: model._default_manager.create(), lambda: get_object_or_404(model, pk=1),
                lambda: get_list_or_404(model)):
        with pytest.raises(UnscopedQueryError, match=f"{model.__name__}.objects"):
            use()


@by_label
def test_for_tenant_returns_only_that_tenants_rows(db, model):
    mine, theirs = bare_tenant(), bare_tenant()
    own, other = make_row(model, mine), make_row(model, theirs)
    rows = list(model.objects.for_tenant(mine))
    assert own.pk in {r.pk for r in rows} and other.pk not in {r.pk for r in rows}
    assert {r.tenant_id for r in rows} == {mine.pk}
    assert get_object_or_404(model.objects.for_tenant(mine), pk=own.pk) == own
    with pytest.raises(Http404):
        get_object_or_404(model.objects.for_tenant(mine), pk=other.pk)


def _incoming_foreign_keys(model):
    return [rel.field for rel in model._meta.related_objects if rel.field.many_to_one or rel.field.one_to_one]


@by_label
def test_choices_over_it_need_a_tenant_scoped_queryset(db, model):
    """A ModelForm's or a DRF serializer's choices for a foreign key to the model, or a ModelChoiceField given no
    scoped queryset, refuse at use instead of offering every tenant's rows."""
    mine, theirs = bare_tenant(), bare_tenant()
    own, other = make_row(model, mine), make_row(model, theirs)
    with pytest.raises(UnscopedQueryError):
        forms.ModelChoiceField(queryset=model._default_manager)
    with pytest.raises(UnscopedQueryError):
        serializers.PrimaryKeyRelatedField(queryset=model._default_manager).to_internal_value(own.pk)
    for fk in _incoming_foreign_keys(model):
        with pytest.raises(UnscopedQueryError):
            fk.formfield()  # what a ModelForm over fk.model builds for it
        with pytest.raises(UnscopedQueryError):
            forms.modelform_factory(fk.model, fields=[fk.name])
        meta = type("Meta", (), {"model": fk.model, "fields": [fk.name]})
        serializer = type("Serializer", (serializers.ModelSerializer,), {"Meta": meta})(data={fk.name: own.pk})
        with pytest.raises(UnscopedQueryError):
            serializer.is_valid()
    scoped = forms.ModelChoiceField(queryset=model.objects.for_tenant(mine))
    assert scoped.clean(own.pk) == own
    with pytest.raises(ValidationError):
        scoped.clean(other.pk)


@by_label
def test_reverse_relations_stay_scoped_by_the_parent_row(db, model):
    """`job.events` and the like: Django builds them from the default manager's class; the parent row scopes them."""
    for fk in _incoming_foreign_keys(model):
        if not issubclass(fk.model, TenantOwnedModel) or fk.one_to_one:
            continue
        child = make_row(fk.model, bare_tenant())
        parent = getattr(child, fk.name)
        if parent is None:  # a nullable link (e.g. a webhook delivery's alert): link the child to a parent of its own
            parent = make_row(model, child.tenant)
            child = make_row(fk.model, child.tenant, **{fk.name: parent})
        sibling_elsewhere = make_row(fk.model, bare_tenant())
        related = getattr(parent, fk.remote_field.get_accessor_name())
        assert list(related.all()) == [child] and sibling_elsewhere not in related.all()


def test_rows_created_through_a_reverse_relation_get_the_parents_tenant(db):
    from finetune.models import FineTuneJob

    job = make_row(FineTuneJob, bare_tenant())
    assert job.events.create(message="hello").tenant_id == job.tenant_id
    with pytest.raises(UnscopedQueryError, match="cannot create a row of tenant"):
        job.events.create(message="elsewhere", tenant=bare_tenant())


def _clone(row, tenant):
    clone = type(row).all_tenants.get(pk=row.pk)
    clone.pk, clone._state.adding, clone.tenant = None, True, tenant
    return clone


@by_label
def test_unique_checks_see_every_tenant_and_say_only_that_the_value_is_taken(db, model):
    """full_clean() of a ModelForm or a service checks uniqueness through the default manager: it works, and a field
    unique on its own is unique across tenants (as the database enforces it)."""
    row = make_row(model, bare_tenant())
    unique = {f.name for f in model._meta.concrete_fields if f.unique and not f.primary_key}
    constrained = [c for c in model._meta.constraints if getattr(c, "fields", None) and getattr(c, "condition", None) is None]
    same_tenant = _clone(row, row.tenant)
    if unique:
        with pytest.raises(ValidationError) as refused:
            same_tenant.validate_unique()
        assert set(refused.value.message_dict) == unique
    if constrained:
        with pytest.raises(ValidationError):
            same_tenant.validate_constraints()
    elsewhere = _clone(row, bare_tenant())
    if unique - {"tenant"}:
        with pytest.raises(ValidationError) as refused:
            elsewhere.validate_unique()
        assert set(refused.value.message_dict) == unique - {"tenant"}
    else:
        elsewhere.validate_unique()
