"""Limits through the real gateway: headers, 429s, soft-quota warning once, hard quota, refunds, playground tokens."""

from __future__ import annotations


from serving.admission import get_admission
from tenants import services
from tenants.models import AuditEvent
from tests.support.gateway import (
    make_base_model,
    make_key,
    make_pool,
    post,
    set_faults,
    sim_backend,
    stream_then_hang_up,
    usage_records,
    wait_for,
)


def counters(tenant) -> dict[str, int]:
    """The tenant's month counters now: {used, reserved}."""
    import asyncio

    snap = get_admission().snapshot(tenant.pk, "month")
    return asyncio.run(snap) if asyncio.iscoroutine(snap) else snap


def settled_counters(tenant) -> dict[str, int]:
    """The tenant's month counters once nothing is reserved any more (a dropped or failed request settles as it closes)."""
    return wait_for(lambda: counters(tenant)["reserved"] == 0 and counters(tenant))


def chat(gw, key, max_tokens=5):
    return post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
                {"authorization": f"Bearer {key}"})


def test_requests_per_minute_limit_answers_429_with_headers(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=2)
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    first, second, third = chat(gw, key), chat(gw, key), chat(gw, key)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2" and first.headers["x-ratelimit-remaining-requests"] == "1"
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) >= 1
    error = third.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "requests_per_minute_exceeded"
    assert len(usage_records(world.tenant)) == 2  # the refused request reached no backend and costs nothing


def test_a_tenant_past_its_requests_per_minute_is_refused_before_its_body_is_parsed(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=2)
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    assert [chat(gw, key).status_code for _ in range(3)] == [200, 200, 429]
    # While its bucket is known to be empty, not even the body is read as JSON: a body that would be a 400 is a 429.
    broken = post(f"{gw.url}/v1/chat/completions", b"{not json", {"authorization": f"Bearer {key}"})
    assert broken.status_code == 429 and broken.json()["error"]["code"] == "requests_per_minute_exceeded"
    assert broken.headers["x-ratelimit-remaining-requests"] == "0" and 1 <= int(broken.headers["retry-after"]) <= 30
    # Another tenant is not affected; staff raising the limit takes effect with the next snapshot.
    _, other_key = make_key(world.other_tenant)
    assert wait_for(lambda: post(f"{gw.url}/v1/chat/completions", b"{not json", {"authorization": f"Bearer {other_key}"}).status_code == 400)
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, requests_per_minute=100)
    assert wait_for(lambda: chat(gw, key).status_code == 200)
    assert len(usage_records(world.tenant)) == 3


def test_soft_quota_warns_once_in_audit_and_headers_then_throttles(world, gateway_factory, sim_url, mailoutbox):
    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=120, quota_mode="soft")
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    states = [chat(gw, key, max_tokens=10).headers["x-quota-state"] for _ in range(8)]
    assert "warning" in states and states[-1] == "throttled"
    warnings = wait_for(lambda: list(AuditEvent.objects.for_tenant(world.tenant).filter(action="quota.warning")))
    assert len(warnings) == 1 and warnings[0].data["quota_tokens"] == 120
    assert any("owner@acme.test" in m.to for m in mailoutbox)


def test_hard_quota_refuses_with_insufficient_quota(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    # Without the model's tokenizer here a request reserves a bound of its prompt (~90 tokens for "hi") + max tokens.
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=150, quota_mode="hard")
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    codes = [chat(gw, key, max_tokens=10).status_code for _ in range(6)]
    assert codes[0] == 200 and codes[-1] == 429
    refused = chat(gw, key, max_tokens=10)
    assert refused.json()["error"]["type"] == "insufficient_quota"
    used = sum(r.input_tokens + r.output_tokens for r in usage_records(world.tenant))
    assert used <= 150  # never overshoots


def test_failed_request_is_refunded_and_counters_match_the_ledger(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=10_000, quota_mode="hard", tokens_per_minute=5_000)
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    assert chat(gw, key).status_code == 200
    set_faults(sim_url, status=503, count=1)
    assert chat(gw, key).status_code == 503
    assert chat(gw, key).status_code == 200
    ledger = sum(r.input_tokens + r.output_tokens for r in usage_records(world.tenant))
    # The last answer's settlement runs as its response closes: wait for it rather than race it.
    assert settled_counters(world.tenant) == {"used": ledger, "reserved": 0}


def test_playground_token_is_an_inference_credential_for_its_tenant(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    gw = gateway_factory()
    token = services.playground_token_issue(tenant=world.tenant, user=world.developer)
    assert chat(gw, token).status_code == 200
    assert chat(gw, token[:-3] + "abc").status_code == 401
    [record] = usage_records(world.tenant)
    assert record.api_key_id is None


def test_playground_token_stops_working_when_its_user_is_demoted_or_removed(world, gateway_factory, sim_url):
    from tenants.models import Membership

    make_pool("shared", make_base_model(), [sim_url])
    gw = gateway_factory()
    developer = services.playground_token_issue(tenant=world.tenant, user=world.developer)
    admin = services.playground_token_issue(tenant=world.tenant, user=world.admin)
    assert chat(gw, developer).status_code == 200 and chat(gw, admin).status_code == 200

    membership = Membership.objects.for_tenant(world.tenant)
    services.membership_change_role(membership=membership.get(user=world.developer), role="viewer", actor=services.SYSTEM)
    services.membership_remove(membership=membership.get(user=world.admin), actor=services.SYSTEM)
    assert wait_for(lambda: chat(gw, developer).status_code == 401)  # within the token's hour, yet refused
    assert chat(gw, admin).status_code == 401
    # a token naming a user who never belonged to the tenant is refused as well
    assert chat(gw, services.playground_token_issue(tenant=world.tenant, user=world.outsider)).status_code == 401


def test_dropped_stream_is_settled_with_the_tokens_delivered(world, gateway_factory):
    url, stop = sim_backend(sim_tokens_per_second=50)
    try:
        make_pool("shared", make_base_model(), [url])
        services.policy_update(tenant=world.tenant, actor=services.SYSTEM, quota_tokens=100_000, quota_mode="hard", tokens_per_minute=50_000)
        _, key = make_key(world.tenant)
        gw = gateway_factory()
        stream_then_hang_up(gw.url, key, max_tokens=500)
        [record] = wait_for(lambda: usage_records(world.tenant))
        assert record.status == "cancelled" and record.output_tokens < 500
        assert settled_counters(world.tenant) == {"used": record.input_tokens + record.output_tokens, "reserved": 0}  # the unused 500-token reservation was refunded
    finally:
        stop()


def test_a_sequential_client_is_never_refused_by_its_own_previous_request(world, gateway_factory, sim_url):
    """Concurrency limit 1 and a hard quota: each answer's reservation is settled before its last byte, so the
    next request of a client that waits for answers is never counted against the previous one."""
    import requests

    make_pool("shared", make_base_model(), [sim_url])
    services.policy_update(tenant=world.tenant, actor=services.SYSTEM, max_concurrent_requests=1, quota_tokens=1_000_000, quota_mode="hard")
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with requests.Session() as session:  # keep-alive: the next request follows the last byte within microseconds
        for i in range(120):
            r = session.post(f"{gw.url}/v1/chat/completions", json={**body, "stream": i % 2 == 1},
                             headers={"authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200, (i, r.text)
            r.content  # noqa: B018 — read to the last byte
            now = counters(world.tenant)
            assert now["reserved"] == 0, (i, now)  # settled before the client saw the end
