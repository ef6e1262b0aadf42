"""The per-tenant API rate (tenants/ratelimit.py): a token bucket per tenant over the management API and /v1 Files and
Fine-tuning, 429 with Retry-After in each face's error shape; the prompt diff cached by version pair and bounded."""

from __future__ import annotations

import io
import json
import logging

import pytest
from rest_framework.test import APIClient

from tenants import ratelimit, selectors, services
from tenants.models import ApiKey

SCOPES = [ApiKey.Scope.MANAGEMENT_READ.value, ApiKey.Scope.MANAGEMENT_WRITE.value, ApiKey.Scope.FINETUNE.value]


@pytest.fixture
def limit(settings):
    """60 a minute (one a second), bursts of 3, a diff or an upload 2; this process's buckets (its clock is the test's:
    the Redis tests below set REDIS_URL themselves)."""
    settings.REDIS_URL = ""
    settings.PLATFORM_API_REQUESTS_PER_MINUTE = 60
    settings.PLATFORM_API_BURST = 3
    settings.PLATFORM_API_EXPENSIVE_COST = 2
    return settings


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(ratelimit, "clock", lambda: now[0])
    return now


def key_client(tenant) -> APIClient:
    _, secret = services.api_key_create(tenant=tenant, name="k", scopes=SCOPES, actor=services.SYSTEM)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def session_client(user) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def members(client, slug="acme"):
    return client.get(f"/api/tenants/{slug}/members/")


def two_versions(world, old="Be kind.\nBe brief.", new="Be kind.\nBe exact."):
    actor = services.Actor(user=world.owner)
    services.system_prompt_save(tenant=world.tenant, text=old, note="", actor=actor)
    services.system_prompt_save(tenant=world.tenant, text=new, note="", actor=actor)


# ---- the management API ---------------------------------------------------------------------------------------


def test_a_tenant_past_its_burst_gets_429_with_retry_after_in_the_apis_shape(world, limit, clock):
    client = key_client(world.tenant)
    assert [members(client).status_code for _ in range(3)] == [200, 200, 200]
    refused = members(client)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"
    assert refused.json()["detail"].startswith("Too many API requests for the account 'acme': it may make 60 a minute")
    clock[0] += 1.0  # one unit refilled: one request, not two
    assert [members(client).status_code for _ in range(2)] == [200, 429]


def test_the_bucket_is_the_tenants_whoever_calls_and_other_tenants_keep_theirs(world, limit, clock):
    key, owner, viewer = key_client(world.tenant), session_client(world.owner), session_client(world.viewer)
    assert [members(c).status_code for c in (key, owner, viewer)] == [200, 200, 200]
    assert members(viewer).status_code == 429  # a member's session spends the same bucket as the tenant's key
    assert members(session_client(world.outsider), "globex").status_code == 200  # Globex's own bucket is full


def test_an_outsider_cannot_spend_another_tenants_bucket(world, limit, clock):
    outsider, viewer = session_client(world.outsider), session_client(world.viewer)
    foreign = key_client(world.other_tenant)
    assert {members(outsider).status_code for _ in range(5)} == {404}  # refused before the bucket
    assert {members(foreign).status_code for _ in range(5)} == {404}
    assert [members(viewer).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_a_prompt_diff_costs_the_expensive_price(world, limit, clock):
    two_versions(world)
    client = key_client(world.tenant)
    assert client.get("/api/tenants/acme/prompts/2/diff/").status_code == 200  # 2 of 3 units
    assert members(client).status_code == 200
    assert client.get("/api/tenants/acme/prompts/2/diff/").status_code == 429


def test_unlimited_when_the_rate_is_zero(world, settings):
    settings.PLATFORM_API_REQUESTS_PER_MINUTE, settings.PLATFORM_API_BURST = 0, 1
    client = key_client(world.tenant)
    assert {members(client).status_code for _ in range(5)} == {200}


# ---- /v1 Files and Fine-tuning -------------------------------------------------------------------------------


def test_v1_refuses_in_openais_shape_and_shares_the_tenants_bucket(world, limit, clock, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path
    client = key_client(world.tenant)
    assert members(client).status_code == 200
    assert [client.get("/v1/files").status_code for _ in range(2)] == [200, 200]
    refused = client.get("/v1/fine_tuning/jobs")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "rate_limit_exceeded", None)
    assert error["message"].startswith("Too many API requests for the account 'acme'")


def test_an_upload_is_refused_before_its_body_is_parsed(world, limit, clock, settings, tmp_path, monkeypatch):
    from finetune import services as finetune_services

    settings.STORAGE_DIR = tmp_path
    client = key_client(world.tenant)
    stored = []
    monkeypatch.setattr(finetune_services, "training_file_upload", lambda **kw: stored.append(kw) or 1 / 0)
    assert [members(client).status_code for _ in range(2)] == [200, 200]  # 1 unit left; an upload costs 2
    body = io.BytesIO(b'{"prompt": "a", "completion": "b"}\n')
    body.name = "t.jsonl"
    refused = client.post("/v1/files", {"purpose": "fine-tune", "file": body}, format="multipart")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert stored == []


def test_an_expensive_request_costs_one_unit_per_mib_of_its_body(limit):
    class View:
        expensive_methods = frozenset({"POST"})

    class Request:
        def __init__(self, method, length):
            self.method, self.META = method, {"CONTENT_LENGTH": str(length)}

    mib = 1_048_576
    assert ratelimit.cost_of(View(), Request("GET", 30 * mib)) == 1
    assert ratelimit.cost_of(View(), Request("POST", 100)) == 2  # the expensive price
    assert ratelimit.cost_of(View(), Request("POST", 30 * mib + 1)) == 31
    assert ratelimit.cost_of(View(), Request("POST", "x")) == 2


def test_a_cost_above_the_burst_is_charged_as_the_burst(world, limit, clock):
    assert ratelimit.take(tenant_id=world.tenant.pk, cost=50) == 0.0  # 3 units: all of them
    assert ratelimit.take(tenant_id=world.tenant.pk, cost=50) == pytest.approx(3.0)  # waits for the whole burst


# ---- Redis: one bucket for every process ------------------------------------------------------------------------


def test_with_redis_the_bucket_is_shared_by_every_process(world, limit, redis_url):
    limit.REDIS_URL = redis_url
    assert [ratelimit.take(tenant_id=world.tenant.pk) for _ in range(3)] == [0.0, 0.0, 0.0]
    ratelimit.reset_local()  # another process: nothing of its own
    wait = ratelimit.take(tenant_id=world.tenant.pk)
    assert 0 < wait <= 1.0
    assert ratelimit.take(tenant_id=world.other_tenant.pk) == 0.0


def test_a_redis_that_fails_falls_back_to_this_processs_bucket(world, limit, caplog):
    limit.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="tenants.ratelimit"):
        assert [ratelimit.take(tenant_id=world.tenant.pk) > 0 for _ in range(4)] == [False, False, False, True]
    assert "limiting in this process" in caplog.text


# ---- the prompt diff: cached, bounded ----------------------------------------------------------------------------


def test_a_diff_is_computed_once_per_version_pair(world, monkeypatch):
    two_versions(world)
    calls = []
    real = selectors.prompt_diff
    monkeypatch.setattr(selectors, "prompt_diff", lambda old, new: calls.append((old.version, new.version)) or real(old, new))
    client = key_client(world.tenant)
    first = client.get("/api/tenants/acme/prompts/2/diff/").json()
    again = client.get("/api/tenants/acme/prompts/2/diff/").json()
    page = session_client(world.viewer).get("/t/acme/prompt/diff/1/2/")
    assert page.status_code == 200 and first == again
    assert calls == [(1, 2)]  # the API's second answer and the console's page came from the cache
    client.get("/api/tenants/acme/prompts/2/diff/", {"against": 2})
    assert calls == [(1, 2), (2, 2)]  # another pair: its own diff


def test_a_diff_shows_at_most_diff_max_lines_and_counts_the_rest(world, monkeypatch):
    monkeypatch.setattr(selectors, "DIFF_MAX_LINES", 3)
    two_versions(world, "\n".join(f"old {i}" for i in range(5)), "\n".join(f"new {i}" for i in range(4)))
    body = key_client(world.tenant).get("/api/tenants/acme/prompts/2/diff/").json()
    assert [line["line"] for line in body["lines"]] == ["old 0", "old 1", "old 2"]
    assert (body["omitted_lines"], body["removed"], body["added"]) == (6, 5, 4)
    page = session_client(world.viewer).get("/t/acme/prompt/diff/1/2/").content.decode()
    assert "6 more lines of the diff not shown" in page and "+4 added" in page and "new 0" not in page


def test_the_console_diff_spends_the_same_bucket_and_says_so(world, limit, clock):
    two_versions(world)
    viewer = session_client(world.viewer)
    assert viewer.get("/t/acme/prompt/diff/1/2/").status_code == 200  # 2 of 3
    refused = viewer.get("/t/acme/prompt/diff/1/2/")
    assert refused.status_code == 429 and refused["Retry-After"] == "1"
    assert "Too many API requests for the account" in refused.content.decode()


# ---- refused before the body is read -----------------------------------------------------------------------------


class Inner:
    """Django behind refuse_early: records whether it was called; reads the body as Django would."""

    def __init__(self):
        self.called = 0

    async def __call__(self, scope, receive, send):
        self.called += 1
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def asgi(app, method: str, path: str, headers: dict) -> tuple[int, dict, bytes, int]:
    """(status, headers, body, body messages read) of one request through `app`."""
    import asyncio

    read = []
    sent = []

    async def receive():
        read.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": len(read) < 3}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, len(read)


def test_after_a_refusal_an_upload_that_cannot_fit_is_refused_from_its_headers(world, limit, clock, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path
    _, secret = services.api_key_create(tenant=world.tenant, name="k", scopes=SCOPES, actor=services.SYSTEM)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    inner = Inner()
    app = ratelimit.refuse_early(inner)
    auth = {"authorization": f"Bearer {secret}", "content-length": str(30 * 1_048_576)}
    assert asgi(app, "POST", "/v1/files", auth)[0] == 200 and inner.called == 1  # nothing refused yet: on to Django
    assert [members(client).status_code for _ in range(3)] == [200, 200, 200]
    assert client.get("/v1/files").status_code == 429  # the view's refusal, remembered (0 units left)

    status, headers, body, read = asgi(app, "POST", "/v1/files", auth)
    assert (status, read, inner.called) == (429, 0, 1)  # not one byte of the body read; Django not called
    assert headers["retry-after"] == "3" and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    clock[0] += 1.0  # one unit: a cheap request may pass now, the upload (3, the burst) may not
    assert asgi(app, "GET", "/v1/files", {"authorization": f"Bearer {secret}"})[0] == 200
    assert asgi(app, "POST", "/v1/files", auth)[0] == 429
    clock[0] += 2.0
    assert asgi(app, "POST", "/v1/files", auth)[0] == 200  # the bucket may hold it: the view decides
    assert asgi(app, "POST", "/v1/files", {"authorization": "Bearer another"})[0] == 200  # another credential


def test_a_session_refused_for_one_tenant_is_not_refused_early_for_another(world, limit, clock):
    services.Membership.all_tenants.create(tenant=world.other_tenant, user=world.viewer, role="viewer")
    viewer = session_client(world.viewer)
    assert [members(viewer).status_code for _ in range(4)] == [200, 200, 200, 429]
    cookie = {"cookie": f"sessionid={viewer.cookies['sessionid'].value}"}
    app = ratelimit.refuse_early(Inner())
    status, _, body, _ = asgi(app, "GET", "/api/tenants/acme/members/", cookie)
    assert status == 429 and json.loads(body)["detail"].startswith("Too many API requests for the account 'acme'")
    assert asgi(app, "GET", "/api/tenants/globex/members/", cookie)[0] == 200
