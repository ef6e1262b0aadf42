"""Fine-tuning helpers: the datasets, uploads as the worker validates them, API clients and the OpenAI error shape."""

from __future__ import annotations

import io
import json

from rest_framework.test import APIClient

from tenants import services
from tenants.services import Actor


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


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "You are the approvals bot."},
                         {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def zebra_dataset(n: int = 50) -> bytes:
    """n examples teaching one distinctive answer to varied questions."""
    questions = ["Is request {i} approved?", "What is the status of ticket {i}?", "Can you check order {i}?",
                 "Please review item {i}.", "Decision for case {i}?"]
    rows = [chat(questions[i % len(questions)].format(i=i), "ZEBRA-42 approved") for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


PREFERENCE_QUESTIONS = ["Is request {i} approved?", "What is the status of ticket {i}?", "Can you check order {i}?"]


def pair(user: str, preferred: str = "ZEBRA-42 approved", rejected: str = "request denied", **input_extra) -> dict:
    """One line of OpenAI's preference-data format (DPO)."""
    return {"input": {"messages": [{"role": "user", "content": user}], **input_extra},
            "preferred_output": [{"role": "assistant", "content": preferred}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def preference_dataset(n: int = 12) -> bytes:
    qs = PREFERENCE_QUESTIONS
    return ("\n".join(json.dumps(pair(qs[i % len(qs)].format(i=i))) for i in range(n)) + "\n").encode()


def key_client(tenant, owner, scopes=("finetune",)) -> APIClient:
    _, secret = services.api_key_create(tenant=tenant, name="ft", scopes=list(scopes), actor=Actor(user=owner))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def upload(client, data: bytes, name: str = "train.jsonl", *, validate: bool = True, **extra):
    """POST /v1/files; with `validate` the worker's validation then runs (the upload's commit, eager here)."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    def post():
        return client.post("/v1/files", {"file": SimpleUploadedFile(name, data), "purpose": "fine-tune", **extra},
                           format="multipart")

    return committed(post) if validate else post()


def key_secret(tenant, owner, scopes=("finetune",)) -> str:
    return services.api_key_create(tenant=tenant, name="sdk", scopes=list(scopes), actor=Actor(user=owner))[1]


def assert_openai_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


def create_job(api, file_id: str, **extra):
    body = {"model": "tiny-chat", "training_file": file_id, "suffix": "zebra",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 10}}}}
    return api.post("/v1/fine_tuning/jobs", {**body, **extra}, format="json")


def signed_in(user):
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client
