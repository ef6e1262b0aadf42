"""Shared fixtures: the offline tiny chat model (built once per session) and its tokenizer; API clients of the tenant
and of an outsider, and the OpenAI SDK in-process. Helpers (datasets, uploads) are in tests/support/finetune.py."""

import pytest

from tests.support.finetune import key_client


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


@pytest.fixture
def base_model(db, tiny_model_path):
    from serving.models import BaseModel

    return BaseModel.objects.create(name="tiny-chat", hf_id="platform/tiny-chat", local_path=str(tiny_model_path),
                                    context_length=1024, hidden_size=64, num_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, intermediate_size=176)


@pytest.fixture
def api(world):
    return key_client(world.tenant, world.owner)


@pytest.fixture
def outsider_api(world):
    return key_client(world.other_tenant, world.outsider)


@pytest.fixture
def sdk_for(world):
    """sdk_for(secret): the official OpenAI SDK calling this Django in-process through WSGI, as a real server would
    (middleware and CSRF included), inside the test's transaction."""
    import httpx2
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections
    from openai import OpenAI

    handler = WSGIHandler()

    def app(environ, start_response):
        # As Django's test client does, around each request (the test client reconnects them after its own): a
        # request's start and end must not close the connection that holds the test's transaction.
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            response = handler(environ, start_response)
            body = b"".join(response)
            response.close()  # sends request_finished
            return [body]
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)

    clients = []

    def make(secret: str) -> OpenAI:
        http = httpx2.Client(transport=httpx2.WSGITransport(app=app))
        clients.append(http)
        return OpenAI(base_url="http://testserver/v1", api_key=secret, max_retries=0, http_client=http)

    yield make
    for http in clients:
        http.close()
