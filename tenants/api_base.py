"""The base of the management REST API under /api/tenants/<tenant_slug>/: `TenantAPIView` resolves the tenant.

Security-critical and small on purpose: `TenantAPIView.initial()` resolves `<tenant_slug>` through `tenants.access`
before any handler runs (a signed-in user by membership and role, an API key by its own tenant and scope), charges
the tenant's API rate (tenants/ratelimit.py), and hands out rows only through `Model.objects.for_tenant`;
`SealedMethods` stops a subclass from replacing any of that. The endpoints are in tenants/api.py and the other apps'
api modules; shared input/output helpers here.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from django.http import Http404
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from tenants import ratelimit
from tenants.access import SAFE_METHODS, TenantContext, context_for_key, context_for_user, role_required_message
from tenants.api_auth import KeyPrincipal
from tenants.models import ROLE_RANK, ApiKey, Membership, Role, Tenant
from tenants.services import Actor

# `write_role` sentinel: the write needs a platform staff user (who may then act on any tenant).
STAFF = "staff"
MANAGEMENT_SCOPES = (ApiKey.Scope.MANAGEMENT_READ, ApiKey.Scope.MANAGEMENT_WRITE)


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of quietly turning them into text."""

    default_error_messages = {"invalid": "Not a valid string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


def email_of(user) -> str | None:
    return (user.email or user.username) if user is not None else None


def validated_input(serializer_class, request, *, partial: bool = False) -> dict:
    serializer = serializer_class(data=request.data, partial=partial)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def paginate(view: APIView, items, serializer_class) -> Response:
    paginator = view.pagination_class()
    page = paginator.paginate_queryset(items, view.request, view=view)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)


# ---- the tenant-scoped base ----------------------------------------------------------------------


class SealedMethods:
    """A base class whose methods named in `_FINAL` no subclass may replace (directly or through a mixin).

    The base that resolves the tenant lists the methods doing it; a subclass that brings its own version of one of
    them fails at class creation, so no view can skip the scoping its base promises.
    """

    _FINAL: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sealer = next((base for base in cls.__mro__[1:] if base.__dict__.get("_FINAL")), None)
        if sealer is None:
            return  # the sealing base itself
        missing = set(sealer._FINAL) - set(cls._FINAL)
        replaced = [name for name in sealer._FINAL if getattr(cls, name, None) is not getattr(sealer, name, None)]
        if replaced or missing:
            names = ", ".join(replaced) or f"_FINAL (without {', '.join(sorted(missing))})"
            raise TypeError(f"{cls.__name__} may not override {names}: tenant resolution is {sealer.__name__}'s alone.")


class TenantAPIView(SealedMethods, APIView):
    """Base of every view under /api/tenants/<tenant_slug>/.

    `initial()` resolves the tenant once, from the URL, through `tenants.access` (a signed-in user by
    membership and role, an API key by its own tenant and scope) and stores it in `self.ctx`. Reads need
    `read_role`, writes `write_role` (a key: management:read / management:write). Subclasses reach rows
    only through `scoped()` / `get_scoped_or_404()`; they cannot override those or `initial()`.
    """

    read_role: str = Role.VIEWER
    write_role: str = Role.ADMIN
    # Methods that cost more than one unit of the tenant's API rate (tenants/ratelimit.py: cost_of).
    expensive_methods: frozenset[str] = frozenset()
    # Only the policy sets this: staff may then read and change any tenant through this one view.
    staff_may_act_on_any_tenant: bool = False
    pagination_class = api_settings.DEFAULT_PAGINATION_CLASS
    ctx: TenantContext

    _FINAL = ("dispatch", "initial", "resolve_context", "scoped", "get_scoped_or_404", "require_role")

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication, IsAuthenticated, throttles
        self.ctx = self.resolve_context(request, kwargs["tenant_slug"])
        # The tenant's API bucket, once it is known to be the caller's (an outsider cannot spend another's), and
        # before the handler does any work: 429 with Retry-After (tenants/ratelimit.py).
        ratelimit.charge(tenant=self.ctx.tenant, cost=ratelimit.cost_of(self, request), request=request)

    def resolve_context(self, request, tenant_slug: str) -> TenantContext:
        write = request.method not in SAFE_METHODS
        needed = self.write_role if write else self.read_role
        user = request.user
        if isinstance(user, KeyPrincipal):
            # A key never counts as staff: resolve (404 for another tenant), then refuse staff-only writes.
            ctx = context_for_key(request.auth, tenant_slug, write=write and needed != STAFF)
            if needed == STAFF:
                raise PermissionDenied("Only platform staff can change this.")
            return ctx
        if self.staff_may_act_on_any_tenant and user.is_staff:
            tenant = Tenant.objects.filter(slug=tenant_slug).first()
            if tenant is None:
                raise Http404("No such tenant.")
            membership = Membership.objects.for_tenant(tenant).filter(user=user).first()
            return TenantContext(tenant=tenant, membership=membership, key=None, actor=Actor(user=user))
        if needed == STAFF:
            context_for_user(user, tenant_slug, minimum_role=self.read_role)  # an outsider gets 404 first
            raise PermissionDenied("Only platform staff can change this.")
        return context_for_user(user, tenant_slug, minimum_role=needed)

    def scoped(self, model):
        """`model`'s rows of this request's tenant: the only way views reach tenant-owned rows."""
        return model.objects.for_tenant(self.ctx.tenant)

    def get_scoped_or_404(self, model, **lookup):
        obj = self.scoped(model).filter(**lookup).first()
        if obj is None:
            raise Http404(f"No such {model._meta.verbose_name}.")
        return obj

    def require_role(self, minimum: str) -> None:
        """403 unless the caller holds `minimum`. A management:write key counts as admin, never owner."""
        if self.ctx.key is not None:
            allowed = ROLE_RANK[Role(minimum)] <= ROLE_RANK[Role.ADMIN] and self.ctx.key.has_scope(ApiKey.Scope.MANAGEMENT_WRITE)
        else:
            allowed = self.ctx.can(minimum)
        if not allowed:
            raise PermissionDenied(role_required_message(minimum))


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents `Authorization: Bearer mtl_…` in the OpenAPI schema."""

    target_class = "tenants.api_auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "bearerFormat": "mtl_<prefix>_<secret>"}


TENANT_SLUG = OpenApiParameter("tenant_slug", str, OpenApiParameter.PATH, description="The tenant's slug, e.g. `acme`.")
