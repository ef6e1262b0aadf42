"""Tenant isolation for every route, generated from the URL configuration.

Every URL pattern is found by walking `get_resolver()` (API and console alike). A pattern with
`<tenant_slug>` is requested with the kwargs below, filled from the acme tenant's own objects, and must:

1. answer 404 to the outsider (globex's owner, not a member of acme), for GET and every write method;
2. answer 403 to a viewer of acme on every write method (unless listed in VIEWER_WRITABLE);
3. answer 404 to the outsider on their *own* slug with acme's object ids (no cross-tenant id probing);
4. answer 404 to a globex API key with every scope (for API views; console views do not take keys).

A pattern without `<tenant_slug>` must be named in the allowlist (UNSCOPED_*), or the suite fails.

ADDING AN ENDPOINT: put it under `tenants/<slug:tenant_slug>/` and it is tested automatically. If its URL
has a new object kwarg (e.g. `<int:job_id>`), add one line to OBJECT_KWARGS: a callable that takes the
world and returns the value for an object of *acme* (create it there if the world lacks it). The suite
fails and says so until you do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
from django.conf import settings
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.urls.resolvers import RoutePattern
from rest_framework.test import APIClient
from rest_framework.views import APIView

from tenants import services
from tenants.models import ApiKey, Invitation, Membership, SystemPromptVersion
from tenants.services import Actor

try:  # the console declares its tenant-less pages itself
    from portal import console_urls
except ImportError:  # pragma: no cover - the console module is always present in this repo
    console_urls = None


# ---- the maps a new endpoint may need to extend --------------------------------------------------

# URL kwarg -> callable(world) -> a value naming an object of the acme tenant.
OBJECT_KWARGS: dict[str, Callable[["IsolationWorld"], object]] = {
    "tenant_slug": lambda w: w.tenant.slug,
    "membership_id": lambda w: w.membership.pk,  # the developer's: a viewer removing it is not "leaving"
    "invitation_id": lambda w: w.invitation.pk,
    "key_id": lambda w: w.key.pk,
    "version": lambda w: w.prompt_v2.version,
    "other_version": lambda w: w.prompt_v1.version,
    "invoice_id": lambda w: _acme_invoice(w).pk,
    "file_id": lambda w: _finetune_objects(w)["file"].id,
    "job_id": lambda w: _finetune_objects(w)["job"].id,
    "adapter_id": lambda w: _finetune_objects(w)["adapter"].pk,
    "rollout_id": lambda w: _acme_rollout(w).pk,
    "delivery_id": lambda w: _acme_webhook_delivery(w).pk,
    "evaluation_id": lambda w: _acme_evaluation(w).id,
}


def _acme_evaluation(w):
    from finetune.models import Evaluation

    objects = _finetune_objects(w)
    evaluation = Evaluation.objects.for_tenant(w.tenant).first()
    return evaluation or Evaluation.all_tenants.create(tenant=w.tenant, base_model=objects["adapter"].base_model,
                                                       model=objects["adapter"].name, adapter=objects["adapter"],
                                                       file=objects["file"])


def _acme_webhook_delivery(w):
    from tenants.models import WebhookDelivery

    delivery = WebhookDelivery.objects.for_tenant(w.tenant).first()
    return delivery or WebhookDelivery.objects.for_tenant(w.tenant).create(tenant=w.tenant, url="https://hooks.example.com/x", body="{}")


def _finetune_objects(w):
    """One acme training file, job and adapter (created once per world)."""
    if not hasattr(w, "_finetune"):
        from finetune.models import FineTuneJob, TrainingFile
        from serving.models import Adapter, BaseModel

        bm, _ = BaseModel.objects.get_or_create(name="iso-base", defaults={"hf_id": "iso/base", "local_path": "/nonexistent"})
        file = TrainingFile.all_tenants.create(tenant=w.tenant, filename="t.jsonl", path="x", status="processed")
        job = FineTuneJob.all_tenants.create(tenant=w.tenant, base_model=bm, training_file=file, hyperparameters={}, lora={})
        adapter = Adapter.all_tenants.create(tenant=w.tenant, name="ft:iso-base:acme::iso", base_model=bm, path="/x")
        w._finetune = {"file": file, "job": job, "adapter": adapter}
    return w._finetune


def _acme_rollout(w):
    from serving.models import AdapterRollout

    adapter = _finetune_objects(w)["adapter"]
    rollout, _ = AdapterRollout.all_tenants.get_or_create(tenant=w.tenant, name=adapter.name, defaults={"current": adapter})
    return rollout


def _acme_invoice(w):
    from datetime import date

    from django.utils import timezone

    from billing.models import Invoice

    invoice = Invoice.objects.for_tenant(w.tenant).first()
    return invoice or Invoice.all_tenants.create(
        tenant=w.tenant, number="ACME-202601", period_start=date(2026, 1, 1), period_end=date(2026, 2, 1), closed_at=timezone.now()
    )

# Kwargs numbered per tenant (globex may have its own version 1), so probing them from globex proves nothing.
TENANT_RELATIVE_KWARGS = {"tenant_slug", "version", "other_version"}

# (URL name, METHOD) pairs a viewer may write to, each with its reason. Keep it short; the docs must say so.
VIEWER_WRITABLE: set[tuple[str, str]] = {
    ("console-member-leave", "POST"),  # any member may leave a tenant (the API does it via DELETE on one's own membership)
}

# Patterns without <tenant_slug> that are allowed to exist.
UNSCOPED_PREFIXES = ("admin/", "static/", "media/")
UNSCOPED_NAMES = {
    "favicon",  # a redirect to a static file
    # management API: user-level, schema and docs
    "api-tenant-list",
    "api-invitation-accept",
    "api-schema",
    "api-docs",
    # django.contrib.auth pages
    "login",
    "logout",
    "password_change",
    "password_change_done",
    "password_reset",
    "password_reset_done",
    "password_reset_confirm",
    "password_reset_complete",
    # Stripe calls this; it authenticates by signature (billing/webhooks.py)
    "billing-stripe-webhook",
    # staff-only pages (staff_member_required), across tenants by design: see STAFF_NAMES
    # OpenAI-compatible Files and Fine-tuning: the tenant comes from the API key (tests/finetune/test_api.py
    # checks another tenant's ids answer 404 there)
    *__import__("finetune.urls", fromlist=["V1_URL_NAMES"]).V1_URL_NAMES,
    # any other path under /v1/: OpenAI's JSON 404, no tenant and no data (tests/finetune/test_api.py)
    "v1-unknown-url",
}
# Staff pages outside the admin: across tenants by design, so only staff may open them (checked below).
STAFF_NAMES = {"billing-staff-allocation", "staff-pools-live"}
UNSCOPED_NAMES |= STAFF_NAMES
UNSCOPED_NAMES |= set(getattr(console_urls, "PUBLIC_URL_NAMES", ())) | set(getattr(console_urls, "USER_URL_NAMES", ()))

WRITE_METHODS = ("post", "put", "patch", "delete")


# ---- walking the URL configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    route: str  # e.g. "api/tenants/<slug:tenant_slug>/keys/<int:key_id>/"
    name: str | None  # namespaced, e.g. "console:home"
    callback: Callable
    kwargs: tuple[str, ...]
    plain: bool  # only RoutePatterns: the URL can be built by substitution

    def __str__(self) -> str:
        return f"/{self.route} ({self.name or 'unnamed'})"

    @property
    def bare_name(self) -> str | None:
        return self.name.rsplit(":", 1)[-1] if self.name else None

    @property
    def view_class(self):
        return getattr(self.callback, "cls", None) or getattr(self.callback, "view_class", None)

    @property
    def is_api(self) -> bool:
        return isinstance(self.view_class, type) and issubclass(self.view_class, APIView)

    def accepts(self, method: str) -> bool:
        """Whether a class-based view has a handler for `method`; a function view might (it is tried)."""
        if self.view_class is None:
            return method in ("get", "post")
        return hasattr(self.view_class, method)

    def write_methods(self) -> list[str]:
        if self.view_class is None:
            return ["post"]  # a function view: at least try to write
        return [m for m in WRITE_METHODS if self.accepts(m)]


def _pattern_kwargs(pattern) -> list[str]:
    if isinstance(pattern, RoutePattern):
        return list(pattern.converters)
    return list(pattern.regex.groupindex)


def walk(resolver=None, prefix: str = "", namespace: str = "", kwargs: tuple = (), plain: bool = True) -> list[Route]:
    resolver = resolver or get_resolver()
    routes = []
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        names = kwargs + tuple(_pattern_kwargs(entry.pattern))
        is_plain = plain and isinstance(entry.pattern, RoutePattern)
        if isinstance(entry, URLResolver):
            ns = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            routes += walk(entry, route, ns, names, is_plain)
        elif isinstance(entry, URLPattern):
            name = f"{namespace}{entry.name}" if entry.name else None
            routes.append(Route(route, name, entry.callback, names, is_plain))
    return routes


ROUTES = walk()
TENANT_ROUTES = [r for r in ROUTES if "tenant_slug" in r.kwargs]
UNSCOPED_ROUTES = [r for r in ROUTES if "tenant_slug" not in r.kwargs]
STAFF_ROUTES = [r for r in UNSCOPED_ROUTES if r.route.startswith("staff/") or r.bare_name in STAFF_NAMES]
PROBE_ROUTES = [r for r in TENANT_ROUTES if set(r.kwargs) - TENANT_RELATIVE_KWARGS]


def _ids(routes):
    return [str(r) for r in routes]


# ---- the world -----------------------------------------------------------------------------------


@dataclass
class IsolationWorld:
    tenant: object  # acme
    owner: object
    admin: object
    developer: object
    viewer: object
    other_tenant: object  # globex
    outsider: object  # globex's owner
    membership: Membership
    invitation: Invitation
    key: ApiKey
    prompt_v1: SystemPromptVersion
    prompt_v2: SystemPromptVersion
    foreign_key_secret: str  # a globex key with every scope


@pytest.fixture(autouse=True)
def _fast_password_hasher(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def iso(world) -> IsolationWorld:
    acme = Actor(user=world.owner)
    all_scopes = [s.value for s in ApiKey.Scope]
    invitation, _ = services.invitation_create(tenant=world.tenant, email="invitee@example.test", role="developer", actor=acme)
    key, _ = services.api_key_create(tenant=world.tenant, name="acme-ci", scopes=all_scopes, actor=acme)
    v1 = services.system_prompt_save(tenant=world.tenant, text="Be brief.", note="v1", actor=acme)
    v2 = services.system_prompt_save(tenant=world.tenant, text="Be brief.\nBe kind.", note="v2", actor=acme)
    _, foreign = services.api_key_create(tenant=world.other_tenant, name="globex-all", scopes=all_scopes, actor=Actor(user=world.outsider))
    return IsolationWorld(
        tenant=world.tenant,
        owner=world.owner,
        admin=world.admin,
        developer=world.developer,
        viewer=world.viewer,
        other_tenant=world.other_tenant,
        outsider=world.outsider,
        membership=Membership.objects.for_tenant(world.tenant).get(user=world.developer),
        invitation=invitation,
        key=key,
        prompt_v1=v1,
        prompt_v2=v2,
        foreign_key_secret=foreign,
    )


def build_url(route: Route, iso: IsolationWorld, **overrides) -> str:
    unmapped = sorted(set(route.kwargs) - set(OBJECT_KWARGS))
    if unmapped:
        pytest.fail(
            f"{route} has URL kwargs {unmapped} that tests/test_isolation.py cannot fill. Add them to OBJECT_KWARGS "
            f"(kwarg -> callable(world) -> the value for an object of the acme tenant)."
        )
    values = {name: OBJECT_KWARGS[name](iso) for name in route.kwargs}
    values.update(overrides)
    if route.plain:
        return "/" + re.sub(r"<(?:[^>:]+:)?([^>]+)>", lambda m: str(values[m.group(1)]), route.route)
    if not route.name:
        pytest.fail(f"{route} mixes regex patterns and has no name, so it cannot be reversed: give it a name.")
    return reverse(route.name, kwargs=values)


def request(client: APIClient, method: str, url: str):
    if method == "get":
        return client.get(url)
    return getattr(client, method)(url, {}, format="json")


def signed_in(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def _assert_status(route: Route, method: str, response, expected: int, who: str) -> None:
    # A function view may limit its methods (@require_POST): 405 leaks nothing, but some method must answer.
    if response.status_code == 405 and route.view_class is None:
        return
    assert response.status_code == expected, (
        f"{who}: {method.upper()} {str(route)} answered {response.status_code}, expected {expected}. "
        f"Resolve the tenant through TenantAPIView / tenants.access and fetch objects with Model.objects.for_tenant()."
    )


def _methods(route: Route) -> list[str]:
    return (["get"] if route.accepts("get") else []) + route.write_methods()


# ---- the checks ----------------------------------------------------------------------------------


def test_the_walk_finds_the_api():
    names = {r.name for r in TENANT_ROUTES}
    assert {"api-member-detail", "api-key-revoke", "api-prompt-diff", "api-policy", "api-audit-list"} <= names


@pytest.mark.parametrize("route", UNSCOPED_ROUTES, ids=_ids(UNSCOPED_ROUTES))
def test_patterns_without_a_tenant_are_allowlisted(route):
    allowed = route.route.startswith(UNSCOPED_PREFIXES) or route.name in UNSCOPED_NAMES or route.bare_name in UNSCOPED_NAMES
    assert allowed, (
        f"{route} has no <tenant_slug>. Tenant data must be served under tenants/<slug:tenant_slug>/ (API: subclass "
        f"TenantAPIView; console: @tenant_view). If the page is truly tenant-less, add its name to UNSCOPED_NAMES in "
        f"tests/test_isolation.py (or to the console's PUBLIC_URL_NAMES / USER_URL_NAMES)."
    )


@pytest.mark.parametrize("route", TENANT_ROUTES, ids=_ids(TENANT_ROUTES))
def test_every_object_kwarg_is_mapped(route):
    unmapped = sorted(set(route.kwargs) - set(OBJECT_KWARGS))
    assert not unmapped, f"{route}: add {unmapped} to OBJECT_KWARGS in tests/test_isolation.py."


@pytest.mark.parametrize("route", TENANT_ROUTES, ids=_ids(TENANT_ROUTES))
def test_outsider_gets_404(route, iso):
    url = build_url(route, iso)
    client = signed_in(iso.outsider)
    methods = _methods(route)
    assert methods, f"{route} accepts no HTTP method the suite knows."
    statuses = {}
    for method in methods:
        response = request(client, method, url)
        statuses[method] = response.status_code
        _assert_status(route, method, response, 404, "the outsider (globex's owner)")
    assert 404 in statuses.values(), f"{route}: no method answered 404 to the outsider ({statuses})."


@pytest.mark.parametrize("route", TENANT_ROUTES, ids=_ids(TENANT_ROUTES))
def test_viewer_gets_403_on_writes(route, iso):
    url = build_url(route, iso)
    client = signed_in(iso.viewer)
    for method in route.write_methods():
        if (route.bare_name, method.upper()) in VIEWER_WRITABLE:
            continue
        _assert_status(route, method, request(client, method, url), 403, "a viewer of acme")


@pytest.mark.parametrize("route", PROBE_ROUTES, ids=_ids(PROBE_ROUTES))
def test_acme_ids_under_the_outsiders_own_slug_get_404(route, iso):
    url = build_url(route, iso, tenant_slug=iso.other_tenant.slug)
    client = signed_in(iso.outsider)  # globex's owner: every role check passes, only the scoping stops them
    for method in _methods(route):
        _assert_status(route, method, request(client, method, url), 404, "globex's owner probing acme's ids")


@pytest.mark.parametrize("route", TENANT_ROUTES, ids=_ids(TENANT_ROUTES))
def test_foreign_api_key_gets_404(route, iso):
    url = build_url(route, iso)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {iso.foreign_key_secret}")
    for method in _methods(route):
        response = request(client, method, url)
        if route.is_api:
            _assert_status(route, method, response, 404, "a globex API key with every scope")
        else:  # console pages ignore API keys: the caller is anonymous and must get nothing
            assert not 200 <= response.status_code < 300, f"{method.upper()} {route}: an API key got {response.status_code}"
            if 300 <= response.status_code < 400:
                assert reverse(settings.LOGIN_URL) in response["Location"], f"{route} redirected an API key to {response['Location']}"


@pytest.mark.parametrize("route", STAFF_ROUTES, ids=_ids(STAFF_ROUTES))
def test_staff_pages_are_for_staff_only(route, iso):
    assert route.bare_name in STAFF_NAMES, f"{route} is under staff/ but not in STAFF_NAMES: add it, and protect it with staff_member_required."
    url = build_url(route, iso)
    login = reverse("admin:login")
    owner = request(signed_in(iso.owner), "get", url)  # a tenant's owner is not platform staff
    assert owner.status_code == 302 and owner["Location"].startswith(login), f"{route} answered a tenant owner {owner.status_code}"
    key = APIClient()
    key.credentials(HTTP_AUTHORIZATION=f"Bearer {iso.foreign_key_secret}")
    assert request(key, "get", url).status_code == 302
    iso.outsider.is_staff = True
    iso.outsider.save(update_fields=["is_staff"])
    assert request(signed_in(iso.outsider), "get", url).status_code == 200
