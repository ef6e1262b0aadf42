"""Queueing work from a service. Services name the task by its dotted path and it is sent once the current
transaction commits, so a service never imports the task module that imports it (tasks are the layer above
services: no services ↔ tasks circle, checked by the import contracts in pyproject.toml)."""

from __future__ import annotations

from django.db import transaction
from django.utils.module_loading import import_string


def enqueue_on_commit(task_path: str, *args, robust: bool = False) -> None:
    """Send the Celery task at `task_path` (e.g. "billing.tasks.invoice_push") with `args` when the current
    transaction commits (at once outside one); nothing is sent if it rolls back.

    `robust`: a broker that cannot take the message is logged (Django's on_commit log names the task), not raised —
    for work a periodic sweep sends again, where the request that queued it has already succeeded.
    """
    task = import_string(task_path)
    if not robust:
        task.delay_on_commit(*args)
        return

    def send() -> None:
        task.delay(*args)

    send.__qualname__ = f"{task.name}.delay"  # what the log of a failed send says
    transaction.on_commit(send, robust=True)
