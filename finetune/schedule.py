"""Fine-tuning's periodic tasks (Celery beat). No model imports: portal/settings.py reads this."""

BEAT_SCHEDULE = {
    # A job whose worker died (lease expired) goes back to the queue and resumes from its checkpoint.
    "finetune-requeue-stale": {"task": "finetune.tasks.requeue_stale_jobs", "schedule": 300.0},
    # An upload whose validation message was lost (broker down or wiped) is validated after all.
    "finetune-requeue-stale-validations": {"task": "finetune.tasks.requeue_stale_validations", "schedule": 300.0},
    # An evaluation whose worker died (no progress for a lease) is sent again and starts over.
    "finetune-requeue-stale-evaluations": {"task": "finetune.tasks.requeue_stale_evaluations", "schedule": 300.0},
    # A merge whose worker died (no heartbeat for a lease) is sent again; the next worker takes it over.
    "finetune-requeue-stale-merges": {"task": "finetune.tasks.requeue_stale_merges", "schedule": 300.0},
    # A dev / vLLM backend that restarted forgot its runtime-loaded adapters: load them again.
    "finetune-reconcile-adapters": {"task": "finetune.tasks.reconcile_adapters", "schedule": 60.0},
}
