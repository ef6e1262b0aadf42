"""How the APIs refuse a key or a suspended tenant, worded once for all of them.

Used by the inference gateway (serving/gateway/app.py), the OpenAI-compatible Files and Fine-tuning views
(finetune/v1_base.py) and the DRF key authentication (tenants/api_auth.py), so a client sees the same status, type,
code and message whichever endpoint it calls. 401s are `invalid_request_error`, as OpenAI answers a bad key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    """An error in OpenAI's terms: HTTP status, `type`, `code` and a message saying what to do."""

    status: int
    type: str
    code: str
    message: str


MISSING_KEY = Refusal(401, "invalid_request_error", "invalid_api_key", "Missing API key: send `Authorization: Bearer <key>`.")
INVALID_KEY = Refusal(401, "invalid_request_error", "invalid_api_key", "Invalid API key (unknown or revoked).")
EXPIRED_KEY = Refusal(401, "invalid_request_error", "expired_api_key", "This API key has expired: create a new one in the console.")


def tenant_suspended(slug: str, reason: str, *, disabled: str) -> Refusal:
    """403 `tenant_suspended`. `disabled` names what stops working ("inference", "fine-tuning"). The staff's or the
    billing's reason is shown in parentheses, without its final full stop (one stop per sentence)."""
    reason = reason.strip().rstrip(".").strip()
    because = f" ({reason})" if reason else ""
    return Refusal(403, "permission_error", "tenant_suspended",
                   f"The account {slug!r} is suspended{because}: {disabled} is disabled. Contact support.")
