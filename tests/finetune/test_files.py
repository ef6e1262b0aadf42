"""Uploads: stored with bounded memory (bytes, then the row, never one without the other), validated on a worker
with progress, and refused by jobs until they are; token counts for other base models on the worker too."""

from __future__ import annotations

import errno
import io
import json
import os
import tracemalloc

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import DatabaseError
from django.test import TestCase

from finetune import services, tasks, validation
from finetune.models import FineTuneJob, TrainingFile
from finetune.validation import validate_jsonl
from tenants.models import AuditEvent
from tenants.services import Actor
from tests.support.finetune import (
    assert_openai_error,
    committed,
    create_job,
    key_secret,
    signed_in,
    upload,
    upload_file,
    zebra_dataset,
)

DEEP_LIST = "[" * 100_000 + "]" * 100_000
DEEP_CONTENT = '{"messages": [{"content": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}]}"


def stored_files(settings, world) -> list[str]:
    """Every name under the tenant's files folder (temporary ones included)."""
    folder = settings.STORAGE_DIR / "tenants" / str(world.tenant.pk) / "files"
    return sorted(os.listdir(folder)) if folder.exists() else []


def files_of(world):
    return TrainingFile.objects.for_tenant(world.tenant)


@pytest.fixture
def sent(monkeypatch) -> dict[str, list[tuple]]:
    """The arguments each task was sent with (then run eagerly, as a worker would)."""
    sent: dict[str, list[tuple]] = {"validate": [], "count": []}
    for key, task in (("validate", tasks.validate_training_file), ("count", tasks.count_file_tokens)):
        def delay(*args, _task=task, _key=key, _real=task.delay):
            sent[_key].append(args)
            return _real(*args)

        monkeypatch.setattr(task, "delay", delay)
    return sent


def commit(callbacks) -> None:
    """Run what a transaction left for its commit (the tasks eagerly, as a worker would)."""
    for callback in callbacks:
        callback()


# ---- the request: store, then the row ----------------------------------------------------------------------------


def test_upload_answers_uploaded_and_the_worker_stores_the_same_report_as_validating_in_memory(world, base_model, sent):
    data = zebra_dataset(20) + b'{"messages": []}\n'
    with TestCase.captureOnCommitCallbacks() as enqueued:
        file = services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner), filename="z.jsonl",
                                             content=io.BytesIO(data), base_model=base_model)
    assert (file.status, file.validation, file.token_counts) == ("uploaded", {}, {})  # nothing validated in the request
    assert files_of(world).get(pk=file.pk).status == "uploaded" and sent["validate"] == []

    commit(enqueued)  # the worker's turn (eager here)
    assert sent["validate"] == [(file.id, world.tenant.pk)]
    stored = files_of(world).get(pk=file.pk)
    from finetune import base_models

    expected = validate_jsonl(data, filename="z.jsonl", tokenizer=base_models.tokenizer_for(base_model),
                              context_length=base_models.max_seq_len(base_model), max_bytes=services.MAX_UPLOAD_BYTES)
    assert stored.status == "error" and stored.validation == {**expected.to_dict(), "model": "tiny-chat"}
    assert [(p["line"], p["code"]) for p in stored.validation["problems"]] == [(21, "messages_empty")]
    assert stored.token_counts["tiny-chat"]["total_tokens"] == expected.total_tokens > 0
    assert (stored.lines_validated, stored.bytes_validated, stored.progress_percent) == (21, len(data), 100)
    assert stored.validated_at is not None


def test_the_upload_is_copied_in_chunks_with_bounded_memory(world, settings, tmp_path, monkeypatch):
    monkeypatch.setattr(services, "MAX_UPLOAD_BYTES", 64 * 1024 * 1024)
    big = tmp_path / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "q " * 400}, {"role": "assistant", "content": "a"}]})
    with open(big, "w") as out:
        for _ in range(20 * 1024 * 1024 // len(line)):
            out.write(line + "\n")
    tracemalloc.start()
    try:
        with open(big, "rb") as content:  # a stream, as Django's spooled upload is
            file = services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner),
                                                 filename="big.jsonl", content=content)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert file.bytes == big.stat().st_size > 20_000_000
    assert (settings.STORAGE_DIR / file.path).read_bytes() == big.read_bytes()
    assert peak < 4 * 1024 * 1024, f"{peak:,} bytes held to store a {file.bytes:,}-byte upload"


def test_a_failure_saving_the_row_leaves_no_bytes(world, settings, monkeypatch):
    def refuse(**kwargs):
        raise DatabaseError("database is locked")

    monkeypatch.setattr(services, "audit_record", refuse)  # inside the row's transaction
    with pytest.raises(DatabaseError):
        services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner), filename="z.jsonl",
                                      content=io.BytesIO(zebra_dataset()))
    assert not files_of(world).exists()
    assert stored_files(settings, world) == []


def test_a_failure_writing_the_bytes_leaves_no_row_and_no_bytes(api, world, settings, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    response = upload(api, zebra_dataset())
    assert_openai_error(response, 503, "storage_error")
    assert "No space left on device" in response.json()["error"]["message"]
    assert not files_of(world).exists()
    assert stored_files(settings, world) == []


def test_a_stream_past_the_limit_is_413_and_leaves_nothing(world, settings, monkeypatch):
    monkeypatch.setattr(services, "MAX_UPLOAD_BYTES", 1000)
    monkeypatch.setattr(services, "UPLOAD_CHUNK_BYTES", 300)
    with pytest.raises(services.FinetuneError) as caught:  # a stream that does not say its size: counted while copied
        services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner), filename="z.jsonl",
                                      content=io.BytesIO(zebra_dataset()))
    assert (caught.value.status, caught.value.code) == (413, "file_too_large")
    assert not files_of(world).exists() and stored_files(settings, world) == []


def test_deleting_a_file_removes_its_bytes_once_the_row_is_gone(world, settings):
    file = upload_file(world.tenant, Actor(user=world.owner), zebra_dataset())
    stored = settings.STORAGE_DIR / file.path
    with TestCase.captureOnCommitCallbacks() as on_commit:
        services.training_file_delete(tenant=world.tenant, actor=Actor(user=world.owner), file=file)
        assert stored.is_file()  # until the deletion commits, the row may yet come back: its bytes stay
    assert not files_of(world).exists()
    commit(on_commit)
    assert not stored.exists()


# ---- the worker: validation, progress, idempotency --------------------------------------------------------------


def test_an_upload_is_kept_when_the_broker_is_down_and_the_sweep_validates_it_later(api, world, monkeypatch, caplog):
    from datetime import timedelta

    from django.utils import timezone
    from kombu.exceptions import OperationalError

    def broker_down(*args):
        raise OperationalError("Error 111 connecting to redis:6379. Connection refused.")

    with monkeypatch.context() as patched:
        patched.setattr(tasks.validate_training_file, "delay", broker_down)
        response = upload(api, zebra_dataset())
    assert response.status_code == 200 and response.json()["status"] == "uploaded"  # stored, and said so
    assert "finetune.tasks.validate_training_file.delay" in caplog.text and "Connection refused" in caplog.text
    file_id = response.json()["id"]
    assert services.training_file_stale_validations() == []  # not yet: its message may still come
    sent_long_ago = timezone.now() - timedelta(seconds=services.STALE_VALIDATION_SECONDS + 1)
    files_of(world).filter(pk=file_id).update(validation_queued_at=sent_long_ago)
    assert services.training_file_stale_validations() == [(file_id, world.tenant.pk)]
    files_of(world).filter(pk=file_id).update(progress_at=timezone.now())  # a worker on it now: not stale
    assert services.training_file_stale_validations() == []
    files_of(world).filter(pk=file_id).update(progress_at=timezone.now() - timedelta(hours=1))

    assert committed(tasks.requeue_stale_validations) == 1  # beat's sweep (eager here)
    assert files_of(world).get(pk=file_id).status == "processed"
    assert services.training_file_stale_validations() == []


def test_validation_records_its_progress_as_it_reads(world, monkeypatch):
    monkeypatch.setattr(services, "VALIDATION_PROGRESS_SECONDS", 0)
    seen = []
    real = services._validation_progress

    def recorded(pending, lines, nbytes):
        real(pending, lines, nbytes)
        row = pending.get()
        seen.append((row.status, row.lines_validated, row.bytes_validated, row.progress_percent))

    monkeypatch.setattr(services, "_validation_progress", recorded)
    data = zebra_dataset(12)
    file = upload_file(world.tenant, Actor(user=world.owner), data)
    assert [s[1] for s in seen] == list(range(1, 13)) and all(s[0] == "uploaded" for s in seen)
    assert [s[2] for s in seen] == sorted(s[2] for s in seen) and seen[-1][2] == len(data)
    assert seen[5][3] == 100 * seen[5][2] // len(data)
    assert file.status == "processed" and file.progress_percent == 100


def test_a_redelivered_validation_finds_the_file_validated(world):
    file = upload_file(world.tenant, Actor(user=world.owner), zebra_dataset())
    report = file.validation
    assert tasks.validate_training_file(file.id, world.tenant.pk) == "done"  # delivered again (acks_late)
    assert files_of(world).get(pk=file.pk).validation == report
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.file_validated").count() == 1
    assert tasks.validate_training_file.acks_late is True


def test_of_two_workers_validating_one_file_only_the_first_stores_its_result(world, monkeypatch):
    with TestCase.captureOnCommitCallbacks():  # not run: the two "workers" below run it
        file = services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner), filename="z.jsonl",
                                             content=io.BytesIO(zebra_dataset()))
    real = services._validate_stored
    outcomes = []

    def the_other_worker_finishes_first(*args, **kwargs):
        monkeypatch.setattr(services, "_validate_stored", real)
        outcomes.append(services.training_file_validate(file_id=file.id, tenant_id=world.tenant.pk))
        return real(*args, **kwargs)

    monkeypatch.setattr(services, "_validate_stored", the_other_worker_finishes_first)
    outcomes.append(services.training_file_validate(file_id=file.id, tenant_id=world.tenant.pk))
    assert outcomes == ["processed", "done"]
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="finetune.file_validated").count() == 1


def test_a_file_deleted_before_its_validation_is_gone(world, sent):
    with TestCase.captureOnCommitCallbacks() as enqueued:
        file = services.training_file_upload(tenant=world.tenant, actor=Actor(user=world.owner), filename="z.jsonl",
                                             content=io.BytesIO(zebra_dataset()))
    services.training_file_delete(tenant=world.tenant, actor=Actor(user=world.owner), file=file)
    assert tasks.validate_training_file(file.id, world.tenant.pk) == "gone"
    commit(enqueued)  # the upload's own message, delivered after the deletion
    assert sent["validate"] == [(file.id, world.tenant.pk)] and not files_of(world).exists()


@pytest.mark.parametrize("deep", [DEEP_LIST, DEEP_CONTENT], ids=["nested lists", "nested content"])
def test_a_deeply_nested_line_in_an_upload_is_a_problem_of_that_line(api, world, deep):
    data = zebra_dataset(12) + deep.encode() + b"\n" + zebra_dataset(1)
    response = upload(api, data)
    assert response.status_code == 200, response.content
    file_id = response.json()["id"]
    body = api.get(f"/v1/files/{file_id}").json()
    assert body["status"] == "error" and "line 13" in body["status_details"]
    report = api.get(f"/v1/files/{file_id}/validation").json()
    assert [(p["line"], p["code"]) for p in report["problems"]] == [(13, "nesting_too_deep")]
    assert report["stats"]["examples"] == 13  # the lines around it were validated


def test_a_job_on_a_deeply_nested_file_fails_in_words_on_the_worker(world, base_model, settings):
    """The trainer's own validation (a file marked valid by hand, or stored before nesting was checked)."""
    from finetune.tasks import run_finetune_job

    relative = f"tenants/{world.tenant.pk}/files/deep.jsonl"
    (settings.STORAGE_DIR / relative).parent.mkdir(parents=True)
    (settings.STORAGE_DIR / relative).write_bytes(zebra_dataset(12) + DEEP_CONTENT.encode() + b"\n")
    file = TrainingFile.all_tenants.create(tenant=world.tenant, filename="deep.jsonl", path=relative, bytes=1,
                                           status="processed", validation={"stats": {"examples": 13}})
    job = services.finetune_job_create(tenant=world.tenant, actor=Actor(user=world.owner), model="tiny-chat",
                                       training_file=file.id)
    assert run_finetune_job(job.id, world.tenant.pk) == "failed"
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=job.pk)
    assert job.error_code == "invalid_file" and "line 13: this line nests lists and objects" in job.error_message


# ---- jobs wait for processed files -----------------------------------------------------------------------------


def test_a_job_on_a_file_still_being_validated_is_refused_file_not_ready(api, world, base_model):
    file_id = upload(api, zebra_dataset(20), validate=False).json()["id"]
    for endpoint in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/estimate"):
        response = api.post(endpoint, {"model": "tiny-chat", "training_file": file_id}, format="json")
        assert_openai_error(response, 400, "file_not_ready")
        error = response.json()["error"]
        assert error["param"] == "training_file"
        assert error["message"].startswith(f"File {file_id} is still being processed and is not ready to be used for "
                                           "fine-tuning (waiting for a worker to validate it). Please try again later")
    files_of(world).filter(pk=file_id).update(lines_validated=10, bytes_validated=len(zebra_dataset(10)))
    message = create_job(api, file_id).json()["error"]["message"]
    half = 100 * len(zebra_dataset(10)) // len(zebra_dataset(20))
    assert f"({half} % validated: 10 lines, {len(zebra_dataset(10)):,} of {len(zebra_dataset(20)):,} bytes)" in message
    other = upload(api, zebra_dataset(10)).json()["id"]  # also as the validation file
    assert_openai_error(create_job(api, other, validation_file=file_id), 400, "file_not_ready")
    assert not FineTuneJob.objects.for_tenant(world.tenant).exists()

    tasks.validate_training_file(file_id, world.tenant.pk)  # the worker catches up
    assert create_job(api, file_id).status_code == 200


def test_sdk_wait_for_processing_polls_until_the_worker_has_validated(world, sdk_for):
    client = sdk_for(key_secret(world.tenant, world.owner))
    with TestCase.captureOnCommitCallbacks() as enqueued:
        created = client.files.create(file=("zebra.jsonl", zebra_dataset()), purpose="fine-tune")
    assert created.status == "uploaded" and created.status_details is None
    polls = []

    def sleep(seconds):  # between two polls: the worker validates the file
        polls.append(client.files.retrieve(created.id).status)
        commit(enqueued)
        enqueued.clear()

    client.files._sleep = sleep
    done = client.files.wait_for_processing(created.id, poll_interval=0.01)
    assert polls == ["uploaded"] and done.status == "processed" and done.id == created.id


def test_an_outsider_gets_404_for_another_tenants_file_status_and_progress(api, outsider_api, world):
    file_id = upload(api, zebra_dataset(), validate=False).json()["id"]
    assert api.get(f"/v1/files/{file_id}").json()["status"] == "uploaded"
    assert_openai_error(outsider_api.get(f"/v1/files/{file_id}"), 404, "file_not_found")
    assert_openai_error(outsider_api.get(f"/v1/files/{file_id}/validation"), 404, "file_not_found")
    outsider = signed_in(world.outsider)
    for url in (f"/t/acme/finetune/files/{file_id}/status/", f"/t/globex/finetune/files/{file_id}/status/",
                f"/t/globex/finetune/files/{file_id}/"):
        assert outsider.get(url).status_code == 404, url
    assert signed_in(world.viewer).get(f"/t/acme/finetune/files/{file_id}/status/").json()["status"] == "uploaded"


# ---- the console ------------------------------------------------------------------------------------------------


def test_the_file_page_shows_the_progress_of_a_validating_file_then_its_report(world):
    dev = signed_in(world.developer)
    with TestCase.captureOnCommitCallbacks() as enqueued:
        answer = dev.post("/t/acme/finetune/files/upload/", {"file": SimpleUploadedFile("z.jsonl", zebra_dataset(20))}).json()
    file_id, size = answer["id"], len(zebra_dataset(20))
    files_of(world).filter(pk=file_id).update(lines_validated=10, bytes_validated=size // 2)
    page = dev.get(answer["url"]).content.decode()
    assert 'id="ft-file-bar" max="100" value="50"' in page and f"50 % validated: 10 lines, {size // 2:,} of {size:,}" in page
    assert 'data-finished="0"' in page and "Validating" in page and "Train on this file" not in page
    status = dev.get(f"/t/acme/finetune/files/{file_id}/status/").json()
    assert (status["status"], status["progress"], status["lines_validated"], status["finished"]) == ("uploaded", 50, 10, False)
    assert "Validating" in dev.get("/t/acme/finetune/files/").content.decode()

    commit(enqueued)
    assert dev.get(f"/t/acme/finetune/files/{file_id}/status/").json()["finished"] is True
    page = dev.get(answer["url"]).content.decode()
    assert 'data-finished="1"' in page and "ft-file-bar" not in page and "Train on this file" in page


def test_the_file_page_never_tokenizes_a_worker_counts_for_the_cost_preview(world, base_model, monkeypatch, sent):
    file = upload_file(world.tenant, Actor(user=world.owner), zebra_dataset(20))  # no model chosen: nothing counted
    calls = []
    real = validation.tokenize_chat_example
    monkeypatch.setattr(validation, "tokenize_chat_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    dev = signed_in(world.developer)
    with TestCase.captureOnCommitCallbacks() as enqueued:
        page = dev.get(f"/t/acme/finetune/files/{file.id}/").content.decode()
        dev.get(f"/t/acme/finetune/files/{file.id}/")  # asked once, not at every view
    assert calls == [] and "counting…" in page and 'data-counting="1"' in page
    assert dev.get(f"/t/acme/finetune/files/{file.id}/status/").json()["counting"] == ["tiny-chat"]
    commit(enqueued)  # the worker counts
    assert sent["count"] == [(file.id, world.tenant.pk, base_model.pk)] and len(calls) == 20
    counts = files_of(world).get(pk=file.pk).token_counts["tiny-chat"]
    assert counts["examples"] == 20 and counts["estimated"] is False
    page = dev.get(f"/t/acme/finetune/files/{file.id}/").content.decode()
    assert "counting…" not in page and f"<td>{counts['total_tokens']}</td>" in page
    assert dev.get(f"/t/acme/finetune/files/{file.id}/status/").json()["counting"] == []


def test_a_job_estimate_for_an_uncounted_model_is_estimated_until_a_worker_counts_it(api, world, base_model, monkeypatch):
    file_id = upload(api, zebra_dataset(20)).json()["id"]  # no model: not counted with tiny-chat
    calls = []
    real = validation.tokenize_chat_example
    monkeypatch.setattr(validation, "tokenize_chat_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    body = {"model": "tiny-chat", "training_file": file_id, "hyperparameters": {"n_epochs": 3}}
    with TestCase.captureOnCommitCallbacks() as enqueued:
        first = api.post("/v1/fine_tuning/jobs/estimate", body, format="json").json()
    assert calls == [] and first["tokens_estimated"] is True
    assert first["tokens_per_epoch"] == -(-len(zebra_dataset(20)) // 4) and first["examples"] == 20

    commit(enqueued)
    counted = files_of(world).get(pk=file_id).token_counts["tiny-chat"]["total_tokens"]
    again = api.post("/v1/fine_tuning/jobs/estimate", body, format="json").json()
    assert again["tokens_estimated"] is False and again["tokens_per_epoch"] == counted and len(calls) == 20
