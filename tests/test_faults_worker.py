"""Fault injection on a real Celery worker: the worker is SIGKILLed mid-job, and the job resumes on the next one.

The worker runs as tests/test_celery_worker.py starts it, on all its queues (`celery -A portal worker -Q
default,finetune,validation --pool solo`, with Redis as the broker in CI, a filesystem broker otherwise) and the
fixtures of tests/support/worker.py give it the test database and a broker of this test's own. It trains a job on the tiny model, is killed with its whole
process group after the job's first checkpoint, and a new worker takes the job over. Not in tests/finetune/:
that folder's conftest runs tasks in-process.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from billing.models import DailyUsage
from billing.tasks import rate_recent
from finetune import services
from finetune.models import FineTuneJob, JobCheckpoint, JobEvent, TrainingFile, TrainingUsage
from finetune.tasks import requeue_stale_jobs
from serving.models import BaseModel
from tenants.services import Actor
from tests.support.billing import price
from tests.support.finetune import zebra_dataset
from tests.support.worker import QUEUES, ROOT, broker_env, wait_for, worker_database_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

LEASE_S = 4  # PLATFORM_FINETUNE_LEASE_SECONDS for these workers (300 by default)
STEPS_PER_EPOCH, EPOCHS = 100, 2  # 200 examples, batch size 2: an epoch lasts a few seconds


@contextmanager
def worker_group(env: dict, log: Path):
    """A worker in a session (process group) of its own, so that the test can SIGKILL the whole group."""
    command = [sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", ",".join(QUEUES), "--pool", "solo",
               "--loglevel", "INFO"]
    with open(log, "wb") as out:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.terminate()  # warm shutdown
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()


def test_a_worker_killed_mid_job_is_resumed_from_its_checkpoint_by_another_and_billed_once(
        worker_database_url, broker_env, world, tiny_model_path, settings, tmp_path):
    """SIGKILL the worker's process group after the job's first checkpoint. As in production, the dead worker's lease
    runs out and celery beat's `requeue_stale_jobs` (every 300 s; sent here by the test once the lease has expired)
    hands the job to the next worker, which resumes from the checkpoint; the trained tokens are billed once."""
    settings.STORAGE_DIR = tmp_path / "storage"
    base = BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=176)
    price(base, effective_from=date(2020, 1, 1), inp="100", out="200", train="300")
    actor = Actor(user=world.owner)
    file = services.training_file_upload(tenant=world.tenant, actor=actor, filename="zebra.jsonl",
                                         content=io.BytesIO(zebra_dataset(2 * STEPS_PER_EPOCH)), base_model=base)
    env = {**os.environ, **broker_env, "DATABASE_URL": worker_database_url, "PLATFORM_STORAGE_DIR": str(settings.STORAGE_DIR),
           "PLATFORM_FINETUNE_LEASE_SECONDS": str(LEASE_S),
           "OMP_NUM_THREADS": "1"}  # two workers share this machine's cores: no spinning OpenMP threads competing
    jobs = FineTuneJob.objects.for_tenant(world.tenant)
    logs = [tmp_path / "worker-killed.log", tmp_path / "worker-next.log"]

    with worker_group(env, logs[0]) as doomed:
        files = TrainingFile.objects.for_tenant(world.tenant)
        wait_for("validated training file", lambda: files.get(pk=file.pk).status != TrainingFile.Status.UPLOADED, doomed, logs[0])
        file = files.get(pk=file.pk)
        job = services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=file.id,
                                           suffix="zebra", hyperparameters={"n_epochs": EPOCHS, "batch_size": 2},
                                           lora={"rank": 4})  # a checkpoint at each epoch's end
        wait_for("job running", lambda: jobs.get(pk=job.pk).status == FineTuneJob.Status.RUNNING, doomed, logs[0])
        with worker_group(env, logs[1]) as successor:  # the next worker starts while the first one trains
            checkpoints = JobCheckpoint.objects.for_tenant(world.tenant).filter(job=job)
            wait_for("first checkpoint", checkpoints.exists, doomed, logs[0])
            os.killpg(doomed.pid, signal.SIGKILL)  # the worker and anything it started, mid-epoch
            doomed.wait(10)
            killed = jobs.get(pk=job.pk)
            total = STEPS_PER_EPOCH * EPOCHS
            assert killed.status == FineTuneJob.Status.RUNNING and 0 < killed.step < killed.total_steps == total, killed.step
            assert killed.attempts == 1 and not TrainingUsage.objects.for_tenant(world.tenant).exists()

            wait_for("expired lease", lambda: jobs.get(pk=job.pk).worker_heartbeat_at < timezone.now() - timedelta(seconds=LEASE_S),
                     successor, logs[1])
            requeue_stale_jobs.delay()  # what celery beat sends
            wait_for("finished fine-tuning job", lambda: jobs.get(pk=job.pk).finished_at is not None, successor, logs[1])

    job = jobs.get(pk=job.pk)
    assert (job.status, job.error_message, job.attempts) == ("succeeded", "", 2) and job.step == job.total_steps == total
    events = list(JobEvent.objects.for_tenant(world.tenant).filter(job=job).order_by("id"))
    said = [e.message for e in events if e.type != "metrics"]
    resumed_at = next((i for i, e in enumerate(events) if e.message.startswith("Resuming on a new worker (attempt 2)")), None)
    assert resumed_at is not None, said
    resumed = [e.message for e in events[resumed_at:] if e.message.startswith("resumed from the checkpoint at step ")]
    assert len(resumed) == 1, said
    step = int(resumed[0].rsplit(" ", 1)[1])  # the killed worker's last checkpoint: an epoch's end
    assert step % STEPS_PER_EPOCH == 0 and 0 < step <= killed.step and step in set(checkpoints.values_list("step", flat=True))
    after = [e.data["step"] for e in events[resumed_at:] if e.type == "metrics"]
    assert after and min(after) > step and max(after) == total  # the step counter went on from the checkpoint, not 0
    assert any(f"(resumed from step {step})" in m for m in said), said
    # Billed once: one trained-tokens record with every epoch's tokens (the steps redone after the kill count once).
    usage = [(u.job_id, u.trained_tokens) for u in TrainingUsage.objects.for_tenant(world.tenant)]
    assert usage == [(job.pk, file.token_counts["tiny-chat"]["total_tokens"] * EPOCHS)] and job.trained_tokens == usage[0][1]
    rate_recent()
    rated = DailyUsage.objects.for_tenant(world.tenant).filter(kind=DailyUsage.Kind.TRAINING)
    assert [(r.requests, r.trained_tokens) for r in rated] == [(1, usage[0][1])]
