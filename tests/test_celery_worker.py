"""A real Celery worker, started as scripts/up.sh starts it, takes tasks from their queues and runs them.

The worker is another process, so it gets the test database and a broker of this test's own through the
environment, as any worker does: DATABASE_URL names the test database (SQLite's in-memory one is copied to a
file first), and the broker is a temporary filesystem one or, with Redis (CI), Redis under a key prefix of
this test. tests/test_celery.py checks the configuration without a worker.
"""

from __future__ import annotations

import io
import os
from datetime import date

import pytest
from django.utils import timezone

from billing.models import DailyUsage
from billing.tasks import rate_recent
from finetune import services
from finetune.models import FineTuneJob, TrainingFile
from serving.models import BaseModel
from tenants.services import Actor
from tests.support.billing import price, usage
from tests.support.finetune import zebra_dataset
from tests.support.worker import (  # noqa: F401 (broker_env, worker_database_url: fixtures; the latter autouse)
    VALIDATION_QUEUES,
    broker_env,
    celery_worker,
    wait_for,
    waiting_messages,
    worker_database_url,
)

pytestmark = pytest.mark.slow

def test_the_validation_worker_validates_uploads_and_the_worker_rates_from_default_and_trains_from_finetune(
        worker_database_url, broker_env, world, tiny_model_path, settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=176)
    price(base, effective_from=date(2020, 1, 1), inp="100", out="200")
    usage(world.tenant, at=timezone.now(), inp=1000, out=10)
    actor = Actor(user=world.owner)
    file = services.training_file_upload(tenant=world.tenant, actor=actor, filename="zebra.jsonl",
                                         content=io.BytesIO(zebra_dataset(10)), base_model=base)  # validated on commit
    rate_recent.delay()
    assert file.status == "uploaded"
    assert waiting_messages() == {"default": 1, "finetune": 0, "validation": 1}  # before any worker

    env = {**os.environ, **broker_env, "DATABASE_URL": worker_database_url, "PLATFORM_STORAGE_DIR": str(settings.STORAGE_DIR)}
    log, validation_log = tmp_path / "worker.log", tmp_path / "validation.log"
    files = TrainingFile.objects.for_tenant(world.tenant)
    jobs = FineTuneJob.objects.for_tenant(world.tenant)
    rated = DailyUsage.objects.for_tenant(world.tenant).filter(kind=DailyUsage.Kind.INFERENCE)
    with celery_worker(env, validation_log, VALIDATION_QUEUES, "validation") as validator:
        # Validated with no other worker running: nothing of `default` or `finetune` stands in front of it.
        wait_for("validated file", lambda: files.get(pk=file.pk).status != "uploaded", validator, validation_log)
        file = files.get(pk=file.pk)
        assert (file.status, file.lines_validated) == ("processed", 10) and file.token_counts["tiny-chat"]["total_tokens"] > 0
        assert waiting_messages() == {"default": 1, "finetune": 0, "validation": 0}
    with celery_worker(env, log) as worker:
        job = services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=file.id,
                                           suffix="zebra", hyperparameters={"n_epochs": 1, "batch_size": 5},
                                           lora={"rank": 4})  # enqueued with .delay() once committed
        wait_for("finished fine-tuning job", lambda: jobs.get(pk=job.pk).finished_at is not None, worker, log)
        wait_for("rated usage", rated.exists, worker, log)
        assert waiting_messages() == {"default": 0, "finetune": 0, "validation": 0}  # all acknowledged

    job = jobs.get(pk=job.pk)
    assert (job.status, job.error_message) == ("succeeded", "") and job.step == job.total_steps == 2
    assert job.fine_tuned_model.startswith("ft:tiny-chat:acme:zebra:") and job.attempts == 1
    assert [(row.input_tokens, row.output_tokens, row.requests) for row in rated] == [(1000, 10, 1)]
