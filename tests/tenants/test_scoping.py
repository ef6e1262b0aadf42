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
