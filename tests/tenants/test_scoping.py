import pytest

from tenants.models import ApiKey, AuditEvent, Membership, SystemPromptVersion
from tenants.scoping import UnscopedQueryError


@pytest.mark.parametrize("model", [ApiKey, AuditEvent, Membership, SystemPromptVersion])
def test_unscoped_query_raises(world, model):
    with pytest.raises(UnscopedQueryError):
        list(model.objects.all())
    with pytest.raises(UnscopedQueryError):
        model.objects.filter(pk=1)


def test_for_tenant_returns_only_that_tenants_rows(world):
    own = Membership.objects.for_tenant(world.tenant)
    assert {m.user.email for m in own} == {"owner@acme.test", "admin@acme.test", "developer@acme.test", "viewer@acme.test"}
    assert all(m.tenant_id == world.tenant.pk for m in own)


def test_for_tenant_without_tenant_raises(world):
    with pytest.raises(UnscopedQueryError):
        Membership.objects.for_tenant(None)


def test_rows_created_through_for_tenant_belong_to_that_tenant(world):
    from tenants.models import ApiKey as Key

    scoped = AuditEvent.objects.for_tenant(world.tenant)
    event = scoped.filter(action__startswith="x").create(action="x.created", target_type="t")  # chained: still scoped
    assert event.tenant_id == world.tenant.pk
    same, created = scoped.get_or_create(action="x.created", defaults={"target_type": "other"})
    assert same.pk == event.pk and not created
    made, created = scoped.get_or_create(action="x.second", defaults={"target_type": "t"})
    assert created and made.tenant_id == world.tenant.pk
    bulk = scoped.bulk_create([AuditEvent(action="x.bulk", target_id=str(i)) for i in range(2)])
    assert {e.tenant_id for e in bulk} == {world.tenant.pk}
    assert AuditEvent.objects.for_tenant(world.tenant).create(tenant=world.tenant, action="x.t").tenant == world.tenant
    assert not AuditEvent.objects.for_tenant(world.other_tenant).filter(action__startswith="x.").exists()
    with pytest.raises(UnscopedQueryError):
        Key.objects.create(name="k")  # no tenant at all


def test_for_tenant_refuses_to_create_another_tenants_row(world):
    scoped = AuditEvent.objects.for_tenant(world.tenant)
    with pytest.raises(UnscopedQueryError, match="cannot create a row of tenant"):
        scoped.create(tenant=world.other_tenant, action="x.y")
    with pytest.raises(UnscopedQueryError, match="cannot create a row of tenant"):
        scoped.create(tenant_id=world.other_tenant.pk, action="x.y")
    with pytest.raises(UnscopedQueryError, match="cannot create a row of tenant"):
        scoped.bulk_create([AuditEvent(tenant=world.other_tenant, action="x.y")])
    assert not AuditEvent.all_tenants.filter(action="x.y").exists()
