from django.conf import settings
from django.urls import reverse

from tenants.models import Role
from tenants.selectors import memberships_for_user

# The tenant switcher keeps you on the same page: the path's first segments after /t/<slug>/ name the page to
# open in the other tenant (its list page, never an object of this tenant, which would be a 404 there).
SWITCH_TARGETS = {
    "members": "console-members", "keys": "console-keys", "prompt": "console-prompt", "limits": "console-limits",
    "playground": "console-playground", "models": "console-models", "usage": "console-usage", "audit": "console-audit",
    "settings": "console-settings", "billing": "billing-usage", "billing/invoices": "billing-invoices",
    "billing/payment-methods": "billing-payment-methods", "finetune": "finetune-files", "finetune/files": "finetune-files",
    "finetune/jobs": "finetune-jobs", "finetune/adapters": "finetune-adapters", "finetune/planner": "finetune-planner",
}
SWITCH_MIN_ROLE = {"console-playground": Role.DEVELOPER, "console-audit": Role.ADMIN}


def console(request):
    """What every console page needs: the user's tenants (switcher) and the current one, if any."""
    ctx = getattr(request, "tenant_ctx", None)
    memberships = memberships_for_user(request.user) if hasattr(request, "user") else []
    return {
        "user_memberships": memberships,
        "tenant_switch": [(m, _switch_url(request, ctx, m)) for m in memberships],
        "tenant_ctx": ctx,
        "current_tenant": ctx.tenant if ctx else None,
        # An operator's concern (limits counted per process without Redis): shown to platform staff only.
        "embedded_mode": not settings.REDIS_URL and getattr(getattr(request, "user", None), "is_staff", False),
    }


def _switch_url(request, ctx, membership) -> str:
    """The same page in `membership`'s tenant when its role may read it, else that tenant's dashboard."""
    name = "console-dashboard"
    if ctx is not None:
        parts = request.path.removeprefix(f"/t/{ctx.tenant.slug}/").strip("/").split("/")
        target = SWITCH_TARGETS.get("/".join(parts[:2])) or SWITCH_TARGETS.get(parts[0])
        if target and membership.has_role(SWITCH_MIN_ROLE.get(target, Role.VIEWER)):
            name = target
    return reverse(name, args=[membership.tenant.slug])
