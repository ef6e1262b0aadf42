from django.conf import settings

from tenants.selectors import memberships_for_user


def console(request):
    """What every console page needs: the user's tenants (switcher) and the current one, if any."""
    ctx = getattr(request, "tenant_ctx", None)
    return {
        "user_memberships": memberships_for_user(request.user) if hasattr(request, "user") else [],
        "tenant_ctx": ctx,
        "current_tenant": ctx.tenant if ctx else None,
        "embedded_mode": not settings.REDIS_URL,
    }
