"""Fine-tuning's Celery tasks. Thin: ids in, a service called. Training and the Hub copy run on the `finetune` queue;
validating uploads on `validation` (a worker of its own, which training cannot block; one file per tenant at a time);
counting tokens and the stale-job requeue on `default` (CELERY_TASK_ROUTES in portal/settings.py)."""

from __future__ import annotations

from celery import shared_task

from finetune import services
from finetune.models import LEASE_SECONDS


@shared_task(bind=True, name="finetune.tasks.run_finetune_job", acks_late=True, max_retries=None)
def run_finetune_job(self, job_id: str, tenant_id: int) -> str:
    """Claim and run a job. A job another worker still holds (live lease) is retried after its lease would expire:
    a redelivered message of a worker that died then finds the lease expired and resumes from the checkpoint."""
    outcome = services.finetune_job_run(job_id=job_id, tenant_id=tenant_id)
    if outcome == "leased" and self.request.called_directly is False:
        raise self.retry(countdown=LEASE_SECONDS + 5)
    return outcome


@shared_task(name="finetune.tasks.validate_training_file", acks_late=True)
def validate_training_file(file_id: str, tenant_id: int) -> str:
    """Validate an uploaded file and store its report once (enqueued when the upload commits). Acknowledged after the
    work: a worker that dies mid-file gets the message redelivered, and a second delivery finds the file validated."""
    return services.training_file_validate(file_id=file_id, tenant_id=tenant_id)


@shared_task(name="finetune.tasks.count_file_tokens", acks_late=True)
def count_file_tokens(file_id: str, tenant_id: int, base_model_id: int) -> str:
    """Count a validated file's tokens with another base model's chat template (the console's cost preview, a job's
    estimate), so that no request tokenizes a file."""
    return services.training_file_count_tokens(file_id=file_id, tenant_id=tenant_id, base_model_id=base_model_id)


@shared_task(name="finetune.tasks.requeue_stale_jobs")
def requeue_stale_jobs() -> int:
    """Periodic (celery beat, every few minutes): re-enqueue running jobs whose worker stopped renewing its lease."""
    stale = services.finetune_stale_jobs()
    for job_id, tenant_id in stale:
        run_finetune_job.delay(job_id, tenant_id)
    return len(stale)


@shared_task(name="finetune.tasks.requeue_stale_validations")
def requeue_stale_validations() -> int:
    """Periodic (celery beat, every few minutes): enqueue again the validation of uploads that lost their message, and
    give its turn to a tenant whose uploads wait with none being validated (one per tenant at a time)."""
    return services.training_file_validations_resume()


@shared_task(name="finetune.tasks.reconcile_adapters")
def reconcile_adapters() -> int:
    """Periodic (celery beat, every minute): reload the adapters a restarted dev / vLLM backend forgot."""
    from finetune.deploy import backends_reconcile_adapters

    return len(backends_reconcile_adapters())


@shared_task(bind=True, name="finetune.tasks.push_adapter_to_hub", max_retries=5, default_retry_delay=60)
def push_adapter_to_hub(self, adapter_id: int, tenant_id: int) -> str:
    """Copy a trained adapter to the tenant's private Hub repository (runs where the adapter files are)."""
    from finetune.hub import adapter_push_to_hub
    from serving.models import Adapter

    adapter = Adapter.objects.for_tenant(tenant_id).select_related("tenant").get(pk=adapter_id)
    try:
        return adapter_push_to_hub(adapter=adapter)
    except OSError as exc:  # network or Hub trouble: try again later
        raise self.retry(exc=exc)


@shared_task(bind=True, name="finetune.tasks.run_evaluation", acks_late=True, max_retries=None)
def run_evaluation(self, evaluation_id: str, tenant_id: int) -> str:
    """Claim and run an evaluation (finetune/evaluation.py) on the `finetune` queue, where the GPUs are: it loads the
    base model and the adapter. One another live worker holds is retried after its lease would expire."""
    from finetune.evaluation import evaluation_run

    outcome = evaluation_run(evaluation_id=evaluation_id, tenant_id=tenant_id)
    if outcome == "leased" and self.request.called_directly is False:
        raise self.retry(countdown=LEASE_SECONDS + 5)
    return outcome


@shared_task(bind=True, name="finetune.tasks.merge_adapter", acks_late=True, max_retries=None)
def merge_adapter(self, merged_id: int, tenant_id: int) -> str:
    """Merge an isolated tenant's adapter into its base weights and export the model folder (finetune/merge.py), on the
    `finetune` queue, where the base weights and torch are. One another live worker merges is retried after its lease
    would expire (a redelivered message of a worker that died then takes it over)."""
    from finetune.merge import merged_model_build

    outcome = merged_model_build(merged_id=merged_id, tenant_id=tenant_id)
    if outcome == "leased" and self.request.called_directly is False:
        raise self.retry(countdown=LEASE_SECONDS + 5)
    return outcome


@shared_task(name="finetune.tasks.requeue_stale_merges")
def requeue_stale_merges() -> int:
    """Periodic (celery beat, every few minutes): send again the merges whose worker stopped renewing its lease."""
    from finetune.merge import merged_stale

    stale = merged_stale()
    for merged_id, tenant_id in stale:
        merge_adapter.delay(merged_id, tenant_id)
    return len(stale)


@shared_task(name="finetune.tasks.requeue_stale_evaluations")
def requeue_stale_evaluations() -> int:
    """Periodic (celery beat, every few minutes): send again the evaluations whose worker stopped writing progress."""
    from finetune.evaluation import evaluation_stale

    stale = evaluation_stale()
    for evaluation_id, tenant_id in stale:
        run_evaluation.delay(evaluation_id, tenant_id)
    return len(stale)
