"""Shared fixtures: the offline tiny chat model (built once per session) and its tokenizer; uploads as the worker
validates them."""

import io

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(autouse=True)
def _storage(settings, tmp_path):
    settings.STORAGE_DIR = tmp_path / "storage"


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch):
    """Jobs are enqueued on commit; tests run the task themselves. Every other task (an upload's validation, a token
    count) runs eagerly in this process once its transaction commits, as a worker would run it
    (tests/test_celery_worker.py runs a real worker)."""
    from finetune import tasks
    from portal.celery import app

    monkeypatch.setitem(app.conf, "task_always_eager", True)
    monkeypatch.setitem(app.conf, "task_eager_propagates", True)
    sent = []
    monkeypatch.setattr(tasks.run_finetune_job, "delay", lambda *args: sent.append(args))
    return sent


def committed(action):
    """Run `action()` and then what it left for its transaction's commit (the validation it enqueued, eager here): in
    a test wrapped in one transaction nothing commits, so this stands for the commit. Returns what `action` returned."""
    from django.test import TestCase

    with TestCase.captureOnCommitCallbacks(execute=True):
        return action()


def upload_file(tenant, actor, data: bytes, filename: str = "train.jsonl", base_model=None):
    """A file uploaded through the service and validated by the worker's task, reloaded."""
    from finetune import services
    from finetune.models import TrainingFile

    file = committed(lambda: services.training_file_upload(tenant=tenant, actor=actor, filename=filename,
                                                           content=io.BytesIO(data), base_model=base_model))
    return TrainingFile.objects.for_tenant(tenant).get(pk=file.pk)


@pytest.fixture
def base_model(db, tiny_model_path):
    from serving.models import BaseModel

    return BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=176)
