"""Queueing work from a service. Services name the task by its dotted path and it is sent once the current
transaction commits, so a service never imports the task module that imports it (tasks are the layer above
services: no services ↔ tasks circle, checked by the import contracts in pyproject.toml)."""

from __future__ import annotations

from django.utils.module_loading import import_string


def enqueue_on_commit(task_path: str, *args) -> None:
    """Send the Celery task at `task_path` (e.g. "billing.tasks.invoice_push") with `args` when the current
    transaction commits (at once outside one); nothing is sent if it rolls back."""
    import_string(task_path).delay_on_commit(*args)
