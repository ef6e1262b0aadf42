"""Through the gateway: a request refused before admission (unreadable, invalid, past the context) counts one against
requests/min as an admitted one does, and once the bucket is empty the next are refused right after authentication,
body unread (issue 12, noisy neighbour). With REDIS_URL set the same tests run on Redis admission."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.admission import Decision, TenantLimits
from serving.gateway.refusals import RefusalMemo
from tenants import services
from tests.support.gateway import make_base_model, make_key, make_pool, post, usage_records, wait_for

def chat(gw, key):
    return post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
                {"authorization": f"Bearer {key}"})


def settled_counters(tenant) -> dict[str, int]:
    """The tenant's month counters once nothing is reserved any more."""
    import asyncio

    from serving.admission import get_admission

    def now():
        snap = get_admission().snapshot(tenant.pk, "month")
        return asyncio.run(snap) if asyncio.iscoroutine(snap) else snap

    return wait_for(lambda: now()["reserved"] == 0 and now())


OVERSIZE = "hello " * 3000  # past the 1,024-token context: the gateway refuses it before admission


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """The tiny model's files (its tokenizer): the gateway counts prompts itself, so it refuses one past the context."""
    from devbackend.tinymodel import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chat"))


def over_context(gw, key):
    return post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": OVERSIZE}]},
                {"authorization": f"Bearer {key}"})


@pytest.mark.slow
def test_over_context_requests_use_up_requests_per_minute(world, gateway_factory, sim_url, tiny_files):
    make_pool("shared", make_base_model(local_path=tiny_files), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=5, tokens_per_minute=100_000)
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    refused = [over_context(gw, key) for _ in range(5)]
    assert [r.status_code for r in refused] == [400] * 5
    assert {r.json()["error"]["code"] for r in refused} == {"context_length_exceeded"}
    assert [r.headers["x-ratelimit-remaining-requests"] for r in refused] == ["4", "3", "2", "1", "0"]
    assert refused[0].headers["x-ratelimit-limit-requests"] == "5"
    valid = chat(gw, key)
    assert valid.status_code == 429 and valid.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert valid.headers["x-ratelimit-remaining-requests"] == "0" and int(valid.headers["retry-after"]) >= 1
    # The memo engaged: a body the gateway would refuse 413 unread is refused 429 without reading it.
    huge = post(f"{gw.url}/v1/chat/completions", b"x" * (gw.app.settings.max_body_bytes + 1), {"authorization": f"Bearer {key}"})
    assert huge.status_code == 429 and huge.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert usage_records(world.tenant) == [] and settled_counters(world.tenant) == {"used": 0, "reserved": 0}
    # Another tenant's requests are its own.
    _, other_key = make_key(world.other_tenant)
    assert wait_for(lambda: over_context(gw, other_key).status_code == 400)


def test_every_kind_of_request_counts_once(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=5)
    _, key = make_key(world.tenant)
    auth = {"authorization": f"Bearer {key}"}
    gw = gateway_factory()
    answers = [
        chat(gw, key),  # 200
        post(f"{gw.url}/v1/chat/completions", b"{not json", auth),  # 400 unreadable
        post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": "nope"}, auth),  # 400 invalid
        post(f"{gw.url}/v1/chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, auth),  # 404
        chat(gw, key),  # 200: took the last one
    ]
    assert [a.status_code for a in answers] == [200, 400, 400, 404, 200]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["4", "3", "2", "1", "0"]
    # Its bucket emptied by an admitted request: the next, even unreadable, is refused after authentication.
    broken = post(f"{gw.url}/v1/chat/completions", b"{not json", auth)
    assert broken.status_code == 429 and broken.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert len(usage_records(world.tenant)) == 2
    # A request with no valid key is nobody's: it counts against no tenant.
    assert post(f"{gw.url}/v1/chat/completions", b"{not json", {"authorization": "Bearer sk-wrong"}).status_code == 401


def test_the_memo_repeats_a_requests_per_minute_refusal_after_any_decision_that_emptied_the_bucket():
    limits = TenantLimits(tenant_id=7, requests_per_minute=60)
    tenant = SimpleNamespace(id=7, limits=limits)
    memo = RefusalMemo(lambda: 100.0)
    memo.note(tenant, Decision(True, {"x-ratelimit-remaining-requests": "3"}), asked_at=100.0)  # the bucket holds more
    assert memo.replay(tenant) is None
    too_large = Decision(False, {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0", "retry-after": "60"},
                         status=429, error_type="rate_limit_exceeded", code="request_exceeds_tokens_per_minute", message="…",
                         retry_after=60, rpm_retry_ms=900)
    memo.note(tenant, too_large, asked_at=99.5)
    err, headers = memo.replay(tenant)
    assert (err.status, err.type, err.code) == (429, "rate_limit_exceeded", "requests_per_minute_exceeded")
    assert "60 requests per minute" in err.message and headers["retry-after"] == "1" == err.headers["retry-after"]
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
