"""Tenant console pages. Every view is a `tenant_view`: the tenant comes from the URL, the role is enforced there.

The dashboard is portal/dashboard.py (it reads every app). Role matrix (docs/console.md): every member reads;
admins and owners write (settings: the rename form is theirs alone); the audit log is admin+; anyone may leave. Objects are looked up inside the URL's tenant, so another tenant's id is a 404.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from common.text import sentence
from tenants import ratelimit, selectors, services
from tenants.access import TenantContext, tenant_view
from tenants.services import PLAYGROUND_ROLE
from tenants.forms import ApiKeyForm, AuditFilterForm, InviteForm, PromptForm, RoleForm, TenantNameForm, apply_service_errors
from tenants.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    PlatformSettings,
    Policy,
    Role,
    SystemPromptVersion,
)

AUDIT_PAGE_SIZE = 50
KEY_FORM_CLAIM_SECONDS = 24 * 3600  # how long a posted key form is remembered
AUDIT_PREFIXES = ["tenant.", "member.", "invitation.", "api_key.", "prompt.", "policy.", "security."]


def _render(request, ctx: TenantContext, template: str, section: str, context: dict | None = None, status: int = 200):
    """Render a console page; `section` marks the side-nav item as current."""
    return render(request, template, {"tenant": ctx.tenant, "section": section, "can_write": ctx.can(Role.ADMIN), **(context or {})}, status=status)


def _guard_owner_target(ctx: TenantContext, membership: Membership) -> None:
    """Only an owner may change or remove an owner (admins cannot grant owner either: role_choices_for)."""
    if membership.role == Role.OWNER and ctx.role != Role.OWNER:
        raise PermissionDenied("Only an owner can change or remove another owner.")


# ---- tenant settings -----------------------------------------------------------------------------


@tenant_view()
def tenant_settings(request, ctx: TenantContext):
    """Every member sees the settings; owners and admins rename the tenant (the slug never changes)."""
    tenant = ctx.tenant
    form = TenantNameForm(request.POST or None, initial={"name": tenant.name})
    if request.method == "POST" and form.is_valid():
        old = tenant.name
        try:
            services.tenant_rename(tenant=tenant, name=form.cleaned_data["name"], actor=ctx.actor)
        except ValidationError as exc:
            apply_service_errors(form, exc)
        else:
            if tenant.name == old:
                messages.info(request, f"The name is already “{old}”; nothing changed.")
            else:
                messages.success(request, f"Renamed “{old}” to “{tenant.name}”. The URL name stays {tenant.slug}.")
            return redirect("console-settings", tenant_slug=tenant.slug)
    context = {"form": form if ctx.can(Role.ADMIN) else None}
    return _render(request, ctx, "console/settings.html", "settings", context, status=400 if form.is_bound else 200)


# ---- members and invitations ---------------------------------------------------------------------


def _members_page(request, ctx: TenantContext, invite_form=None, status=200):
    tenant = ctx.tenant
    members = Membership.objects.for_tenant(tenant).select_related("user").order_by("user__email")
    invitations = [i for i in Invitation.objects.for_tenant(tenant).select_related("invited_by") if i.state == "pending"]
    can_manage = ctx.can(Role.ADMIN)
    rows = []
    for m in members:
        editable = can_manage and (m.role != Role.OWNER or ctx.role == Role.OWNER)
        rows.append({"m": m, "is_me": m.user_id == request.user.pk, "editable": editable,
                     "role_form": RoleForm(initial={"role": m.role}, granter=ctx.membership, prefix=f"m{m.pk}") if editable else None})
    return _render(
        request,
        ctx,
        "console/members.html",
        "members",
        {
            "rows": rows,
            "invitations": invitations,
            "invite_form": invite_form or (InviteForm(granter=ctx.membership) if can_manage else None),
            "ttl_hours": settings.INVITATION_TTL_HOURS,
            "last_owner": selectors.is_last_owner(ctx.membership),
        },
        status=status,
    )


@tenant_view()
def members(request, ctx: TenantContext):
    return _members_page(request, ctx)


@tenant_view()
@require_POST
def member_invite(request, ctx: TenantContext):
    form = InviteForm(request.POST, granter=ctx.membership)
    if form.is_valid():
        try:
            invitation, _token = services.invitation_create(
                tenant=ctx.tenant, email=form.cleaned_data["email"], role=form.cleaned_data["role"], actor=ctx.actor
            )
        except ValidationError as exc:
            apply_service_errors(form, exc)
        else:
            messages.success(request, f"Invitation sent to {invitation.email} as {invitation.get_role_display().lower()}.")
            return redirect("console-members", tenant_slug=ctx.tenant.slug)
    return _members_page(request, ctx, invite_form=form, status=400)


@tenant_view()
@require_POST
def member_role(request, ctx: TenantContext, membership_id: int):
    membership = get_object_or_404(Membership.objects.for_tenant(ctx.tenant).select_related("user", "tenant"), pk=membership_id)
    _guard_owner_target(ctx, membership)
    form = RoleForm(request.POST, granter=ctx.membership, prefix=f"m{membership.pk}")
    if not form.is_valid():
        messages.error(request, f"Role not changed: {'; '.join(form.errors['role'])}")
        return redirect("console-members", tenant_slug=ctx.tenant.slug)
    try:
        services.membership_change_role(membership=membership, role=form.cleaned_data["role"], actor=ctx.actor)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"{membership.user.email} is now {membership.get_role_display().lower()}.")
    return redirect("console-members", tenant_slug=ctx.tenant.slug)


@tenant_view(read=Role.ADMIN)
def member_remove(request, ctx: TenantContext, membership_id: int):
    membership = get_object_or_404(Membership.objects.for_tenant(ctx.tenant).select_related("user", "tenant"), pk=membership_id)
    _guard_owner_target(ctx, membership)
    if request.method == "POST":
        try:
            services.membership_remove(membership=membership, actor=ctx.actor)
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"{membership.user.email} was removed from {sentence(ctx.tenant.name)}")
            if membership.user_id == request.user.pk:
                return redirect("console-home")
        return redirect("console-members", tenant_slug=ctx.tenant.slug)
    return _render(request, ctx, "console/member_remove.html", "members", {"target": membership})


@tenant_view(read=Role.VIEWER, write=Role.VIEWER)
def member_leave(request, ctx: TenantContext):
    if request.method == "POST":
        try:
            services.membership_remove(membership=ctx.membership, actor=ctx.actor)
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
            return redirect("console-members", tenant_slug=ctx.tenant.slug)
        messages.success(request, f"You left {sentence(ctx.tenant.name)}")
        return redirect("console-home")
    return _render(request, ctx, "console/member_leave.html", "members", {"last_owner": selectors.is_last_owner(ctx.membership)})


@tenant_view()
@require_POST
def invitation_revoke(request, ctx: TenantContext, invitation_id: int):
    invitation = get_object_or_404(Invitation.objects.for_tenant(ctx.tenant).select_related("tenant"), pk=invitation_id)
    try:
        services.invitation_revoke(invitation=invitation, actor=ctx.actor)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(request, f"The invitation for {invitation.email} was revoked; its link no longer works.")
    return redirect("console-members", tenant_slug=ctx.tenant.slug)


# ---- API keys ------------------------------------------------------------------------------------


# The keys list (with each key's usage and spend), its limits and rotation are billing.control_views: they read the ledger.


@tenant_view(read=Role.ADMIN)
@never_cache
def key_create(request, ctx: TenantContext):
    form = ApiKeyForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        # The form's one-time value, claimed atomically: a second post of the same form makes no second key.
        claim = f"console:key-form:{ctx.tenant.id}:{form.cleaned_data['submission']}" if form.cleaned_data["submission"] else None
        if claim and not cache.add(claim, 0, timeout=KEY_FORM_CLAIM_SECONDS):
            return _key_form_reposted(request, ctx, cache.get(claim))
        try:
            key, secret = services.api_key_create(
                tenant=ctx.tenant, name=form.cleaned_data["name"], scopes=form.cleaned_data["scopes"], actor=ctx.actor, expires_at=form.expires_at
            )
        except ValidationError as exc:
            if claim:
                cache.delete(claim)  # nothing was created: the corrected form may be posted again
            apply_service_errors(form, exc, aliases={"expires_at": "expires_on"})
        else:
            if claim:
                cache.set(claim, key.pk, timeout=KEY_FORM_CLAIM_SECONDS)
            # Rendered straight from the POST (no redirect, never cached): the secret exists only in this response.
            return _render(request, ctx, "console/key_created.html", "keys", {"key": key, "secret": secret})
    return _render(request, ctx, "console/key_form.html", "keys", {"form": form}, status=400 if form.is_bound else 200)


def _key_form_reposted(request, ctx: TenantContext, key_id: int | None):
    """The same key form posted again (a reload of the page that showed the secret, a double click)."""
    key = ApiKey.objects.for_tenant(ctx.tenant).filter(pk=key_id).first() if key_id else None
    if key is None:
        messages.info(request, "This form was already submitted; no second key was created. The key list below shows what exists.")
    else:
        messages.warning(request, f"This form was already submitted: the key “{key.name}” ({key.prefix}…) was created then and its "
                                  "secret shown once. No second key was created. If you did not copy the secret, revoke that "
                                  "key and create another.")
    return redirect("console-keys", tenant_slug=ctx.tenant.slug)


@tenant_view(read=Role.ADMIN)
def key_revoke(request, ctx: TenantContext, key_id: int):
    key = get_object_or_404(ApiKey.objects.for_tenant(ctx.tenant).select_related("tenant"), pk=key_id)
    if request.method == "POST":
        if key.revoked_at:
            messages.info(request, f"The key “{key.name}” was already revoked.")
        else:
            services.api_key_revoke(key=key, actor=ctx.actor)
            messages.success(request, f"The key “{key.name}” ({key.prefix}…) is revoked. Requests using it are refused within seconds.")
        return redirect("console-keys", tenant_slug=ctx.tenant.slug)
    return _render(request, ctx, "console/key_revoke.html", "keys", {"key": key})


# ---- system prompt -------------------------------------------------------------------------------


def _prompt_version(ctx: TenantContext, number: int) -> SystemPromptVersion:
    return get_object_or_404(SystemPromptVersion.objects.for_tenant(ctx.tenant), version=number)


@tenant_view()
def prompt(request, ctx: TenantContext):
    """The live system prompt, its history, and (admins) the editor. Saving makes a draft: a new version that is not
    live until it is activated (after trying it in the playground), with a confirmation."""
    tenant = ctx.tenant
    active = tenant.active_prompt
    versions = SystemPromptVersion.objects.for_tenant(tenant).select_related("author")
    latest = versions.first()  # newest first
    if request.method == "POST":
        form = PromptForm(request.POST)
        if form.is_valid() and latest is not None and form.cleaned_data["text"] == latest.text:
            state = "live" if latest.pk == tenant.active_prompt_id else "a draft"
            messages.info(request, f"Nothing to save: version {latest.version} ({state}) already has this text.")
            return redirect("console-prompt", tenant_slug=tenant.slug)
        if form.is_valid():
            try:
                version = services.system_prompt_save(tenant=tenant, text=form.cleaned_data["text"], note=form.cleaned_data["note"],
                                                      actor=ctx.actor, activate=False)
            except ValidationError as exc:
                apply_service_errors(form, exc)
            else:
                messages.success(request, f"Saved as draft version {version.version}. It is not live yet: try it in the Playground, "
                                          "then make it live.")
                return redirect("console-prompt-version", tenant_slug=tenant.slug, version=version.version)
        status = 400
    else:
        form = PromptForm(initial={"text": latest.text if latest else ""})
        status = 200
    return _render(request, ctx, "console/prompt.html", "prompt", {
        "form": form, "versions": versions, "active": active, "latest": latest, "max_chars": settings.PLATFORM_MAX_PROMPT_CHARS,
        "can_try": ctx.can(PLAYGROUND_ROLE),
    }, status=status)


@tenant_view()
def prompt_version(request, ctx: TenantContext, version: int):
    v = _prompt_version(ctx, version)
    return _render(request, ctx, "console/prompt_version.html", "prompt", {
        "v": v, "is_active": ctx.tenant.active_prompt_id == v.pk, "active": ctx.tenant.active_prompt, "can_try": ctx.can(PLAYGROUND_ROLE),
    })


@tenant_view(read=Role.ADMIN)
def prompt_activate(request, ctx: TenantContext, version: int):
    """GET: the confirmation (which version goes live in place of which, a link to their diff). POST: make it live."""
    v = _prompt_version(ctx, version)
    active = ctx.tenant.active_prompt
    if ctx.tenant.active_prompt_id == v.pk:
        messages.info(request, f"Version {v.version} is already live.")
        return redirect("console-prompt", tenant_slug=ctx.tenant.slug)
    if request.method == "POST":
        services.system_prompt_activate(tenant=ctx.tenant, version=v, actor=ctx.actor)
        messages.success(request, f"Version {v.version} is now live: every request gets it within seconds.")
        return redirect("console-prompt", tenant_slug=ctx.tenant.slug)
    return _render(request, ctx, "console/prompt_activate.html", "prompt", {"v": v, "active": active})


@tenant_view()
def prompt_diff(request, ctx: TenantContext, version: int, other_version: int):
    old, new = _prompt_version(ctx, version), _prompt_version(ctx, other_version)
    page = {"old": old, "new": new, "versions": SystemPromptVersion.objects.for_tenant(ctx.tenant).values_list("version", flat=True)}
    try:  # the API's price for a diff, from the same bucket: the page is the same work in the same process
        ratelimit.charge(tenant=ctx.tenant, cost=settings.PLATFORM_API_EXPENSIVE_COST)
    except ratelimit.RateLimited as refused:
        response = _render(request, ctx, "console/prompt_diff.html", "prompt", {**page, "refused": refused.detail}, status=429)
        response["Retry-After"] = str(refused.wait)
        return response
    diff = selectors.prompt_diff_shown(old, new)
    return _render(request, ctx, "console/prompt_diff.html", "prompt",
                   {**page, "lines": diff.lines, "omitted": diff.omitted, "added": diff.added, "removed": diff.removed})


# ---- limits and audit ----------------------------------------------------------------------------


@tenant_view()
def limits(request, ctx: TenantContext):
    policy = get_object_or_404(Policy.objects.for_tenant(ctx.tenant))
    context = {"policy": policy, "effective_quota": selectors.effective_quota_tokens(policy)}
    if policy.fair_share:
        # The same figures selectors.effective_quota_tokens uses, shown so the derivation can be checked.
        context["r_total"] = PlatformSettings.load().fair_share_total_tokens
        context["weight_sum"] = selectors.fair_share_weight_sum()
    return _render(request, ctx, "console/limits.html", "limits", context)


@tenant_view(read=Role.ADMIN)
def audit(request, ctx: TenantContext):
    form = AuditFilterForm(request.GET or None)
    events = AuditEvent.objects.for_tenant(ctx.tenant).select_related("actor", "actor_key")
    prefix = ""
    if form.is_valid():
        prefix = form.cleaned_data["action"].strip()
        if prefix:
            events = events.filter(action__startswith=prefix)
    page = Paginator(events, AUDIT_PAGE_SIZE).get_page(request.GET.get("page"))
    return _render(request, ctx, "console/audit.html", "audit", {"form": form, "page": page, "prefix": prefix, "prefixes": AUDIT_PREFIXES})
