"""Shared fixtures: the offline tiny chat model (built once per session) and its tokenizer."""

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
    """Jobs are enqueued on commit; tests run the task themselves."""
    from finetune import tasks

    sent = []
    monkeypatch.setattr(tasks.run_finetune_job, "delay", lambda *args: sent.append(args))
    return sent


@pytest.fixture
def base_model(db, tiny_model_path):
    from serving.models import BaseModel

    return BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=176)
