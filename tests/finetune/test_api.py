"""The OpenAI-compatible Files and Fine-tuning Jobs API (/v1/files, /v1/fine_tuning/jobs) and adapter deployment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from finetune import services as ft_services
from finetune.models import FineTuneJob, TrainingFile
from serving.models import Adapter, BaseModel
from tenants import services
from tenants.services import Actor
from tests.support.finetune import (
    assert_openai_error,
    committed,
    create_job,
    key_client,
    key_secret,
    signed_in,
    upload,
    upload_file,
    zebra_dataset,
)



FAULTY = [
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}',  # 1 fine
    "not json",  # 2 invalid_json
    "[1, 2]",  # 3 not_an_object
    '{"text": "x"}',  # 4 unknown_format
    '{"messages": "nope"}',  # 5 messages_not_list
    '{"messages": []}',  # 6 messages_empty
    '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',  # 7 invalid_role
    '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}]}',  # 8 system_not_first
    '{"messages": [{"role": "user", "content": "x"}]}',  # 9 no_assistant_message
    '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}',  # 10 empty_content
    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}',  # 11 invalid_weight
    '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "extra": 1}',  # 12 unknown_key
    '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',  # 13 content_not_string
    '{"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}',  # 14 last_not_assistant
]
FAULTS = {2: "invalid_json", 3: "not_an_object", 4: "unknown_format", 5: "messages_not_list", 6: "messages_empty",
          7: "invalid_role", 8: "system_not_first", 9: "no_assistant_message", 10: "empty_content",
          11: "invalid_weight", 12: "unknown_key", 13: "content_not_string", 14: "last_not_assistant"}


# ---- files ---------------------------------------------------------------------------------------


def test_upload_is_stored_then_validated_by_the_worker_with_the_base_models_token_counts(api, base_model):
    response = upload(api, zebra_dataset(20), model="tiny-chat")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-") and body["status"] == "uploaded"  # as stored
    assert body["bytes"] == len(zebra_dataset(20)) and body["filename"] == "train.jsonl" and body["purpose"] == "fine-tune"
    now = api.get(f"/v1/files/{body['id']}").json()  # after the worker's validation
    assert now["status"] == "processed" and now["status_details"] is None
    assert now["progress"] == {"percent": 100, "lines_validated": 20, "bytes_validated": len(zebra_dataset(20))}

    report = api.get(f"/v1/files/{body['id']}/validation").json()
    assert report["ok"] is True and report["problems"] == []
    assert report["stats"]["examples"] == 20 and report["stats"]["total_tokens"] > 0
    assert report["token_counts"]["tiny-chat"]["total_tokens"] == report["stats"]["total_tokens"]
    assert b"".join(api.get(f"/v1/files/{body['id']}/content").streaming_content) == zebra_dataset(20)
    listed = api.get("/v1/files").json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [body["id"]]


def test_every_fault_is_reported_with_its_line(api):
    response = upload(api, ("\n".join(FAULTY) + "\n").encode())
    assert response.status_code == 200
    body = api.get(f"/v1/files/{response.json()['id']}").json()
    assert body["status"] == "error" and "problem" in body["status_details"]
    problems = api.get(f"/v1/files/{body['id']}/validation").json()["problems"]
    found = {(p["line"], p["code"]) for p in problems}
    for line, code in FAULTS.items():
        assert (line, code) in found, f"line {line}: {code} missing from {sorted(found)}"
    assert all(p["message"] and "path" in p for p in problems)
    assert not any(p["line"] == 1 for p in problems)


def test_upload_refuses_other_purposes_and_missing_file(api):
    assert_openai_error(upload(api, zebra_dataset(), purpose="assistants"), 400, "invalid_purpose")
    assert_openai_error(api.post("/v1/files", {"purpose": "fine-tune"}, format="multipart"), 400, "missing_file")


def test_upload_over_the_cap_is_413(api, monkeypatch):
    monkeypatch.setattr(ft_services, "MAX_UPLOAD_BYTES", 100)
    assert_openai_error(upload(api, zebra_dataset()), 413, "file_too_large")


def test_files_of_another_tenant_are_404(api, outsider_api):
    file_id = upload(api, zebra_dataset()).json()["id"]
    for url in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content", f"/v1/files/{file_id}/validation"):
        assert_openai_error(outsider_api.get(url), 404)
    assert_openai_error(outsider_api.delete(f"/v1/files/{file_id}"), 404)
    assert outsider_api.get("/v1/files").json()["data"] == []


@pytest.mark.parametrize("accept", ["application/binary", "application/octet-stream", "*/*", "application/json",
                                    "text/plain", "image/png"])
def test_file_content_answers_the_bytes_whatever_accept_says(api, outsider_api, accept):
    file_id = upload(api, zebra_dataset()).json()["id"]
    response = api.get(f"/v1/files/{file_id}/content", HTTP_ACCEPT=accept)
    assert response.status_code == 200
    # Streamed from storage in blocks, never read whole into the web process.
    assert response.streaming and b"".join(response.streaming_content) == zebra_dataset()
    assert response["Content-Type"] == "application/octet-stream" and response["Content-Length"] == str(len(zebra_dataset()))
    assert response["Content-Disposition"] == 'attachment; filename="train.jsonl"'
    # Another tenant's id is a 404 in OpenAI's shape, whatever Accept says (never a 406 that confirms nothing).
    assert_openai_error(outsider_api.get(f"/v1/files/{file_id}/content", HTTP_ACCEPT=accept), 404, "file_not_found")


@pytest.mark.parametrize("body", [
    b'{"model": "tiny-chat", "training_file": "file-x", "hyperparameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"model": "tiny-chat", "training_file": "file-x", "suffix": "a\\ud800"}',
], ids=["nested-100000-deep", "lone-surrogate"])
def test_a_body_nested_too_deep_or_with_a_lone_surrogate_is_a_400_in_openais_shape(api, world, body):
    response = api.generic("POST", "/v1/fine_tuning/jobs", body, content_type="application/json")
    assert_openai_error(response, 400)
    assert not FineTuneJob.objects.for_tenant(world.tenant).exists()


def test_sdk_downloads_file_content_and_gets_404_for_another_tenants_file(world, sdk_for):
    from openai import NotFoundError

    acme = sdk_for(key_secret(world.tenant, world.owner))
    file_id = acme.files.create(file=("zebra.jsonl", zebra_dataset()), purpose="fine-tune").id
    assert acme.files.content(file_id).read() == zebra_dataset()
    assert acme.files.content(file_id).content == zebra_dataset()
    with pytest.raises(NotFoundError) as caught:
        sdk_for(key_secret(world.other_tenant, world.outsider)).files.content(file_id)
    assert caught.value.body["code"] == "file_not_found"


def files_with_known_times(api, world) -> list[str]:
    """Five uploaded files, their ids oldest first; the middle two share a created_at (ties break by id)."""
    from datetime import timedelta

    from django.utils import timezone

    ids = [upload(api, zebra_dataset(), name=f"f{i}.jsonl").json()["id"] for i in range(5)]
    start = timezone.now() - timedelta(hours=1)
    offsets = [0, 1, 2, 2, 3]
    for file_id, minutes in zip(ids, offsets):
        TrainingFile.objects.for_tenant(world.tenant).filter(pk=file_id).update(created_at=start + timedelta(minutes=minutes))
    return [i for _, i in sorted(zip(offsets, ids))]


def page_through(api, **params) -> list[str]:
    seen, after = [], None
    while True:
        page = api.get("/v1/files", {**params, **({"after": after} if after else {})}).json()
        seen += [f["id"] for f in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            return seen
        after = page["last_id"]


def test_files_list_orders_by_creation_both_ways_and_pages_with_after(api, world):
    oldest_first = files_with_known_times(api, world)
    assert [f["id"] for f in api.get("/v1/files").json()["data"]] == oldest_first[::-1]  # default: newest first
    assert [f["id"] for f in api.get("/v1/files?order=desc").json()["data"]] == oldest_first[::-1]
    assert [f["id"] for f in api.get("/v1/files?order=asc").json()["data"]] == oldest_first
    for limit in (1, 2, 10_000):
        assert page_through(api, order="asc", limit=limit) == oldest_first
        assert page_through(api, order="desc", limit=limit) == oldest_first[::-1]
        assert page_through(api, order="asc", limit=limit, purpose="fine-tune") == oldest_first
    assert api.get("/v1/files?order=asc&purpose=assistants").json()["data"] == []
    response = api.get("/v1/files?order=newest")
    assert_openai_error(response, 400)
    assert response.json()["error"]["param"] == "order" and "'asc'" in response.json()["error"]["message"]
    for bad in ("0", "10001", "x"):
        assert_openai_error(api.get(f"/v1/files?limit={bad}"), 400)


def test_sdk_lists_files_in_either_order_across_pages(api, world, sdk_for):
    oldest_first = files_with_known_times(api, world)
    client = sdk_for(key_secret(world.tenant, world.owner))
    assert [f.id for f in client.files.list(order="asc", limit=2)] == oldest_first  # the SDK pages with `after`
    assert [f.id for f in client.files.list(order="desc", limit=2)] == oldest_first[::-1]
    assert [f.id for f in client.files.list(order="asc", purpose="fine-tune")] == oldest_first


def test_delete_file_removes_bytes(api, world, settings):
    file_id = upload(api, zebra_dataset()).json()["id"]
    stored = TrainingFile.objects.for_tenant(world.tenant).get(pk=file_id)
    assert (settings.STORAGE_DIR / stored.path).is_file()
    assert str(stored.path).startswith(f"tenants/{world.tenant.pk}/files/")
    deleted = committed(lambda: api.delete(f"/v1/files/{file_id}"))  # the bytes go once the row's deletion commits
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not (settings.STORAGE_DIR / stored.path).exists()
    assert_openai_error(api.get(f"/v1/files/{file_id}"), 404)


def test_key_without_finetune_scope_gets_403_and_no_key_401(world):
    inference_only = key_client(world.tenant, world.owner, scopes=("inference", "management:read"))
    assert_openai_error(inference_only.get("/v1/files"), 403, "insufficient_scope")
    assert_openai_error(inference_only.post("/v1/fine_tuning/jobs", {}, format="json"), 403)
    assert_openai_error(APIClient().get("/v1/fine_tuning/jobs"), 401)


MISSING_KEY = {"message": "Missing API key: send `Authorization: Bearer <key>`.", "type": "invalid_request_error",
               "param": None, "code": "invalid_api_key"}
INVALID_KEY = {"message": "Invalid API key (unknown or revoked).", "type": "invalid_request_error", "param": None,
               "code": "invalid_api_key"}
EXPIRED_KEY = {"message": "This API key has expired: create a new one in the console.", "type": "invalid_request_error",
               "param": None, "code": "expired_api_key"}


def test_auth_errors_are_the_gateways_exactly(world):
    from datetime import timedelta

    from django.utils import timezone

    revoked, revoked_secret = services.api_key_create(tenant=world.tenant, name="old", scopes=["finetune"], actor=Actor(user=world.owner))
    services.api_key_revoke(key=revoked, actor=Actor(user=world.owner))
    expired, expired_secret = services.api_key_create(tenant=world.tenant, name="exp", scopes=["finetune"], actor=Actor(user=world.owner),
                                                      expires_at=timezone.now() + timedelta(days=1))
    type(expired).objects.for_tenant(world.tenant).filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    cases = [(None, MISSING_KEY), ("Basic dXNlcjpwYXNz", MISSING_KEY), ("Bearer", MISSING_KEY),
             ("Bearer sk-not-ours", INVALID_KEY), (f"Bearer {revoked_secret[:-2]}xx", INVALID_KEY),
             (f"Bearer {revoked_secret}", INVALID_KEY), (f"Bearer {expired_secret}", EXPIRED_KEY)]
    for header, expected in cases:
        client = APIClient()
        if header:
            client.credentials(HTTP_AUTHORIZATION=header)
        for response in (client.get("/v1/files"), client.get("/v1/fine_tuning/jobs"),
                         client.post("/v1/fine_tuning/jobs", {}, format="json")):
            assert response.status_code == 401 and response.json() == {"error": expected}, (header, response.content)
            assert response["WWW-Authenticate"] == "Bearer"


def test_sdk_with_a_bad_key_raises_authentication_error(sdk_for):
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError) as caught:
        sdk_for("mtl_000000000000_not-a-real-secret").files.list()
    assert caught.value.body == INVALID_KEY


@pytest.mark.parametrize("reason, shown", [
    ("Suspended by staff.", " (Suspended by staff)"),
    ("Payment overdue: pay invoice ACME-202601 in the console", " (Payment overdue: pay invoice ACME-202601 in the console)"),
    ("", ""),
])
def test_suspended_tenant_gets_403_tenant_suspended_worded_as_the_gateway_words_it(api, world, reason, shown):
    from tenants.api_refusals import tenant_suspended

    services.tenant_set_status(tenant=world.tenant, status="suspended", actor=services.SYSTEM, reason=reason)
    for url in ("/v1/files", "/v1/fine_tuning/jobs"):
        response = api.get(url)
        assert_openai_error(response, 403, "tenant_suspended")
        error = response.json()["error"]
        assert error["type"] == "permission_error"
        assert error["message"] == f"The account 'acme' is suspended{shown}: fine-tuning is disabled. Contact support."
    # the gateway's wording, from the same function
    assert tenant_suspended("acme", reason, disabled="inference").message == (
        f"The account 'acme' is suspended{shown}: inference is disabled. Contact support.")


# ---- unknown paths and methods under /v1/ --------------------------------------------------------


@pytest.mark.parametrize("method, url", [("post", "/v1/embeddings"), ("get", "/v1/files/"), ("get", "/v1/"),
                                          ("delete", "/v1/fine_tuning/jobs/ftjob-x/events/more"),
                                          ("post", "/v1/fine_tuning/jobs/"), ("get", "/v1/chat/completions/")])
def test_unknown_v1_paths_answer_openai_json_404(api, method, url):
    for client in (api, APIClient()):  # with a key or without one: the path is unknown either way
        response = getattr(client, method)(url)
        assert_openai_error(response, 404, "unknown_url")
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert error["message"].startswith(f"Invalid URL ({method.upper()} {url})"), error


def test_unknown_v1_path_message_says_what_to_do(api):
    assert api.get("/v1/files/").json()["error"]["message"] == (
        "Invalid URL (GET /v1/files/). Remove the trailing slash: GET /v1/files.")
    assert api.post("/v1/embeddings").json()["error"]["message"] == "Invalid URL (POST /v1/embeddings)."
    # Only a server without ASGI (e.g. runserver) lets the gateway's paths reach Django.
    assert "uvicorn portal.asgi:application" in api.post("/v1/chat/completions").json()["error"]["message"]


def test_wrong_method_on_a_known_v1_path_is_a_json_405(api):
    for client in (api, APIClient()):  # checked before the key, as the gateway does
        response = client.put("/v1/files")
        assert_openai_error(response, 405, "method_not_allowed")
        assert response.json()["error"]["message"] == "Use GET or POST on /v1/files."
        assert_openai_error(client.post("/v1/files/file-x/content"), 405, "method_not_allowed")


def test_sdk_raises_not_found_with_a_json_body_for_an_unknown_v1_path(world, sdk_for):
    from openai import NotFoundError

    client = sdk_for(key_secret(world.tenant, world.owner))
    with pytest.raises(NotFoundError) as caught:  # POST through the real middleware: no CSRF page either
        client.embeddings.create(model="tiny-chat", input="hello")
    assert caught.value.body == {"message": "Invalid URL (POST /v1/embeddings).", "type": "invalid_request_error",
                                 "param": None, "code": "unknown_url"}


def test_asgi_sends_unknown_v1_paths_to_django_which_answers_json_404():
    """portal.asgi gives the gateway its exact paths only; Django answers every other /v1 path with the JSON 404."""
    import asyncio

    import httpx2

    from portal.asgi import application

    async def call(method: str, url: str):
        async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://127.0.0.1") as client:
            return await client.request(method, url)

    for method, url in (("POST", "/v1/embeddings"), ("GET", "/v1/chat/completions/"), ("GET", "/v1/files/")):
        response = asyncio.run(call(method, url))
        assert response.status_code == 404 and response.headers["content-type"] == "application/json", response.text
        assert response.json()["error"]["code"] == "unknown_url"


# ---- jobs ----------------------------------------------------------------------------------------


def test_job_create_list_retrieve_cancel_events(api, world, base_model, _no_broker):
    file_id = upload(api, zebra_dataset(30)).json()["id"]
    response = create_job(api, file_id, metadata={"team": "risk"})
    assert response.status_code == 200, response.content
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["model"] == "tiny-chat" and job["organization_id"] == "acme"
    # auto multiplier: sqrt(1000 / 6 steps), at most 10
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 10, "learning_rate_multiplier": 10.0}
    assert job["method"]["type"] == "supervised" and job["training_file"] == file_id
    assert job["metadata"] == {"team": "risk"} and job["error"] is None and job["fine_tuned_model"] is None
    assert job["estimated_cost_cents"] >= 1
    assert _no_broker == []  # enqueued on commit only (the test transaction never commits)

    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]
    listed = api.get("/v1/fine_tuning/jobs?limit=1").json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == job["id"] and listed["has_more"] is False

    cancelled = api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    assert_openai_error(api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 409, "job_finished")

    events = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["object"] == "list"
    assert [e["message"] for e in events["data"]][0] == "Job cancelled by request"  # newest first
    assert all(e["object"] == "fine_tuning.job.event" and e["level"] == "info" for e in events["data"])
    page = api.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1&after={events['data'][0]['id']}").json()
    assert page["data"][0]["id"] == events["data"][1]["id"]
    assert api.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []


@pytest.mark.parametrize("status, words", [("cancelled", "is already cancelled"), ("succeeded", "has already succeeded"),
                                           ("failed", "has already failed")])
def test_cancelling_a_finished_job_is_409_in_plain_words(api, world, base_model, status, words):
    job_id = create_job(api, upload(api, zebra_dataset()).json()["id"]).json()["id"]
    FineTuneJob.objects.for_tenant(world.tenant).filter(pk=job_id).update(status=status)
    response = api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert_openai_error(response, 409, "job_finished")
    assert response.json()["error"]["message"] == f"Job {job_id} {words}, so it cannot be cancelled."


def test_cancel_of_a_job_that_finished_meanwhile_refuses_and_records_nothing(world, base_model):
    from finetune.models import JobEvent
    from tenants.models import AuditEvent

    actor = Actor(user=world.owner)
    file = upload_file(world.tenant, actor, zebra_dataset(), "z.jsonl")
    job = ft_services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=file.id)
    FineTuneJob.objects.for_tenant(world.tenant).filter(pk=job.pk).update(status="succeeded")  # the worker, just now
    events = JobEvent.objects.for_tenant(world.tenant).count()
    with pytest.raises(ft_services.FinetuneError, match="has already succeeded") as caught:
        ft_services.finetune_job_cancel(tenant=world.tenant, actor=actor, job=job)  # `job` still says queued
    assert caught.value.status == 409
    assert FineTuneJob.objects.for_tenant(world.tenant).get(pk=job.pk).status == "succeeded"
    assert JobEvent.objects.for_tenant(world.tenant).count() == events
    assert not AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.job_cancelled").exists()


def test_event_and_checkpoint_ids_are_opaque_and_page_with_after(api, world, base_model, sdk_for):
    """Their primary keys are a global sequence: `ftevent-13` would tell a tenant how many events all tenants made."""
    import re

    from finetune.models import JobCheckpoint, JobEvent

    file_id = upload(api, zebra_dataset()).json()["id"]
    job_id = create_job(api, file_id).json()["id"]
    api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=job_id)
    for n in range(5):
        JobEvent.objects.for_tenant(world.tenant).create(job=job, message=f"step {n}")
    for step in (10, 20, 30):
        JobCheckpoint.objects.for_tenant(world.tenant).create(job=job, step=step, epoch=step // 10, path=f"ckpt-{step}")

    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    assert len(events) == 8 and [c["step_number"] for c in checkpoints] == [30, 20, 10]
    for item, prefix in [*((e, "ftevent") for e in events), *((c, "ftckpt") for c in checkpoints)]:
        assert re.fullmatch(prefix + r"-[0-9a-f]{16}", item["id"]), item["id"]  # never `ftevent-<pk>`
    hex_values = [int(e["id"].removeprefix("ftevent-"), 16) for e in events]
    assert hex_values != sorted(hex_values) and hex_values != sorted(hex_values, reverse=True)  # no visible sequence

    def page_through(url: str) -> list[str]:
        seen, after = [], ""
        while True:
            page = api.get(f"{url}?limit=3{after}").json()
            seen += [item["id"] for item in page["data"]]
            if not page["has_more"]:
                return seen
            after = f"&after={seen[-1]}"

    assert page_through(f"/v1/fine_tuning/jobs/{job_id}/events") == [e["id"] for e in events]  # newest first
    assert page_through(f"/v1/fine_tuning/jobs/{job_id}/checkpoints") == [c["id"] for c in checkpoints]
    sdk = sdk_for(key_secret(world.tenant, world.owner))
    assert [e.id for e in sdk.fine_tuning.jobs.list_events(job_id, limit=2)] == [e["id"] for e in events]
    assert [c.id for c in sdk.fine_tuning.jobs.checkpoints.list(job_id, limit=2)] == [c["id"] for c in checkpoints]

    # `after` must name an event (checkpoint) of this job: not the old numeric form, not another job's, not garbage
    other_job = create_job(api, file_id).json()["id"]
    other_event = api.get(f"/v1/fine_tuning/jobs/{other_job}/events").json()["data"][0]["id"]
    last_pk = JobEvent.objects.for_tenant(world.tenant).filter(job=job).order_by("-pk").first().pk
    for bad in (other_event, f"ftevent-{last_pk}", "ftevent-ffffffffffffffff", "ftevent-zz", checkpoints[0]["id"]):
        response = api.get(f"/v1/fine_tuning/jobs/{job_id}/events?after={bad}")
        assert_openai_error(response, 400)
        assert response.json()["error"]["param"] == "after"
    assert_openai_error(api.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints?after={events[0]['id']}"), 400)


def test_public_ids_are_a_keyed_permutation_of_the_primary_key(settings):
    from finetune import public_ids

    for pk in (1, 2, 13, 10**6, 2**63 - 1):
        public = public_ids.encode("ftevent", pk)
        assert public_ids.decode("ftevent", public) == pk and public_ids.decode("ftckpt", public) is None
        assert public_ids.decode("ftckpt", public_ids.encode("ftckpt", pk)) == pk
    assert len({public_ids.encode("ftevent", pk) for pk in range(1, 2001)}) == 2000
    before = public_ids.encode("ftevent", 13)
    settings.SECRET_KEY = "another-secret-key-for-this-test-only-0123456789abcdefghijklmn"
    assert public_ids.encode("ftevent", 13) != before  # unpredictable without the key


def test_top_level_hyperparameters_and_auto(api, base_model):
    file_id = upload(api, zebra_dataset(20)).json()["id"]
    job = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": file_id,
                                            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto",
                                                                "learning_rate_multiplier": 5}},
                   format="json").json()
    assert job["hyperparameters"] == {"n_epochs": 5, "batch_size": 5, "learning_rate_multiplier": 5.0}  # 100/20 epochs
    assert job["lora"] == {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def test_estimate_previews_cost_and_time(api, world, base_model):
    file_id = upload(api, zebra_dataset(20), model="tiny-chat").json()["id"]
    body = api.post("/v1/fine_tuning/jobs/estimate", {"model": "tiny-chat", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 3}}, format="json").json()
    tokens = TrainingFile.objects.for_tenant(world.tenant).get(pk=file_id).token_counts["tiny-chat"]["total_tokens"]
    assert body["tokens_per_epoch"] == tokens and body["trained_tokens"] == 3 * tokens
    assert body["estimated_cost_cents"] == -(-(3 * tokens * 300) // 1_000_000)
    assert body["estimated_seconds"] >= 1 and FineTuneJob.objects.for_tenant(world.tenant).count() == 0
    # Loading the base model counts: estimated from its weights' size until a job has measured it.
    weights = (Path(base_model.local_path) / "model.safetensors").stat().st_size
    assert body["load_seconds"] == round(3.0 + weights / 250_000_000, 1)
    assert body["estimated_seconds"] == math.ceil(3.0 + weights / 250_000_000 + 3 * tokens / 5000)
    FineTuneJob.objects.for_tenant(world.tenant).create(  # a job has run: its measured figures replace the guesses
        base_model=base_model, training_file_id=file_id, status="succeeded", tokens_per_second=100.0, load_seconds=12.5,
        finished_at=timezone.now())
    body = api.post("/v1/fine_tuning/jobs/estimate", {"model": "tiny-chat", "training_file": file_id,
                                                      "hyperparameters": {"n_epochs": 3}}, format="json").json()
    assert body["load_seconds"] == 12.5 and body["estimated_seconds"] == math.ceil(12.5 + 3 * tokens / 100)


def test_auto_hyperparameters_for_a_newcomers_few_dozen_examples(api, base_model):
    """OpenAI's 3 epochs, batches of 8, and a learning rate for 15 steps: sqrt(1000/15) × the base model's 2e-4."""
    file_id = upload(api, zebra_dataset(40)).json()["id"]
    job = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": file_id}, format="json").json()
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 8.16}
    assert ft_services.resolve_hyperparameters({}, 10_000) == {"n_epochs": 2, "batch_size": 20,
                                                              "learning_rate_multiplier": 1.0}  # 1,000 steps
    assert ft_services.resolve_hyperparameters({}, 10)["learning_rate_multiplier"] == 4.47  # 10 epochs of 5 steps


def test_a_rank_no_pool_of_the_base_model_serves_is_refused_at_creation(api, world, base_model, monkeypatch):
    from serving.models import BackendPool

    monkeypatch.setattr(ft_services, "MAX_CONCURRENT_JOBS", 10)

    file_id = upload(api, zebra_dataset(20)).json()["id"]
    assert create_job(api, file_id, lora={"rank": 256}).status_code == 200  # no pool yet: nothing to check against
    BackendPool.objects.create(name="vllm-small", base_model=base_model, kind="vllm", max_lora_rank=8)
    BackendPool.objects.create(name="vllm-large", base_model=base_model, kind="vllm", max_lora_rank=32)
    BackendPool.objects.create(name="globex-only", base_model=base_model, kind="vllm", max_lora_rank=64,
                               dedicated_tenant=world.other_tenant)  # not a pool acme's adapters can go to
    for endpoint in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        body = {"model": "tiny-chat", "training_file": file_id, "lora": {"rank": 64}}
        response = api.post(endpoint, body, format="json")
        assert_openai_error(response, 400, "rank_not_served")
        error = response.json()["error"]
        assert error["param"] == "lora.rank" and "at most 32" in error["message"]
    count = FineTuneJob.objects.for_tenant(world.tenant).count()
    assert create_job(api, file_id, lora={"rank": 32}).json()["lora"]["rank"] == 32
    assert FineTuneJob.objects.for_tenant(world.tenant).count() == count + 1
    BackendPool.objects.filter(name="vllm-large").delete()
    assert create_job(api, file_id).json()["lora"] == {"rank": 8, "alpha": 16, "dropout": 0.0,
                                                        "target_modules": "all-linear"}  # default: what pools serve


def test_the_console_form_refuses_a_rank_no_pool_serves_on_its_field(world, base_model):
    from serving.models import BackendPool

    BackendPool.objects.create(name="vllm-tiny", base_model=base_model, kind="vllm", max_lora_rank=16)
    dev = signed_in(world.developer)
    file_id = upload_file(world.tenant, Actor(user=world.developer), zebra_dataset(20), "z.jsonl", base_model).id
    form = {"training_file": file_id, "model": "tiny-chat", "n_epochs": "auto", "batch_size": "auto",
            "learning_rate_multiplier": "auto", "suffix": "z", "lora_rank": "32"}
    page = dev.post("/t/acme/finetune/jobs/new/", form)
    assert page.status_code == 400 and FineTuneJob.objects.for_tenant(world.tenant).count() == 0
    assert page.context["form"].errors["lora_rank"] == [
        "LoRA rank 32 is above the highest rank the pools serving tiny-chat load (16): an adapter of that rank could "
        "not be served. Choose a rank of at most 16."]


def test_bad_job_input_answers_in_openai_shape(api, world, base_model):
    file_id = upload(api, zebra_dataset()).json()["id"]
    bad_file = upload(api, b"not json\n").json()["id"]
    assert_openai_error(api.post("/v1/fine_tuning/jobs", {"training_file": file_id}, format="json"), 400)
    assert_openai_error(create_job(api, file_id, model="gpt-17"), 404, "model_not_found")
    BaseModel.objects.create(name="remote-70b", hf_id="meta/remote")  # no local weights
    assert_openai_error(create_job(api, file_id, model="remote-70b"), 400, "model_not_trainable")
    assert_openai_error(create_job(api, "file-missing"), 404, "file_not_found")
    assert_openai_error(create_job(api, bad_file), 400, "invalid_file")
    assert_openai_error(create_job(api, file_id, validation_file=bad_file), 400, "invalid_file")
    same = create_job(api, file_id, validation_file=file_id)
    assert_openai_error(same, 400, "same_file")
    assert same.json()["error"]["param"] == "validation_file"
    assert_openai_error(create_job(api, file_id, suffix="a:b"), 400, "invalid_suffix")
    response = create_job(api, file_id, method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}})
    assert_openai_error(response, 400, "invalid_hyperparameter")
    assert response.json()["error"]["param"] == "n_epochs"
    assert_openai_error(create_job(api, file_id, lora={"target_modules": ["qkv"]}), 400, "invalid_lora")
    assert_openai_error(api.get("/v1/fine_tuning/jobs?limit=0"), 400)


def test_concurrent_jobs_limit_is_429(api, base_model):
    file_id = upload(api, zebra_dataset()).json()["id"]
    for _ in range(ft_services.MAX_CONCURRENT_JOBS):
        assert create_job(api, file_id).status_code == 200
    response = create_job(api, file_id)
    assert_openai_error(response, 429, "too_many_concurrent_jobs")
    assert "limit is 2" in response.json()["error"]["message"]


def test_jobs_of_another_tenant_are_404(api, outsider_api, base_model):
    job_id = create_job(api, upload(api, zebra_dataset()).json()["id"]).json()["id"]
    for url in ("", "/events", "/checkpoints"):
        assert_openai_error(outsider_api.get(f"/v1/fine_tuning/jobs/{job_id}{url}"), 404, "job_not_found")
    assert_openai_error(outsider_api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 404)
    assert outsider_api.get("/v1/fine_tuning/jobs").json()["data"] == []
    # nor can they train on acme's file
    acme_file = FineTuneJob.objects.for_tenant(FineTuneJob.all_tenants.get(pk=job_id).tenant).get(pk=job_id).training_file_id
    assert_openai_error(create_job(outsider_api, acme_file), 404, "file_not_found")
    # nor validate on it, nor page with it
    own_file = upload(outsider_api, zebra_dataset()).json()["id"]
    for endpoint in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        response = outsider_api.post(endpoint, {"model": "tiny-chat", "training_file": own_file, "validation_file": acme_file}, format="json")
        assert_openai_error(response, 404, "file_not_found")
    assert_openai_error(outsider_api.get(f"/v1/files?after={acme_file}"), 404, "file_not_found")
    assert_openai_error(outsider_api.get(f"/v1/fine_tuning/jobs?after={job_id}"), 404, "job_not_found")


def test_base_model_outside_allowed_models_is_404(api, world, base_model):
    from serving.models import ModelConfig

    ModelConfig.all_tenants.create(tenant=world.tenant, allowed_models=["other-model"])
    file_id = upload(api, zebra_dataset()).json()["id"]
    assert_openai_error(create_job(api, file_id), 404, "model_not_found")


# ---- adapters: management API --------------------------------------------------------------------


def test_adapter_deploy_needs_admin_and_hides_foreign_adapters(world, base_model):
    from serving.models import BackendPool

    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme::abc", base_model=base_model, path="/x")
    BackendPool.objects.create(name="tgi-pool", base_model=base_model, kind="tgi")
    viewer = APIClient()
    viewer.force_login(world.viewer)
    url = f"/api/tenants/acme/adapters/{adapter.pk}/deploy/"
    assert viewer.post(url).status_code == 403
    admin = APIClient()
    admin.force_login(world.admin)
    body = admin.post(url).json()
    assert body["state"] == "pending" and body["pool"] == "tgi-pool"
    outsider = APIClient()
    outsider.force_login(world.outsider)
    assert outsider.post(f"/api/tenants/globex/adapters/{adapter.pk}/deploy/").status_code == 404
    assert outsider.get("/api/tenants/acme/adapters/").status_code == 404
    assert [a["name"] for a in admin.get("/api/tenants/acme/adapters/").json()] == [adapter.name]


def test_adapter_of_a_base_model_the_tenant_may_no_longer_use_is_not_deployed(world, base_model):
    from serving.models import AdapterDeployment, BackendPool, ModelConfig

    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme::abc", base_model=base_model, path="/x")
    BackendPool.objects.create(name="tgi-pool", base_model=base_model, kind="tgi")
    ModelConfig.all_tenants.create(tenant=world.tenant, allowed_models=["other-model"])
    admin = APIClient()
    admin.force_login(world.admin)
    response = admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/deploy/")
    assert response.status_code == 409 and "not available" in response.json()["detail"]
    assert not AdapterDeployment.objects.for_tenant(world.tenant).exists()


def test_deploy_service_refuses_another_tenants_adapter(world, base_model):
    from finetune import deploy
    from serving.models import AdapterDeployment, BackendPool

    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme::abc", base_model=base_model, path="/x")
    BackendPool.objects.create(name="tgi-pool", base_model=base_model, kind="tgi")
    with pytest.raises(ValueError):
        deploy.adapter_deploy(tenant=world.other_tenant, adapter=adapter, actor=Actor(user=world.outsider))
    assert not AdapterDeployment.all_tenants.exists()


# ---- console pages -------------------------------------------------------------------------------


def test_console_upload_report_job_and_status(world, base_model):
    from django.core.files.uploadedfile import SimpleUploadedFile

    dev = signed_in(world.developer)
    assert dev.get("/t/acme/finetune/files/").status_code == 200
    response = committed(lambda: dev.post("/t/acme/finetune/files/upload/", {
        "file": SimpleUploadedFile("bad.jsonl", ("\n".join(FAULTY)).encode()), "model": "tiny-chat"}))
    assert response.status_code == 200 and response.json()["status"] == "uploaded"  # stored; the worker validates
    page = dev.get(response.json()["url"]).content.decode()
    assert "13 problems to fix" in page and "not valid JSON at column 1" in page and "[1, 2]" in page

    good = committed(lambda: dev.post("/t/acme/finetune/files/upload/", {
        "file": SimpleUploadedFile("z.jsonl", zebra_dataset(20)), "model": "tiny-chat"})).json()
    page = dev.get(good["url"]).content.decode()
    assert "Cost preview" in page and "300 ¢/M" in page
    form = {"training_file": good["id"], "model": "tiny-chat", "n_epochs": "2", "batch_size": "auto",
            "learning_rate_multiplier": "auto", "suffix": "z", "lora_rank": "8"}
    preview = dev.post("/t/acme/finetune/jobs/new/", {**form, "estimate": "1"})
    assert preview.status_code == 200 and "trained tokens" in preview.content.decode()
    created = dev.post("/t/acme/finetune/jobs/new/", form)
    job = FineTuneJob.objects.for_tenant(world.tenant).get()
    assert created.status_code == 302 and created["Location"] == f"/t/acme/finetune/jobs/{job.id}/"
    assert job.hyperparameters["n_epochs"] == 2 and job.lora["rank"] == 8
    page = dev.get(created["Location"]).content.decode()
    assert "ft-chart" in page and "waiting for a worker" in page  # before the first step: what is going on, not an empty bar
    assert '<p id="ft-next" hidden>' in page  # "deploy it next" appears only once there is a model
    status = dev.get(f"/t/acme/finetune/jobs/{job.id}/status/").json()
    assert status["status"] == "queued" and status["status_display"] == "Queued" and status["finished"] is False and status["events"]
    assert dev.post(f"/t/acme/finetune/jobs/{job.id}/cancel/").status_code == 302
    assert FineTuneJob.objects.for_tenant(world.tenant).get().status == "cancelled"


def test_console_roles_and_isolation(world, base_model):
    from serving.models import BackendPool

    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme::x1", base_model=base_model, path="/x")
    BackendPool.objects.create(name="tgi-tiny", base_model=base_model, kind="tgi", gpu_memory_gb=1, gpu_hourly_cost_cents=250)
    viewer = signed_in(world.viewer)
    for url in ("files/", "jobs/", "adapters/"):
        assert viewer.get(f"/t/acme/finetune/{url}").status_code == 200
    assert viewer.post("/t/acme/finetune/files/upload/").status_code == 403
    assert viewer.post("/t/acme/finetune/jobs/new/").status_code == 403
    assert signed_in(world.developer).post(f"/t/acme/finetune/adapters/{adapter.pk}/deploy/").status_code == 403
    outsider = signed_in(world.outsider)
    assert outsider.get("/t/acme/finetune/adapters/").status_code == 404
    assert outsider.post(f"/t/globex/finetune/adapters/{adapter.pk}/deploy/").status_code == 404

    admin = signed_in(world.admin)
    assert admin.post(f"/t/acme/finetune/adapters/{adapter.pk}/deploy/").status_code == 302
    pool = BackendPool.objects.get(name="tgi-tiny")
    assert pool.lora_adapters_env == f"{adapter.name}=/x"
    page = admin.get("/t/acme/finetune/adapters/").content.decode()
    assert "Pending" in page and "Undeploy" in page


def test_tgi_deploy_waits_for_restart_then_activates(world, base_model):
    from finetune import deploy
    from serving.models import AdapterDeployment, Backend, BackendPool

    pool = BackendPool.objects.create(name="tgi-tiny", base_model=base_model, kind="tgi")
    backends = [Backend.objects.create(pool=pool, url=f"http://tgi-{i}:80") for i in range(2)]
    adapter = Adapter.all_tenants.create(tenant=world.tenant, name="ft:tiny-chat:acme::x1", base_model=base_model, path="/a/x1")
    deployment = deploy.adapter_deploy(tenant=world.tenant, adapter=adapter, actor=Actor(user=world.admin))
    assert deployment.state == "pending"
    assert all(Backend.objects.get(pk=b.pk).needs_restart for b in backends)
    deploy.pool_mark_restarted(pool=BackendPool.objects.get(pk=pool.pk))
    assert AdapterDeployment.objects.for_tenant(world.tenant).get().state == "active"
    assert [Backend.objects.get(pk=b.pk).loaded_adapters for b in backends] == [[adapter.name]] * 2
    deploy.adapter_undeploy(tenant=world.tenant, adapter=adapter, actor=Actor(user=world.admin))
    assert BackendPool.objects.get(pk=pool.pk).lora_adapters_env == ""
    assert Backend.objects.get(pk=backends[0].pk).loaded_adapters == []


def test_capacity_planner_counts_exactly(world, base_model):
    from finetune import base_models, lora_math
    from serving.models import BackendPool

    pool = BackendPool.objects.create(name="tiny", base_model=base_model, kind="dev", gpu_memory_gb=1, gpu_hourly_cost_cents=250)
    page = signed_in(world.viewer).get(f"/t/acme/finetune/planner/?pool={pool.pk}&rank=8&memory_gb=0.001")
    assert page.status_code == 200
    config = base_models.model_config(base_model)
    exact = lora_math.lora_param_count(config, 8)
    fits = lora_math.adapters_that_fit(int(0.001 * 1024 ** 3), config, 8)
    plan = page.context["plan"]
    assert plan["exact_params"] == exact and plan["adapters_that_fit"] == fits
    assert plan["simple_params"] == lora_math.simple_lora_param_count(config, 8)
    assert plan["scenarios"][2] == {"tenants": 1000, "shared_backends": -(-1000 // fits), "shared_cents_per_hour": -(-1000 // fits) * 250,
                                    "isolated_backends": 1000, "isolated_cents_per_hour": 250_000}


def test_the_planner_uses_the_pools_maximum_lora_rank(world, base_model):
    from finetune import base_models, lora_math, pools
    from serving.models import BackendPool

    pool = BackendPool.objects.create(name="vllm-tiny", base_model=base_model, kind="vllm", gpu_memory_gb=1,
                                      max_lora_rank=16)
    config, budget = base_models.model_config(base_model), int(0.001 * 1024 ** 3)
    viewer = signed_in(world.viewer)
    plan = viewer.get(f"/t/acme/finetune/planner/?pool={pool.pk}&rank=8&memory_gb=0.001").context["plan"]
    # vLLM sizes every adapter slot for --max-lora-rank: a rank-8 adapter takes a rank-16 slot
    assert (plan["rank"], plan["slot_rank"]) == (8, 16)
    assert plan["adapters_that_fit"] == lora_math.adapters_that_fit(budget, config, 16) < lora_math.adapters_that_fit(budget, config, 8)
    page = viewer.get(f"/t/acme/finetune/planner/?pool={pool.pk}&memory_gb=0.001")
    assert page.context["plan"]["rank"] == 16  # blank: the pool's maximum
    refused = viewer.get(f"/t/acme/finetune/planner/?pool={pool.pk}&rank=32&memory_gb=0.001")
    assert refused.context["plan"] is None
    assert refused.context["form"].errors["rank"] == [
        "The vllm-tiny pool serves LoRA ranks up to 16; an adapter of a higher rank cannot be served there."]
    with pytest.raises(ValueError, match="above the vllm-tiny pool's maximum LoRA rank"):
        pools.capacity_plan(pool=pool, rank=32, target_modules="all-linear", memory_budget_gb=1)
