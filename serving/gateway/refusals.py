"""Refusals the gateway repeats without asking admission again.

Every request counts one against the tenant's requests-per-minute bucket — admitted, refused by admission, or refused
before it (unreadable, invalid, past the context: `count_refused`) — except one refused because the bucket is empty.
Whenever a request leaves the bucket empty (it took the last one, or was refused for it), admission says how long until
it holds one again (`Decision.rpm_retry_ms`, rounded up to the millisecond, counted from when admission looked).
Nothing can make that sooner — other requests only take from the bucket, a refusal for it takes nothing, a settle
gives nothing back — so until then every request of that tenant is refused `requests_per_minute_exceeded` right after
authentication: its body is not read, its prompt not counted, admission not asked. A tenant flooding past its limit,
with valid, oversized or broken requests alike, then costs the platform an authentication per request, not a read,
a parse, a tokenization and a Redis round trip (bench/noisy_neighbour.py, "chats", "oversize", "huge").

It refuses only what admission would refuse: the deadline is taken from before admission was asked, less the
millisecond of rounding, and a change of the tenant's limits (staff raising them: a new snapshot) drops it. One
case is looser: while Redis is away a process admits on its own in-process bucket (docs/limits.md), and a refusal
noted then can outlive the outage by at most that bucket's wait.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from serving.admission import Decision, duration, rpm_refusal
from serving.gateway.errors import ApiError


def refusal_error(decision: Decision, retry_after: int | None = None) -> ApiError:
    """Admission's refusal as the client gets it (429 and OpenAI's error shape, `retry-after`)."""
    retry_after = decision.retry_after if retry_after is None else retry_after
    return ApiError(decision.status, decision.message, type=decision.error_type or None, code=decision.code or None,
                    headers={"retry-after": str(retry_after)} if retry_after else None)


@dataclass(frozen=True, slots=True)
class _Held:
    until: float  # time.monotonic() before which the bucket cannot hold a request
    limits: object  # the TenantLimits it was noted under
    headers: dict  # the rate-limit headers admission gave then


class RefusalMemo:
    """Per process: the tenants whose requests-per-minute bucket is known to be empty, and until when."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._held: dict[int, _Held] = {}

    def note(self, tenant, decision: Decision, *, asked_at: float) -> None:
        """After admission (admitted or refused) or a refusal's count: `asked_at` is the clock just before admission
        was asked. Noted when the tenant's bucket is empty now."""
        if decision.rpm_retry_ms > 1:
            headers = {k: v for k, v in decision.headers.items() if k != "retry-after"}
            self._held[tenant.id] = _Held(asked_at + (decision.rpm_retry_ms - 1) / 1000, tenant.limits, headers)

    def replay(self, tenant) -> tuple[ApiError, dict[str, str]] | None:
        """(the refusal, its headers) while the tenant's bucket is known to be empty, else None (ask admission)."""
        held = self._held.get(tenant.id)
        if held is None:
            return None
        left = held.until - self._clock()
        if left <= 0 or held.limits != tenant.limits:
            self._held.pop(tenant.id, None)
            return None
        retry_after = max(1, math.ceil(left))
        headers = {**held.headers, "retry-after": str(retry_after), "x-ratelimit-remaining-requests": "0"}
        rpm = tenant.limits.requests_per_minute
        if rpm:  # until the bucket is full again: the next request in `left`, then rpm - 1 more at one each 60/rpm s
            headers["x-ratelimit-reset-requests"] = duration(left + (rpm - 1) * 60 / rpm)
        error_type, code, message, _ = rpm_refusal(tenant.limits, retry_after * 1000)
        return ApiError(429, message, type=error_type, code=code, headers={"retry-after": str(retry_after)}), headers
