"""Failover, outages, mid-stream deaths, client disconnects and ledger idempotency (simulated dev backends)."""

from __future__ import annotations

import json

from openai import OpenAI

from serving.ledger import LedgerEntry, flush_batch
from serving.models import UsageRecord
from tests.support.gateway import (
    closed_port_url,
    dev_stats,
    make_base_model,
    make_key,
    make_pool,
    post,
    stream_lines,
    set_faults,
    sim_backend,
    stream_then_hang_up,
    usage_records,
    wait_for,
)


def test_chat_through_the_gateway_with_the_openai_sdk(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert answer.model == "tiny-chat" and answer.id.startswith("chatcmpl-")
    assert answer.usage.completion_tokens == 5 and answer.choices[0].message.content
    [record] = usage_records(world.tenant)
    assert record.status == "ok" and record.output_tokens == 5 and record.input_tokens == answer.usage.prompt_tokens


def test_failover_to_the_other_backend_when_one_is_down(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [closed_port_url(), sim_url])
    _, key = make_key(world.tenant)
    gw = gateway_factory(health_interval_s=60)  # no health round between requests: the request itself fails over
    client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
    for _ in range(3):
        answer = client.completions.create(model="tiny-chat", prompt="hello", max_tokens=3)
        assert answer.usage.completion_tokens == 3
    assert dev_stats(sim_url)["requests_completed"] == 3
    assert all(r.status == "ok" for r in usage_records(world.tenant))


def test_failover_on_overload_before_the_first_byte(world, gateway_factory):
    (a, stop_a), (b, stop_b) = sim_backend(), sim_backend()
    try:
        make_pool("shared", make_base_model(), [a, b])
        _, key = make_key(world.tenant)
        gw = gateway_factory()
        set_faults(a, status=503, count=100)
        set_faults(b, status=503, count=100)
        set_faults(b, status=None, count=0)
        client = OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        for _ in range(2):
            assert client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices[0].message.content
        assert dev_stats(b)["requests_completed"] == 2
    finally:
        stop_a()
        stop_b()


def test_all_backends_down_is_a_clear_503(world, gateway_factory):
    make_pool("shared", make_base_model(), [closed_port_url(), closed_port_url()])
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}]},
             {"authorization": f"Bearer {key}"})
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and "No healthy backend" in error["message"] and "try again in a few seconds" in error["message"]
    assert r.headers["retry-after"]


def test_backend_dying_mid_stream_sends_an_error_event_and_records_delivered_tokens(world, gateway_factory):
    url, stop = sim_backend(sim_tokens_per_second=200)
    try:
        make_pool("shared", make_base_model(), [url])
        _, key = make_key(world.tenant)
        gw = gateway_factory()
        set_faults(url, die_after_tokens=4)
        status, lines = stream_lines(f"{gw.url}/v1/chat/completions",
                                     {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, "stream": True},
                                     {"authorization": f"Bearer {key}"})
        assert status == 200
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert "[DONE]" not in events
        last = json.loads(events[-1])
        assert "error" in last and last["error"]["code"] == "backend_interrupted"
        content_chunks = [json.loads(e) for e in events[:-1]]
        delivered = sum(1 for c in content_chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        record = wait_for(lambda: usage_records(world.tenant))[0]
        assert record.status == "interrupted" and record.output_tokens == delivered and 0 < delivered <= 4
    finally:
        stop()


def test_generate_stream_error_event_in_tgi_shape(world, gateway_factory):
    url, stop = sim_backend(sim_tokens_per_second=200)
    try:
        make_pool("shared", make_base_model(), [url])
        _, key = make_key(world.tenant)
        gw = gateway_factory()
        set_faults(url, die_after_tokens=3)
        _, lines = stream_lines(f"{gw.url}/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 20}},
                                {"authorization": f"Bearer {key}"})
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert events[-1]["error_type"] == "incomplete_generation" and events[-1]["error"]
        assert wait_for(lambda: usage_records(world.tenant))[0].status == "interrupted"
    finally:
        stop()


def test_client_disconnect_cancels_the_backend_request(world, gateway_factory):
    url, stop = sim_backend(sim_tokens_per_second=20)
    try:
        make_pool("shared", make_base_model(), [url])
        _, key = make_key(world.tenant)
        gw = gateway_factory()
        stream_then_hang_up(gw.url, key, max_tokens=200)
        assert wait_for(lambda: dev_stats(url)["requests_cancelled"] == 1)
        record = wait_for(lambda: usage_records(world.tenant))[0]
        assert record.status == "cancelled" and 0 < record.output_tokens < 200
    finally:
        stop()


def test_ledger_writes_one_record_even_when_a_batch_is_written_twice(world):
    entry = LedgerEntry(request_id="req-retried", tenant_id=world.tenant.id, api_key_id=None, endpoint="chat", model="m",
                        adapter="", pool_id=None, backend_id=None, input_tokens=10, output_tokens=5, status="ok",
                        ttft_ms=1, duration_ms=2)
    flush_batch([entry])
    flush_batch([entry, entry])
    assert UsageRecord.objects.for_tenant(world.tenant).filter(request_id="req-retried").count() == 1


def test_vllm_pool_gets_a_per_tenant_cache_salt_and_no_client_salt(world, gateway_factory):
    url, stop = sim_backend(flavor="vllm")
    try:
        make_pool("vllm", make_base_model(), [url], kind="vllm")
        _, key = make_key(world.tenant)
        _, other_key = make_key(world.other_tenant)
        gw = gateway_factory()
        for k in (key, key, other_key):
            r = post(f"{gw.url}/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 2, "cache_salt": "chosen-by-client"}, {"authorization": f"Bearer {k}"})
            assert r.status_code == 200, r.text
        stats = dev_stats(url)
        assert stats["cache_salts"] == 2  # one per tenant
        sent = stats["last_request"]["body"]
        assert sent["cache_salt"] != "chosen-by-client" and sent["model"] == "platform/tiny-chat"
        r = post(f"{gw.url}/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}}, {"authorization": f"Bearer {key}"})
        assert r.status_code == 200 and dev_stats(url)["last_request"]["path"] == "/v1/completions"
    finally:
        stop()


def test_system_prompt_rules_for_chat():
    from serving.gateway.parsing import inject_system_prompt

    user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert inject_system_prompt(user, "OURS", "keep") == [{"role": "system", "content": "OURS\n\nbe brief"}, {"role": "user", "content": "hi"}]
    assert inject_system_prompt(user, "OURS", "replace") == [{"role": "system", "content": "OURS"}, {"role": "user", "content": "hi"}]
    assert inject_system_prompt(user[1:], "OURS", "keep") == [{"role": "system", "content": "OURS"}, {"role": "user", "content": "hi"}]
    assert inject_system_prompt(user, "", "replace") == user
