"""The Celery configuration a worker and beat start with: schedule, routing, delivery guarantees, serialization.

tests/test_celery_worker.py runs a real worker on it.
"""

from __future__ import annotations

import pytest
from django.conf import settings

from portal.celery import app

# docs/finetuning.md: training and the Hub copy run on the `finetune` queue (GPU hosts, where the files are); uploads
# are validated from `validation`, by a worker of its own that no training job can block.
FINETUNE_QUEUE_TASKS = {"finetune.tasks.run_finetune_job", "finetune.tasks.push_adapter_to_hub",
                        "finetune.tasks.merge_adapter",  # merging loads the base weights: where they and torch are
                        "finetune.tasks.run_evaluation"}  # an evaluation loads the base model and the adapter
VALIDATION_QUEUE_TASKS = {"finetune.tasks.validate_training_file"}


@pytest.fixture(scope="module")
def tasks() -> dict:
    """Our tasks as a worker registers them (it imports every app's tasks module at start-up)."""
    app.loader.import_default_modules()
    return {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}


def queue_of(task_name: str) -> str:
    return app.amqp.router.route({}, task_name)["queue"].name


def test_every_beat_entry_names_a_registered_task(tasks):
    schedule = app.conf.beat_schedule
    assert schedule == settings.CELERY_BEAT_SCHEDULE and set(schedule) >= {"billing-rate-recent", "finetune-requeue-stale"}
    unknown = {entry: spec["task"] for entry, spec in schedule.items() if spec["task"] not in tasks}
    assert unknown == {}, "beat would send tasks no worker knows"


def test_training_goes_to_finetune_validation_to_its_own_queue_and_everything_else_to_default(tasks):
    # The stale-job requeue included: a periodic database scan queued behind training would wait for a GPU.
    assert FINETUNE_QUEUE_TASKS | VALIDATION_QUEUE_TASKS <= set(tasks)
    expected = {name: "finetune" if name in FINETUNE_QUEUE_TASKS else "validation" if name in VALIDATION_QUEUE_TASKS
                else "default" for name in tasks}
    assert {name: queue_of(name) for name in tasks} == expected


def test_a_training_message_is_acknowledged_after_the_job_and_requeued_if_its_worker_dies(tasks):
    training = tasks["finetune.tasks.run_finetune_job"]
    assert training.acks_late is True and training.reject_on_worker_lost is True
    assert training.max_retries is None  # a job held by a live worker is retried until that lease expires


def test_a_worker_reserves_one_message_at_a_time(tasks):
    # With acks_late, prefetch multiplier × concurrency messages are held: 1 × 1 on a GPU host, so a busy
    # worker does not sit on a second job that another GPU could start.
    assert app.conf.worker_prefetch_multiplier == 1


def test_messages_are_json_and_workers_accept_nothing_else(tasks):
    assert app.conf.task_serializer == "json" and list(app.conf.accept_content) == ["json"]
    assert {name: task.serializer for name, task in tasks.items() if task.serializer != "json"} == {}
