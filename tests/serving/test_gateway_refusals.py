"""serving.gateway.refusals: a requests-per-minute refusal repeated without admission, never past what admission
would refuse."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from serving.admission import Decision, TenantLimits, duration
from serving.gateway.refusals import RefusalMemo

LIMITS = TenantLimits(tenant_id=1, requests_per_minute=60)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def refused(code="requests_per_minute_exceeded", rpm_retry_ms=1500):
    return Decision(False, {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": "60s", "retry-after": "2"}, None, 429, "rate_limit_exceeded",
                    code, "Too many requests", 2, rpm_retry_ms=rpm_retry_ms)


def tenant(limits=LIMITS):
    return SimpleNamespace(id=limits.tenant_id, limits=limits)


def test_a_refusal_is_repeated_until_the_bucket_can_hold_a_request_and_not_after():
    clock = Clock()
    memo = RefusalMemo(clock)
    memo.note(tenant(), refused(rpm_retry_ms=1500), asked_at=clock.now - 0.2)  # admission took 0.2 s to answer
    clock.now += 1.0
    err, headers = memo.replay(tenant())
    assert (err.status, err.code, err.type) == (429, "requests_per_minute_exceeded", "rate_limit_exceeded")
    assert headers["retry-after"] == "1" and headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == duration(0.299 + 59)  # the next request, then 59 more at 1 s each
    clock.now += 0.299  # 1.5 s after admission looked, less the millisecond of rounding: ask admission again
    assert memo.replay(tenant()) is None
    assert memo.replay(tenant()) is None  # and it is forgotten


def test_only_requests_per_minute_refusals_are_repeated():
    memo = RefusalMemo(Clock())
    for code in ("concurrency_limit_exceeded", "tokens_per_minute_exceeded", "insufficient_quota"):
        memo.note(tenant(), replace(refused(code), rpm_retry_ms=0), asked_at=100.0)
        assert memo.replay(tenant()) is None


def test_new_limits_drop_what_was_noted_under_the_old_ones_and_tenants_are_apart():
    clock = Clock()
    memo = RefusalMemo(clock)
    memo.note(tenant(), refused(rpm_retry_ms=30_000), asked_at=clock.now)
    assert memo.replay(tenant(TenantLimits(tenant_id=2, requests_per_minute=60))) is None  # another tenant
    assert memo.replay(tenant()) is not None
    assert memo.replay(tenant(replace(LIMITS, requests_per_minute=600))) is None  # staff raised it: ask admission
    assert memo.replay(tenant()) is None
