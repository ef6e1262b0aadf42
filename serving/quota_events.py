"""What happens when a tenant crosses 80 % of its quota: told once per window (admission decides 'once')."""

from __future__ import annotations

import logging

from django.core.mail import send_mail
from django.db import close_old_connections, transaction

from tenants.models import Membership, Role, Tenant
from tenants.services import SYSTEM, audit_record

log = logging.getLogger(__name__)


def quota_warning_record(*, tenant_id: int, used_tokens: int, quota_tokens: int, window: str, mode: str) -> None:
    """Audit the warning and e-mail the tenant's owners and admins. The console shows a banner from the ledger.

    Runs on a gateway thread, outside any web request, where Django never closes a broken connection: closed here
    before and after (as serving.health does), so one the database dropped fails this warning, not every later one.
    """
    close_old_connections()
    try:
        _record(tenant_id=tenant_id, used_tokens=used_tokens, quota_tokens=quota_tokens, window=window, mode=mode)
    finally:
        close_old_connections()


def _record(*, tenant_id: int, used_tokens: int, quota_tokens: int, window: str, mode: str) -> None:
    tenant = Tenant.objects.get(pk=tenant_id)
    percent = 100 * used_tokens // quota_tokens if quota_tokens else 0
    with transaction.atomic():
        audit_record(
            tenant=tenant,
            actor=SYSTEM,
            action="quota.warning",
            data={"used_tokens": used_tokens, "quota_tokens": quota_tokens, "percent": percent, "window": window, "mode": mode},
        )
    admins = Membership.objects.for_tenant(tenant).filter(role__in=[Role.OWNER, Role.ADMIN]).values_list("user__email", flat=True)
    then = "requests will be throttled (slower, lower priority)" if mode == "soft" else "requests will be refused"
    send_mail(
        subject=f"{tenant.name} has used {percent} % of its token quota",
        message=(
            f"{tenant.name} has used {used_tokens:,} of its {quota_tokens:,} tokens for this {window} ({percent} %).\n"
            f"At 100 % {then} until the window resets. See the Usage page of the console, or ask support to raise the quota.\n"
        ),
        from_email=None,
        recipient_list=[e for e in admins if e],
        fail_silently=True,
    )
    log.info("Quota warning for tenant %s: %s of %s tokens", tenant.slug, used_tokens, quota_tokens)
