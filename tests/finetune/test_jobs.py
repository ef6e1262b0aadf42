"""Running fine-tuning jobs on a worker: the Celery task called directly on the tiny model."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from finetune import base_models, lora_math, services
from finetune.models import FineTuneJob, JobCheckpoint, JobEvent, TrainingUsage
from finetune.tasks import run_finetune_job
from tenants.services import Actor
from tests.support.finetune import upload_file, zebra_dataset

HP = {"n_epochs": 3, "batch_size": 5, "learning_rate_multiplier": 50}  # 30 steps at lr 1e-2 on 50 examples
LORA = {"rank": 8, "alpha": 16}


class WorkerKilled(BaseException):
    """Stands for SIGKILL: nothing in the worker catches it, so the job is left running."""


def make_job(world, base_model, *, data: bytes | None = None, hp=HP) -> FineTuneJob:
    actor = Actor(user=world.owner)
    file = upload_file(world.tenant, actor, data or zebra_dataset(50), "zebra.jsonl", base_model)
    return services.finetune_job_create(tenant=world.tenant, actor=actor, model=base_model.name,
                                        training_file=file.id, suffix="zebra", hyperparameters=hp, lora=LORA)


def reload(job: FineTuneJob) -> FineTuneJob:
    return FineTuneJob.objects.for_tenant(job.tenant_id).select_related("adapter").get(pk=job.pk)


def file_tokens(job: FineTuneJob) -> int:
    return job.training_file.token_counts["tiny-chat"]["total_tokens"]


@pytest.mark.slow
def test_job_trains_an_adapter_and_meters_trained_tokens(world, base_model):
    job = make_job(world, base_model)
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"

    job = reload(job)
    assert job.status == "succeeded" and job.error_code == "" and job.finished_at and job.started_at
    assert job.fine_tuned_model == f"ft:tiny-chat:acme:zebra:{job.id[6:14]}"
    assert job.step == job.total_steps == 30 and job.train_loss < 1.0
    assert job.trained_tokens == file_tokens(job) * 3

    usage = TrainingUsage.objects.for_tenant(world.tenant).get(job=job)
    assert usage.trained_tokens == job.trained_tokens and usage.base_model == "tiny-chat"

    adapter = job.adapter
    assert adapter.name == job.fine_tuned_model and adapter.rank == 8 and adapter.alpha == 16
    config = base_models.model_config(base_model)
    assert adapter.target_modules == sorted(lora_math.LLAMA_LINEAR_MODULES)
    assert adapter.parameters == lora_math.lora_param_count(config, 8, "all-linear") == 8 * 2 * (4 * 128 + 3 * 240)
    assert adapter.size_bytes >= adapter.parameters * 4  # fp32 safetensors on CPU, plus the config

    events = JobEvent.objects.for_tenant(world.tenant).filter(job=job)
    metrics = [e.data for e in events.filter(type="metrics").order_by("id")]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert all({"train_loss", "train_mean_token_accuracy", "total_steps"} <= set(m) for m in metrics)
    assert metrics[-1]["train_mean_token_accuracy"] > 0.9
    messages = [e.message for e in events.filter(type="message")]
    assert any(m.startswith("New fine-tuned model created") for m in messages)
    assert [c.step for c in JobCheckpoint.objects.for_tenant(world.tenant).filter(job=job).order_by("step")] == [10, 20, 30]


@pytest.mark.slow
def test_a_validation_file_gets_its_loss_reported_at_each_epoch_end(world, base_model):
    actor = Actor(user=world.owner)
    valid = upload_file(world.tenant, actor, zebra_dataset(10), "valid.jsonl", base_model)
    train = upload_file(world.tenant, actor, zebra_dataset(20), "train.jsonl", base_model)
    job = services.finetune_job_create(tenant=world.tenant, actor=actor, model=base_model.name, training_file=train.id,
                                       validation_file=valid.id, hyperparameters={"n_epochs": 2, "batch_size": 10}, lora=LORA)
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"

    metrics = JobEvent.objects.for_tenant(world.tenant).filter(job=job, type="metrics").order_by("id")
    assert [(e.data["step"], "valid_loss" in e.data) for e in metrics] == [(1, False), (2, True), (3, False), (4, True)]
    assert all(e.data["valid_loss"] > 0 and "validation loss=" in e.message for e in metrics if "valid_loss" in e.data)
    assert reload(job).trained_tokens == file_tokens(job) * 2  # validation tokens are free


@pytest.mark.slow
def test_cancel_takes_effect_within_a_step_and_bills_completed_steps(world, base_model, monkeypatch):
    job = make_job(world, base_model)
    monkeypatch.setattr(services, "CANCEL_POLL_SECONDS", 0)
    original = services.JobRunner.on_event

    def cancel_at_step_4(runner, event):
        original(runner, event)
        if event.get("type") == "metrics" and event["step"] == 4:  # a user presses cancel now
            services.finetune_job_cancel(tenant=world.tenant, actor=Actor(user=world.owner), job=reload(job))

    monkeypatch.setattr(services.JobRunner, "on_event", cancel_at_step_4)
    assert run_finetune_job(job.id, world.tenant.pk) == "cancelled"

    job = reload(job)
    assert job.status == "cancelled" and job.step == 4 and job.adapter is None and not job.fine_tuned_model
    per_step = file_tokens(job) * 3 / 30
    usage = TrainingUsage.objects.for_tenant(world.tenant).get(job=job)
    assert usage.trained_tokens == job.trained_tokens and 0 < usage.trained_tokens < 6 * per_step
    assert "Stopped at step 4/30" in JobEvent.objects.for_tenant(world.tenant).filter(job=job).first().message


@pytest.mark.slow
def test_a_killed_worker_is_reclaimed_and_resumes_from_its_checkpoint(world, base_model, monkeypatch):
    job = make_job(world, base_model)
    original = services.JobRunner.on_event

    def die_after_first_checkpoint(runner, event):
        original(runner, event)
        if event.get("type") == "checkpoint":
            raise WorkerKilled()

    monkeypatch.setattr(services.JobRunner, "on_event", die_after_first_checkpoint)
    with pytest.raises(WorkerKilled):
        run_finetune_job(job.id, world.tenant.pk)
    monkeypatch.setattr(services.JobRunner, "on_event", original)
    assert reload(job).status == "running" and reload(job).step == 10

    # Its lease is still fresh: a redelivered message must not start a second copy.
    assert run_finetune_job(job.id, world.tenant.pk) == "leased"
    assert services.finetune_stale_jobs() == []

    FineTuneJob.objects.for_tenant(world.tenant).filter(pk=job.pk).update(
        worker_heartbeat_at=timezone.now() - timedelta(hours=1))
    assert services.finetune_stale_jobs() == [(job.id, world.tenant.pk)]
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"

    job = reload(job)
    assert job.attempts == 2 and job.step == 30
    messages = [e.message for e in JobEvent.objects.for_tenant(world.tenant).filter(job=job, type="message")]
    assert "resumed from the checkpoint at step 10" in messages
    steps = [e.data["step"] for e in JobEvent.objects.for_tenant(world.tenant).filter(job=job, type="metrics").order_by("id")]
    assert steps == list(range(1, 31))  # the second worker started at step 11
    assert TrainingUsage.objects.for_tenant(world.tenant).get(job=job).trained_tokens == file_tokens(job) * 3


def test_a_job_whose_examples_do_not_fit_fails_in_words(world, base_model):
    job = make_job(world, base_model)
    base_model.context_length = 20  # shorter than every example
    base_model.save()
    assert run_finetune_job(job.id, world.tenant.pk) == "failed"
    job = reload(job)
    assert job.status == "failed" and job.error_code == "invalid_file" and job.error_param == "training_file"
    assert "line 1:" in job.error_message and "longer than the context of 20 tokens" in job.error_message
    assert "internal" not in job.error_message.lower()
    assert not TrainingUsage.objects.for_tenant(world.tenant).filter(job=job).exists()
    last = JobEvent.objects.for_tenant(world.tenant).filter(job=job).first()
    assert last.level == "error" and last.message == job.error_message


def test_an_unexpected_training_error_is_explained(world, base_model, monkeypatch):
    import finetune.trainer

    job = make_job(world, base_model)

    def explode(**kwargs):
        raise RuntimeError("CUDA driver exploded")

    monkeypatch.setattr(finetune.trainer, "train_lora", explode)
    assert run_finetune_job(job.id, world.tenant.pk) == "failed"
    job = reload(job)
    assert job.error_code == "training_failed"
    assert "RuntimeError: CUDA driver exploded" in job.error_message and "retry" in job.error_message


def test_a_finished_or_cancelled_job_is_not_run(world, base_model):
    job = make_job(world, base_model)
    services.finetune_job_cancel(tenant=world.tenant, actor=Actor(user=world.owner), job=job)
    assert run_finetune_job(job.id, world.tenant.pk) == "gone"
    assert run_finetune_job(job.id, world.other_tenant.pk) == "gone"  # another tenant's id finds nothing


@pytest.mark.parametrize("setting", [False, True])
def test_the_compile_setting_reaches_the_trainer(world, base_model, monkeypatch, settings, setting):
    import finetune.trainer

    settings.FINETUNE_COMPILE = setting
    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(finetune.trainer, "train_lora", capture)
    run_finetune_job(make_job(world, base_model).id, world.tenant.pk)
    assert seen["compile_layers"] is setting


# ---- the job's model is callable when the job succeeds ----------------------------------------------------------------


@pytest.fixture
def served(world, base_model, settings):
    """A dev pool of the tiny model on a simulated backend (it loads and lists adapters like a real dev backend)."""
    from serving.models import Backend, BackendPool
    from tests.support.gateway import sim_backend

    settings.PLATFORM_GATEWAY_CONFIG_POLL_MS = 50
    url, stop = sim_backend()
    pool = BackendPool.objects.create(name="dev-tiny", base_model=base_model, kind="dev")
    backend = Backend.objects.create(pool=pool, url=url)
    yield pool, backend
    stop()


def test_a_succeeded_jobs_model_is_deployed_before_the_job_says_succeeded(world, base_model, served, monkeypatch):
    from finetune import deploy
    from serving.models import AdapterDeployment

    pool, backend = served
    seen = []
    real_deploy = deploy.adapter_deploy

    def deploy_and_look(**kwargs):
        deployment = real_deploy(**kwargs)
        seen.append(FineTuneJob.objects.for_tenant(world.tenant).get(pk=job.pk).status)  # what a poller sees meanwhile
        return deployment

    monkeypatch.setattr(deploy, "adapter_deploy", deploy_and_look)
    job = make_job(world, base_model, hp={"n_epochs": 1, "batch_size": 25, "learning_rate_multiplier": 1})
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"

    job = reload(job)
    assert seen == ["running"]  # deployed first: once it says succeeded, the model answers
    deployment = AdapterDeployment.objects.for_tenant(world.tenant).get(adapter=job.adapter)
    assert (deployment.pool, deployment.state) == (pool, "active")
    backend.refresh_from_db()
    assert backend.loaded_adapters == [job.fine_tuned_model]
    messages = [e.message for e in JobEvent.objects.for_tenant(world.tenant).filter(job=job).order_by("id")]
    assert f"Deployed {job.fine_tuned_model} to the dev-tiny pool: it is callable now" in messages
    assert job.load_seconds is not None and 0 < job.load_seconds < 60
    assert any(m.startswith("Loaded the base model and 50 examples in ") for m in messages)


def test_a_tenant_that_turned_automatic_deployment_off_deploys_by_itself(world, base_model, served):
    from serving.models import AdapterDeployment, ModelConfig

    ModelConfig.objects.for_tenant(world.tenant).create(auto_deploy_finetuned=False)
    job = make_job(world, base_model, hp={"n_epochs": 1, "batch_size": 25, "learning_rate_multiplier": 1})
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"
    job = reload(job)
    assert job.adapter is not None and not AdapterDeployment.objects.for_tenant(world.tenant).exists()
    served[1].refresh_from_db()
    assert served[1].loaded_adapters == []
    messages = [e.message for e in JobEvent.objects.for_tenant(world.tenant).filter(job=job)]
    assert any("is not deployed: automatic deployment is off in the model settings" in m for m in messages)


def test_a_deployment_that_cannot_happen_leaves_the_job_succeeded_and_says_why(world, base_model):
    job = make_job(world, base_model, hp={"n_epochs": 1, "batch_size": 25, "learning_rate_multiplier": 1})
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"  # no pool serves tiny-chat here
    job = reload(job)
    assert job.status == "succeeded" and job.adapter is not None
    warning = JobEvent.objects.for_tenant(world.tenant).get(job=job, level="warn")
    assert warning.message == f"{job.fine_tuned_model} is not deployed: No pool serves tiny-chat; ask the platform team to add one."


def test_a_job_cancelled_while_its_model_deploys_leaves_no_adapter_behind(world, base_model, served, monkeypatch):
    from finetune import deploy
    from serving.models import Adapter, AdapterDeployment

    real_deploy = deploy.adapter_deploy

    def deploy_then_cancel(**kwargs):
        deployment = real_deploy(**kwargs)
        services.finetune_job_cancel(tenant=world.tenant, actor=Actor(user=world.owner), job=reload(job))
        return deployment

    monkeypatch.setattr(deploy, "adapter_deploy", deploy_then_cancel)
    job = make_job(world, base_model, hp={"n_epochs": 1, "batch_size": 25, "learning_rate_multiplier": 1})
    assert run_finetune_job(job.id, world.tenant.pk) == "cancelled"
    assert reload(job).status == "cancelled" and reload(job).fine_tuned_model == ""
    assert not Adapter.objects.for_tenant(world.tenant).exists()
    assert not AdapterDeployment.objects.for_tenant(world.tenant).exists()
    served[1].refresh_from_db()
    assert served[1].loaded_adapters == []
