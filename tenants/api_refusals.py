"""How the APIs refuse a suspended tenant, worded once for all of them.

Used by the inference gateway (serving/gateway/app.py) and the OpenAI-compatible Files and Fine-tuning views
(finetune/api.py), so a client sees the same status, type, code and message whichever endpoint it calls.
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


def tenant_suspended(slug: str, reason: str, *, disabled: str) -> Refusal:
    """403 `tenant_suspended`. `disabled` names what stops working ("inference", "fine-tuning"). The staff's or the
    billing's reason is shown in parentheses, without its final full stop (one stop per sentence)."""
    reason = reason.strip().rstrip(".").strip()
    because = f" ({reason})" if reason else ""
    return Refusal(403, "permission_error", "tenant_suspended",
                   f"The account {slug!r} is suspended{because}: {disabled} is disabled. Contact support.")
