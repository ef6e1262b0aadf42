"""The pipeline's first stage: the bearer credential → (key, tenant), from the configuration snapshot alone.

An API key (`mtl_<prefix>_<secret>`): its prefix is looked up, its secret's SHA-256 compared in constant time; it must
be unexpired, of a known tenant, with the `inference` scope; after a rotation the replaced secret is accepted until its
grace period ends. A key limited to some models sees its tenant with only those routed (`Snapshot.tenant_for`), so
any other model is a 404 `model_not_found` and /v1/models lists only its own. The console playground's signed, hour-long token (`pgt_…`)
is accepted for its tenant while its user is still listed there; one issued to try a prompt version (a draft) carries
that text, which replaces the live system prompt for its requests. A suspended tenant is refused either way. No database
access (the key's `last_used_at` is the caller's: `ConfigStore.note_key_used`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from django.utils import timezone

from serving.config import INFERENCE_SCOPE
from serving.gateway.errors import ApiError
from tenants.api_refusals import EXPIRED_KEY, INVALID_KEY, MISSING_KEY, tenant_suspended
from tenants.services import PLAYGROUND_PREFIX, playground_token_read, split_key


def authenticate(authorization: str | None, snap):
    """(key entry, or None for a playground token; tenant entry) for the `Authorization` header, or ApiError 401/403."""
    if not authorization or not authorization[:7].lower() == "bearer ":
        raise ApiError.refusing(MISSING_KEY)
    raw = authorization[7:].strip()
    if raw.startswith(PLAYGROUND_PREFIX):
        return None, _playground_tenant(raw, snap)
    parts = split_key(raw)
    entry = snap.keys.get(parts[0]) if parts else None
    if entry is None or not _secret_matches(entry, hashlib.sha256(parts[1].encode()).hexdigest()):
        raise ApiError.refusing(INVALID_KEY)
    if entry.expires_at is not None and entry.expires_at <= timezone.now():
        raise ApiError.refusing(EXPIRED_KEY)
    tenant = snap.tenant_for(entry, entry.tenant_id)
    if tenant is None:
        raise ApiError(401, "Invalid API key.", type="invalid_request_error", code="invalid_api_key")
    if INFERENCE_SCOPE not in entry.scopes:
        raise ApiError(403, "This API key does not have the `inference` scope.", type="permission_error", code="insufficient_scope")
    _check_active(tenant)
    return entry, tenant


def _secret_matches(entry, digest: str) -> bool:
    """The key's secret, or the one its last rotation replaced while that one's grace period lasts."""
    if hmac.compare_digest(entry.secret_hash, digest):
        return True
    return bool(entry.previous_secret_hash and entry.previous_valid_until is not None
                and entry.previous_valid_until > timezone.now() and hmac.compare_digest(entry.previous_secret_hash, digest))


def _check_active(tenant) -> None:
    if not tenant.active:
        raise ApiError.refusing(tenant_suspended(tenant.slug, tenant.suspended_reason, disabled="inference"))


def _playground_tenant(raw: str, snap):
    """The console playground's signed, hour-long token (tenants.services.playground_token_issue). A token that names a
    system prompt (a draft being tried) gets the tenant with that prompt in place of the live one."""
    token = playground_token_read(raw)
    tenant = snap.tenants.get(token.tenant_id) if token else None
    if tenant is None or token.user_id not in tenant.playground_users:  # removed, demoted or deactivated since
        raise ApiError(401, "The playground session has expired: reload the page.", type="invalid_request_error", code="invalid_api_key")
    _check_active(tenant)
    if token.system_prompt is not None:
        tenant = dataclasses.replace(tenant, system_prompt=token.system_prompt)
    return tenant
