"""Fine-tuning's periodic tasks (Celery beat). No model imports: portal/settings.py reads this."""

BEAT_SCHEDULE = {
    # A job whose worker died (lease expired) goes back to the queue and resumes from its checkpoint.
    "finetune-requeue-stale": {"task": "finetune.tasks.requeue_stale_jobs", "schedule": 300.0},
}
