"""Who may do what in a tenant. One place decides, for the console and the management API alike.

The tenant always comes from the URL (`<tenant_slug>`), never from a 'current tenant' preference.
Not a member (or a key of another tenant) → 404. A member below the needed role → 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import wraps

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.utils.cache import add_never_cache_headers

from tenants.models import ROLE_RANK, ApiKey, Membership, Role, Tenant
from tenants.selectors import membership_for_user
from tenants.services import Actor

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class TenantContext:
    """The tenant a request acts on, and as whom."""

    tenant: Tenant
    membership: Membership | None  # set for a signed-in user
    key: ApiKey | None  # set for an API key
    actor: Actor

    @property
    def role(self) -> str | None:
        return self.membership.role if self.membership else None

    def can(self, minimum_role: str) -> bool:
        if self.membership is not None:
            return ROLE_RANK[Role(self.membership.role)] >= ROLE_RANK[Role(minimum_role)]
        return False


def role_required_message(minimum_role: str) -> str:
    return f"This needs the {minimum_role} role or higher in this tenant. Ask an owner or admin to change your role."


def context_for_user(user, tenant_slug: str, *, minimum_role: str) -> TenantContext:
    membership = membership_for_user(user, tenant_slug)
    if ROLE_RANK[Role(membership.role)] < ROLE_RANK[Role(minimum_role)]:
        raise PermissionDenied(role_required_message(minimum_role))
    return TenantContext(tenant=membership.tenant, membership=membership, key=None, actor=Actor(user=user))


def context_for_key(key: ApiKey, tenant_slug: str, *, write: bool) -> TenantContext:
    """An API key acts only on its own tenant (another slug → 404), within its management scopes."""
    if key.tenant.slug != tenant_slug:
        raise Http404("No such tenant.")
    needed = ApiKey.Scope.MANAGEMENT_WRITE if write else ApiKey.Scope.MANAGEMENT_READ
    if not (key.has_scope(needed) or (not write and key.has_scope(ApiKey.Scope.MANAGEMENT_WRITE))):
        raise PermissionDenied(f"This API key lacks the '{needed}' scope. Create a key with that scope in the console.")
    return TenantContext(tenant=key.tenant, membership=None, key=key, actor=Actor(key=key))


def tenant_view(*, read: str = Role.VIEWER, write: str = Role.ADMIN):
    """Console view decorator: resolves `tenant_slug` into `request.tenant_ctx`, enforcing the role.

    GET/HEAD need `read`; other methods need `write`. Answers are never cached: they hold one tenant's data and
    sometimes secrets (a new API key, the playground's gateway token).
    """

    def decorator(view):
        @login_required
        @wraps(view)
        def wrapper(request, tenant_slug, *args, **kwargs):
            minimum = read if request.method in SAFE_METHODS else write
            request.tenant_ctx = context_for_user(request.user, tenant_slug, minimum_role=minimum)
            response = view(request, request.tenant_ctx, *args, **kwargs)
            add_never_cache_headers(response)
            return response

        wrapper.tenant_roles = {"read": read, "write": write}
        return wrapper

    return decorator
