"""Fail-closed everywhere: app code has no fail-open forms, the API bases cannot be bypassed, staff admin still works.

1. An AST walk over the app code (tenants, serving, finetune, billing, portal, common; not tests or migrations)
   refuses the forms that would read tenant-owned rows without a tenant: `get_object_or_404(Model, …)` /
   `get_list_or_404(Model, …)` with a tenant-owned model class, `_default_manager` / `_base_manager`,
   `all_tenants_by_default(…)` outside tenants/scoping.py and the admin mixin, `.all_tenants` outside
   ALL_TENANTS_ALLOWED: the places where reading every tenant is the job, each with its reason, and pools scoped by
   hand (`filter(dedicated_tenant=…)`, `Q(dedicated_tenant_id=…)`, …) outside BackendPool's queryset: a tenant's
   pools are `BackendPool.objects.reachable_by(tenant)` or `.dedicated_to(tenant)`.
2. Every /v1 view derives from OpenAIView and every tenant-scoped API view from TenantAPIView; neither base's
   tenant-resolving methods can be replaced by a subclass (directly or through a mixin).
3. Every registered ModelAdmin's pages open for staff, over every tenant's rows (tenants.admin.AllTenantsAdmin).

ADDING A USE OF `all_tenants`: prefer `Model.objects.for_tenant(tenant)` (or `row.own_row()` for a row you hold).
If the code truly spans tenants, add one line to ALL_TENANTS_ALLOWED saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.apps import apps
from django.contrib import admin
from django.test import RequestFactory
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.views import APIView

from finetune.v1_base import OpenAIView
from tenants.api_base import TenantAPIView
from tenants.scoping import TenantOwnedModel
from tests.support.rows import bare_tenant, make_row
from tests.support.admin import change_form

ROOT = Path(__file__).resolve().parents[2]
APP_PACKAGES = ("tenants", "serving", "finetune", "billing", "portal", "common")
TENANT_OWNED_NAMES = {m.__name__ for m in apps.get_models() if issubclass(m, TenantOwnedModel)}

# (file, function or class.method; "*" for the whole module) -> why it reads every tenant's rows.
ALL_TENANTS_ALLOWED: dict[tuple[str, str], str] = {
    ("tenants/admin.py", "AllTenantsAdmin.get_queryset"): "the staff admin lists every tenant's rows",
    ("tenants/admin.py", "AllTenantsAdmin.get_field_queryset"): "the staff admin's choices span every tenant",
    ("tenants/selectors.py", "memberships_for_user"): "a user's memberships, across the tenants they belong to",
    ("tenants/selectors.py", "membership_for_user"): "resolves the tenant from a user's own membership",
    ("tenants/selectors.py", "fair_share_weight_sum"): "the fair-share denominator sums every tenant's weight",
    ("tenants/services.py", "tenant_create"): "how many tenants the new owner already owns",
    ("tenants/services.py", "invitation_by_token"): "the token names the invitation, and so its tenant",
    ("tenants/services.py", "invitation_accept"): "the token names the invitation, and so its tenant",
    ("tenants/services.py", "api_key_find"): "authentication: the key's prefix names the key, and so its tenant",
    ("serving/config.py", "*"): "the gateway snapshot holds every tenant's keys, policies and routes",
    ("serving/ledger.py", "*"): "the gateway writes ledger batches holding many tenants' records",
    ("serving/adapter_loads.py", "*"): "a shared pool's deployments belong to many tenants",
    ("serving/staff_views.py", "*"): "staff pages over every tenant's share of the pools",
    ("finetune/deploy.py", "*"): "a pool's adapters (TGI's LORA_ADAPTERS, restarts) belong to many tenants",
    ("finetune/planning.py", "training_tokens_per_second"): "the worker's measured speed, not a tenant's data",
    ("finetune/planning.py", "training_load_seconds"): "the worker's measured load time, not a tenant's data",
    ("finetune/services.py", "finetune_stale_jobs"): "the periodic task finds stalled jobs of every tenant",
    ("finetune/evaluation.py", "evaluation_stale"): "the periodic task finds stalled evaluations of every tenant",
    ("finetune/merge.py", "merged_stale"): "the periodic task finds stalled merges of every tenant",
    ("finetune/services.py", "training_file_stale_validations"): "the periodic task finds stalled validations",
    ("finetune/services.py", "training_file_validations_resume"): "the periodic task finds tenants whose uploads wait",
    ("billing/rating.py", "*"): "rating runs once a day over every tenant's ledger",
    ("billing/prices.py", "PriceBook.__init__"): "adapter names are unique across tenants: a fine-tuned model's base",
    ("billing/invoicing.py", "period_close"): "closing a month finds every tenant with usage",
    ("billing/invoicing.py", "charged_cents"): "staff reports over many tenants' invoices",
    ("billing/models.py", "price_start_error"): "a price's start is checked against every tenant's invoices",
    ("billing/selectors.py", "first_usage_period"): "staff pages: the first month of any tenant's usage",
    ("billing/selectors.py", "cost_allocation"): "staff pages: every tenant's share of the pools",
    ("billing/services.py", "_invoice_for"): "a Stripe event names our invoice by uuid or Stripe id, any tenant's",
    ("billing/services.py", "_overdue"): "the dunning run looks at every tenant's overdue invoices",
    ("billing/tasks.py", "stripe_reconcile"): "the periodic task re-enqueues every tenant's stuck invoices",
    ("billing/alerts.py", "alerts_check_all"): "the periodic alerts check finds every tenant with alert settings",
    ("portal/management/commands/demo_setup.py", "Command._reload_adapters"): "demo setup, staff-side",
}
UNSCOPED_BY_DEFAULT_ALLOWED = {("tenants/scoping.py", "*"), ("tenants/admin.py", "AllTenantsInlineFormSet.add_fields")}
# Where a pool query may name dedicated_tenant: THE scoped queries for a tenant's pools.
DEDICATED_TENANT_ALLOWED = {("serving/models.py", "PoolQuerySet.reachable_by"), ("serving/models.py", "PoolQuerySet.dedicated_to")}
QUERY_CALLS = {"filter", "exclude", "get", "Q"}


def _allowed(allowed, path: str, where: str) -> bool:
    return (path, where) in allowed or (path, "*") in allowed


def fail_open_forms(source: str, path: str) -> tuple[list[str], set[tuple[str, str]]]:
    """(problems, the ALL_TENANTS_ALLOWED entries used) of one module's source."""
    problems, used = [], set()

    def model_name(node) -> str | None:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        return name if name in TENANT_OWNED_NAMES else None

    def visit(node, where: list[str]):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*where, child.name])
                continue
            here, at = ".".join(where) or "<module>", f"{path}:{getattr(child, 'lineno', '?')}"
            if isinstance(child, ast.Attribute):
                if child.attr == "all_tenants":
                    key = (path, "*") if (path, "*") in ALL_TENANTS_ALLOWED else (path, here)
                    if key in ALL_TENANTS_ALLOWED:
                        used.add(key)
                    else:
                        problems.append(f"{at} ({here}): .all_tenants outside ALL_TENANTS_ALLOWED")
                elif child.attr in ("_default_manager", "_base_manager"):
                    problems.append(f"{at} ({here}): {child.attr} (use Model.objects.for_tenant(tenant))")
            elif isinstance(child, ast.Call):
                func = child.func.id if isinstance(child.func, ast.Name) else getattr(child.func, "attr", None)
                if func in ("get_object_or_404", "get_list_or_404") and child.args and model_name(child.args[0]):
                    problems.append(f"{at} ({here}): {func}({model_name(child.args[0])}, …): pass "
                                    f"{model_name(child.args[0])}.objects.for_tenant(tenant) instead")
                if func == "all_tenants_by_default" and not _allowed(UNSCOPED_BY_DEFAULT_ALLOWED, path, here):
                    problems.append(f"{at} ({here}): all_tenants_by_default() is for Django internals in tenants/")
                hand_scoped = [k.arg for k in child.keywords if k.arg and k.arg.split("__")[0] in (
                    "dedicated_tenant", "dedicated_tenant_id") and k.arg != "dedicated_tenant__isnull"]
                if func in QUERY_CALLS and hand_scoped and not _allowed(DEDICATED_TENANT_ALLOWED, path, here):
                    problems.append(f"{at} ({here}): {func}({hand_scoped[0]}=…) scopes pools by hand: use "
                                    f"BackendPool.objects.dedicated_to(tenant) or .reachable_by(tenant)")
            visit(child, where)

    visit(ast.parse(source), [])
    return problems, used


def _app_modules():
    for package in APP_PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            if "migrations" not in file.parts:
                yield file.relative_to(ROOT).as_posix(), file.read_text()


def test_app_code_has_no_fail_open_forms():
    problems, used = [], set()
    for path, source in _app_modules():
        found, entries = fail_open_forms(source, path)
        problems += found
        used |= entries
    assert not problems, "Fail-open forms in app code:\n" + "\n".join(problems)
    stale = set(ALL_TENANTS_ALLOWED) - used
    assert not stale, f"ALL_TENANTS_ALLOWED names places that no longer use all_tenants: {sorted(stale)}"


@pytest.mark.parametrize("source, problem", [
    ("get_object_or_404(Invoice, pk=1)", "get_object_or_404(Invoice, …)"),
    ("get_list_or_404(models.ApiKey)", "get_list_or_404(ApiKey, …)"),
    ("def view(request):\n    return Invoice.all_tenants.get(pk=1)", "view): .all_tenants outside"),
    ("Membership._default_manager.all()", "_default_manager"),
    ("Adapter._base_manager.all()", "_base_manager"),
    ("with all_tenants_by_default(Invoice):\n    pass", "all_tenants_by_default() is for Django internals"),
    ("class Sneaky:\n    def get_queryset(self):\n        return ApiKey.all_tenants.all()", "Sneaky.get_queryset"),
    ("BackendPool.objects.filter(dedicated_tenant=tenant)", "filter(dedicated_tenant=…) scopes pools by hand"),
    ("BackendPool.objects.exclude(dedicated_tenant_id=t.pk)", "exclude(dedicated_tenant_id=…)"),
    ("pools.filter(Q(dedicated_tenant__slug=slug))", "Q(dedicated_tenant__slug=…)"),
    ("BackendPool.objects.get(name=n, dedicated_tenant__pk=1)", "get(dedicated_tenant__pk=…)"),
])
def test_the_walk_finds_each_fail_open_form(source, problem):
    problems, _ = fail_open_forms(source, "billing/views.py")
    assert len(problems) == 1 and problem in problems[0]


def test_the_walk_lets_scoped_forms_and_allowed_places_pass():
    scoped = ("get_object_or_404(Invoice.objects.for_tenant(t), pk=1)\nget_object_or_404(Tenant, pk=1)\n"
              "invoice.own_row().update(x=1)\n")
    assert fail_open_forms(scoped, "billing/views.py") == ([], set())
    allowed = "def _overdue(now):\n    return Invoice.all_tenants.filter()"
    assert fail_open_forms(allowed, "billing/services.py") == ([], {("billing/services.py", "_overdue")})
    pools = ("BackendPool.objects.dedicated_to(t)\nBackendPool.objects.reachable_by(t).filter(base_model=b)\n"
             "BackendPool.objects.filter(dedicated_tenant__isnull=True)\nBackendPool(dedicated_tenant=t)\n")
    assert fail_open_forms(pools, "serving/views.py") == ([], set())
    queryset = "class PoolQuerySet:\n    def dedicated_to(self, tenant):\n        return self.filter(dedicated_tenant=tenant)"
    assert fail_open_forms(queryset, "serving/models.py") == ([], set())
    assert fail_open_forms(queryset.replace("dedicated_to", "mine"), "serving/models.py")[0]  # only the named two


# ---- the API bases -------------------------------------------------------------------------------


def _view_classes(resolver=None, prefix=""):
    for p in (resolver or get_resolver()).url_patterns:
        route = prefix + str(p.pattern)
        if isinstance(p, URLResolver):
            yield from _view_classes(p, route)
        elif isinstance(p, URLPattern):
            cls = getattr(p.callback, "cls", None) or getattr(p.callback, "view_class", None)
            if isinstance(cls, type) and issubclass(cls, APIView):
                yield route, cls


def test_every_v1_and_tenant_api_view_derives_from_its_guarded_base():
    views = list(_view_classes())
    v1 = [(route, cls) for route, cls in views if route.startswith("v1/")]
    assert len(v1) >= 10
    assert [r for r, cls in v1 if not issubclass(cls, OpenAIView)] == []
    assert [r for r, cls in views if "<slug:tenant_slug>" in r and not issubclass(cls, TenantAPIView)] == []


@pytest.mark.parametrize("method", OpenAIView._FINAL)
def test_v1_views_cannot_bypass_the_key_tenant(method):
    with pytest.raises(TypeError, match=f"may not override {method}: tenant resolution is OpenAIView's alone"):
        type("Sneaky", (OpenAIView,), {method: lambda self, *a, **k: None})


@pytest.mark.parametrize("base", [OpenAIView, TenantAPIView])
def test_a_mixin_or_a_shorter_final_list_cannot_bypass_it_either(base):
    mixin = type("Mixin", (), {"initial": lambda self, *a, **k: None})
    with pytest.raises(TypeError, match="may not override initial"):
        type("Sneaky", (mixin, base), {})
    with pytest.raises(TypeError, match="may not override _FINAL"):
        type("Sneaky", (base,), {"_FINAL": ()})
    assert type("Fine", (base,), {"get": lambda self, request: None})  # handlers are the subclass's own


# ---- staff admin ---------------------------------------------------------------------------------


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("staff@platform.test", "staff@platform.test", "pw-123456789")


ADMINS = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)


@pytest.mark.parametrize("model, model_admin", ADMINS, ids=[m._meta.label for m, _ in ADMINS])
def test_every_admin_page_opens_for_staff_over_every_tenant(client, staff, world, model, model_admin):
    client.force_login(staff)
    request = RequestFactory().get("/admin/")
    request.user = staff
    rows = [make_row(model, bare_tenant()), make_row(model, bare_tenant())]
    base = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
    listing = client.get(base)
    assert listing.status_code == 200
    assert {r.pk for r in rows} <= {obj.pk for obj in listing.context["cl"].result_list}  # two tenants' rows, one page
    if model_admin.has_add_permission(request):
        assert client.get(base + "add/").status_code == 200
    for row in rows:
        change = f"{base}{row.pk}/change/"
        form = change_form(client, change)
        if model_admin.has_change_permission(request, row):
            # Unchanged: the admin's validation (uniqueness included) and formsets run. A row made of plain values may
            # not pass a form's own rules (200, the errors shown); an unscoped query would raise here instead.
            assert client.post(change, form).status_code in (200, 302)
        assert client.get(f"{base}{row.pk}/history/").status_code == 200


def test_a_price_offers_and_keeps_any_tenants_adapter(client, staff, world):
    """Price.adapter, a foreign key to a tenant-owned model, is an autocomplete over every tenant's adapters."""
    from billing.models import Price, utc_tomorrow
    from serving.models import Adapter

    adapter = make_row(Adapter, bare_tenant())
    price = Price.objects.create(base_model=adapter.base_model, adapter=adapter, input_price=1, output_price=1,
                                 training_price=1, effective_from=utc_tomorrow())
    client.force_login(staff)
    url = f"/admin/billing/price/{price.pk}/change/"
    form = change_form(client, url)
    assert form["adapter"] == str(adapter.pk) and adapter.name in client.get(url).content.decode()
    found = client.get("/admin/autocomplete/", {"term": adapter.name, "app_label": "billing", "model_name": "price",
                                                "field_name": "adapter"}).json()
    assert [r["id"] for r in found["results"]] == [str(adapter.pk)]
    form["input_price"] = "2"
    assert client.post(url, form).status_code == 302
    assert Price.objects.get(pk=price.pk).input_price == 2
