"""Per-key controls and money budgets through the real gateway: allowed models, a key's requests/min and monthly
budget, the tenant's hard monthly budget, and a rotated key's old secret during and after its grace period."""

from __future__ import annotations

from datetime import date, timedelta

from django.utils import timezone

from billing import spend
from tenants import services
from tenants.models import ApiKey
from tests.support.billing import price
from tests.support.gateway import make_base_model, make_key, make_pool, post, usage_records, wait_for

OWNER = services.SYSTEM


def chat(gw, key, model="tiny-chat", max_tokens=5):
    return post(f"{gw.url}/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
                {"authorization": f"Bearer {key}"})


def test_a_key_calls_only_its_allowed_models_and_lists_only_them(world, gateway_factory, sim_url):
    for name in ("tiny-chat", "other-chat"):
        make_pool(f"shared-{name}", make_base_model(name), [sim_url])
    limited, secret = make_key(world.tenant)
    services.api_key_controls_update(key=limited, actor=OWNER, tenant_models={"tiny-chat", "other-chat"}, allowed_models=["tiny-chat"])
    _, open_secret = make_key(world.tenant)
    gw = gateway_factory()
    assert chat(gw, secret).status_code == 200
    refused = chat(gw, secret, model="other-chat")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    listed = post(f"{gw.url}/v1/models", None, {"authorization": f"Bearer {secret}"}, method="GET").json()
    assert [m["id"] for m in listed["data"]] == ["tiny-chat"]
    assert chat(gw, open_secret, model="other-chat").status_code == 200


def test_a_keys_requests_per_minute_is_its_own(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    limited, secret = make_key(world.tenant)
    services.api_key_controls_update(key=limited, actor=OWNER, tenant_models=set(), requests_per_minute=2)
    _, other = make_key(world.tenant)
    gw = gateway_factory()
    assert [chat(gw, secret).status_code for _ in range(2)] == [200, 200]
    refused = chat(gw, secret)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "requests_per_minute_exceeded"
    # The key's limit that refused it, in OpenAI's headers (the key has no tokens/min: no tokens trio).
    headers = {k: v for k, v in refused.headers.items() if k.startswith("x-ratelimit-")}
    assert headers.pop("x-ratelimit-reset-requests") in ("1m0s", *(f"{s}s" for s in range(50, 60)))
    assert headers == {"x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "0"}
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert chat(gw, other).status_code == 200  # the tenant's other key is not limited


def test_a_keys_tokens_per_minute_refusal_carries_its_rate_limit_headers(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    limited, secret = make_key(world.tenant)
    services.api_key_controls_update(key=limited, actor=OWNER, tenant_models=set(), tokens_per_minute=50)
    gw = gateway_factory()
    refused = chat(gw, secret, max_tokens=100)  # reserves prompt + 100 tokens: more than the key's 50 per minute
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "request_exceeds_tokens_per_minute"
    headers = {k: v for k, v in refused.headers.items() if k.startswith("x-ratelimit-")}
    assert headers == {"x-ratelimit-limit-tokens": "50", "x-ratelimit-remaining-tokens": "50", "x-ratelimit-reset-tokens": "0ms"}
    assert refused.headers["retry-after"] == "60"


def test_a_keys_monthly_budget_and_the_tenants_hard_budget_refuse_with_insufficient_quota(world, gateway_factory, sim_url):
    base = make_base_model()
    make_pool("shared", base, [sim_url])
    # $1,000 / $2,000 per million tokens: a chat saying "hi" with 5 max tokens reserves about 14 cents (its prompt
    # counted as a bound), and costs a few cents.
    price(base, effective_from=date.today() - timedelta(days=1), inp="100000", out="200000")
    limited, secret = make_key(world.tenant)
    services.api_key_controls_update(key=limited, actor=OWNER, tenant_models=set(), monthly_budget_cents=20)
    _, other = make_key(world.tenant)
    services.spend_budget_set(tenant=world.tenant, monthly_cents=60, mode="hard", actor=OWNER)
    gw = gateway_factory()
    codes = [chat(gw, secret).status_code for _ in range(8)]
    assert codes[0] == 200 and codes[-1] == 429
    assert chat(gw, secret).json()["error"]["type"] == "insufficient_quota"
    codes = [chat(gw, other).status_code for _ in range(30)]
    assert 200 in codes and codes[-1] == 429
    start, end = spend.month_bounds()
    by_key = spend.ledger_usage_by_key(tenant=world.tenant, start=start, end=end)
    assert by_key[limited.pk].microcents <= 20 * spend.MICROCENTS_PER_CENT
    assert sum(u.microcents for u in by_key.values()) <= 60 * spend.MICROCENTS_PER_CENT
    assert all(r.status == "ok" for r in usage_records(world.tenant))  # the refused requests reached no backend


def test_a_rotated_keys_old_secret_works_through_its_grace_then_not(world, gateway_factory, sim_url):
    make_pool("shared", make_base_model(), [sim_url])
    key, old = make_key(world.tenant)
    key, new = services.api_key_rotate(key=key, grace=timedelta(hours=1), actor=OWNER)
    gw = gateway_factory()
    assert chat(gw, old).status_code == 200 and chat(gw, new).status_code == 200
    ApiKey.objects.for_tenant(world.tenant).filter(pk=key.pk).update(previous_valid_until=timezone.now() + timedelta(seconds=1))
    services.audit_record(tenant=world.tenant, actor=OWNER, action="api_key.rotated", target=key)  # bumps the gateway's snapshot
    assert wait_for(lambda: chat(gw, old).status_code == 401)
    assert chat(gw, new).status_code == 200
