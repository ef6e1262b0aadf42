"""Uploads are validated one file per tenant at a time, in upload order (finetune.services.training_file_validation_next):
a tenant's backlog never stands in front of another tenant's file; the periodic sweep keeps the rule; a tenant with
too many files waiting is refused 429."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.test import TestCase
from django.utils import timezone
from rest_framework.test import APIClient

from finetune import services, tasks
from finetune.models import TrainingFile
from tenants import services as tenant_services
from tenants.services import Actor

DATA = ("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Is {i} ok?"},
                                           {"role": "assistant", "content": "Yes."}]}) for i in range(12)) + "\n").encode()


@pytest.fixture
def queue(monkeypatch) -> list[str]:
    """The validation queue: the file ids sent to it, in order (not run: the test plays the worker)."""
    sent: list[str] = []
    monkeypatch.setattr(tasks.validate_training_file, "delay", lambda file_id, tenant_id: sent.append(file_id))
    return sent


def upload(tenant, owner, name: str = "z.jsonl") -> str:
    """Upload through the service; its transaction's commit callbacks (the send) run."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return services.training_file_upload(tenant=tenant, actor=Actor(user=owner), filename=name,
                                             content=io.BytesIO(DATA)).pk


def work(file_id: str, tenant) -> str:
    """The worker validates one file; what it sends when it ends is sent."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return tasks.validate_training_file(file_id, tenant.pk)


def files(tenant):
    return TrainingFile.objects.for_tenant(tenant)


def test_a_tenants_uploads_are_validated_one_at_a_time_in_upload_order(world, queue):
    a, b, c = (upload(world.tenant, world.owner, f"{n}.jsonl") for n in "abc")
    assert queue == [a]  # b and c wait for a
    waiting = files(world.tenant).get(pk=b)
    assert waiting.validation_queued_at is None and "earlier uploads" in waiting.progress_text
    assert work(a, world.tenant) == "processed"
    assert queue == [a, b]
    assert work(b, world.tenant) == "processed" and work(c, world.tenant) == "processed"
    assert queue == [a, b, c] and set(files(world.tenant).values_list("status", flat=True)) == {"processed"}


def test_another_tenants_file_is_sent_at_once_beside_a_backlog(world, queue):
    backlog = [upload(world.tenant, world.owner) for _ in range(3)]
    theirs = upload(world.other_tenant, world.outsider)
    assert queue == [backlog[0], theirs]  # second in the queue, not fourth


def test_a_redelivered_or_late_message_sends_no_second_file(world, queue):
    a, b = upload(world.tenant, world.owner), upload(world.tenant, world.owner)
    work(a, world.tenant)
    assert work(a, world.tenant) == "done"  # delivered again
    assert queue == [a, b]


def test_a_deleted_file_passes_its_turn_to_the_next(world, queue):
    a, b = upload(world.tenant, world.owner), upload(world.tenant, world.owner)
    with TestCase.captureOnCommitCallbacks(execute=True):
        services.training_file_delete(tenant=world.tenant, actor=Actor(user=world.owner), file=files(world.tenant).get(pk=a))
    assert queue == [a, b]
    assert work(a, world.tenant) == "gone"  # its message, delivered after the deletion
    assert queue == [a, b]


def test_the_sweep_resends_a_lost_validation_and_never_a_waiting_file(world, queue):
    a, b = upload(world.tenant, world.owner), upload(world.tenant, world.owner)
    long_ago = timezone.now() - timedelta(seconds=services.STALE_VALIDATION_SECONDS + 1)
    files(world.tenant).filter(pk__in=[a, b]).update(created_at=long_ago)  # b is old, but waits its turn
    assert services.training_file_stale_validations() == []  # a was sent just now
    files(world.tenant).filter(pk=a).update(validation_queued_at=long_ago)  # its message was lost
    assert services.training_file_stale_validations() == [(a, world.tenant.pk)]
    with TestCase.captureOnCommitCallbacks(execute=True):
        assert tasks.requeue_stale_validations() == 1
    assert queue == [a, a]  # a again, b still waiting
    assert services.training_file_stale_validations() == []  # sent again now: not stale until it is quiet as long


def test_the_sweep_gives_its_turn_to_a_tenant_whose_next_file_was_never_sent(world, queue):
    a, b = upload(world.tenant, world.owner), upload(world.tenant, world.owner)
    # a's worker stored its result and died before sending b.
    files(world.tenant).filter(pk=a).update(status=TrainingFile.Status.PROCESSED)
    with TestCase.captureOnCommitCallbacks(execute=True):
        assert tasks.requeue_stale_validations() == 1
        assert tasks.requeue_stale_validations() == 0  # b is in flight now: nothing more
    assert queue == [a, b]


# ---- the cap on files waiting ------------------------------------------------------------------------------------


@pytest.fixture
def api(world):
    _, secret = tenant_services.api_key_create(tenant=world.tenant, name="ft", scopes=["finetune"],
                                               actor=tenant_services.SYSTEM)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def post_file(api):
    body = io.BytesIO(DATA)
    body.name = "z.jsonl"
    with TestCase.captureOnCommitCallbacks(execute=True):
        return api.post("/v1/files", {"purpose": "fine-tune", "file": body}, format="multipart")


def test_past_the_pending_cap_an_upload_is_refused_429_and_nothing_is_kept(world, queue, api, settings):
    settings.FINETUNE_MAX_PENDING_FILES = 2
    first, second = (post_file(api).json()["id"] for _ in range(2))
    refused = post_file(api)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("too_many_pending_files", "file")
    assert error["message"].startswith("2 of this account's uploads are still waiting to be validated, the most it "
                                       "may have at once (2): wait until one is processed")
    assert files(world.tenant).count() == 2
    folder = settings.STORAGE_DIR / "tenants" / str(world.tenant.pk) / "files"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{f}.jsonl" for f in (first, second))
    work(first, world.tenant)
    assert post_file(api).status_code == 200  # one processed: room for one more


def test_the_cap_is_checked_again_under_the_lock(world, queue, settings, monkeypatch):
    """Two uploads that both passed the early check: the second is refused once its bytes are stored, and removed."""
    settings.FINETUNE_MAX_PENDING_FILES = 1
    monkeypatch.setattr(services, "training_file_upload_check", _passes_first_then_real(services.training_file_upload_check))
    upload(world.tenant, world.owner)
    with pytest.raises(services.FinetuneError) as refused:
        upload(world.tenant, world.owner)
    assert refused.value.status == 429 and files(world.tenant).count() == 1
    folder = settings.STORAGE_DIR / "tenants" / str(world.tenant.pk) / "files"
    assert len(list(folder.iterdir())) == 1


def _passes_first_then_real(real):
    calls = []

    def check(*, tenant):
        calls.append(tenant)
        if len(calls) % 2 == 1 and len(calls) > 1:
            return None  # the early check of the second upload let it through (a concurrent upload was not stored yet)
        return real(tenant=tenant)

    return check
