"""The management API (/api/tenants/...) as a signed-in user or an API key."""

from __future__ import annotations

from rest_framework.test import APIClient

from tenants import services
from tenants.models import ApiKey


def as_user(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def as_key(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def make_key(tenant, scopes=("management:read", "management:write"), **kwargs) -> tuple[ApiKey, str]:
    return services.api_key_create(tenant=tenant, name="test", scopes=list(scopes), actor=services.SYSTEM, **kwargs)


def url(world, suffix: str = "") -> str:
    return f"/api/tenants/{world.tenant.slug}/{suffix}"
