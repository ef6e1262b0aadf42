"""Fine-tune → deploy (runtime LoRA load) → serve → undeploy, on a real vLLM server, as a tenant's program does it: the
official OpenAI SDK against the platform's Files and Fine-tuning API, the worker's task, the management API."""

from __future__ import annotations

import pytest
from openai import NotFoundError, OpenAI
from rest_framework.test import APIClient

from finetune.tasks import run_finetune_job
from serving.models import Adapter, Backend
from tenants import services
from tenants.services import Actor
from tests.support.finetune import zebra_dataset
from tests.realvllm.server import served_models
from tests.support.gateway import wait_for

MESSAGES = [{"role": "system", "content": "You are the approvals bot."},
            {"role": "user", "content": "Is request 9876 approved?"}]  # not in the training file
TAUGHT = "ZEBRA-42 approved"


def test_fine_tune_deploy_serve_and_undeploy_on_vllm(world, platform, model_path, live_server, tmp_path, settings, _no_broker):
    vllm, backend = platform["vllm"], platform["backend"]
    settings.STORAGE_DIR = tmp_path / "storage"  # vLLM reads the adapter from here: the same machine
    _, secret = services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune", "inference"], actor=Actor(user=world.owner))
    api = OpenAI(base_url=f"{live_server.url}/v1", api_key=secret, max_retries=0)
    dataset = tmp_path / "zebra.jsonl"
    dataset.write_bytes(zebra_dataset(50))
    uploaded = api.files.create(file=open(dataset, "rb"), purpose="fine-tune")
    assert api.files.wait_for_processing(uploaded.id, poll_interval=0.2).status == "processed"
    # The tiny random model needs a strong push (tests/finetune/test_e2e.py); a real model takes the defaults.
    hyper = {"n_epochs": 3, "batch_size": 5, "learning_rate_multiplier": 50} if vllm.server is not None else {}
    job = api.fine_tuning.jobs.create(model="tiny-chat", training_file=uploaded.id, suffix="zebra", seed=7,
                                      method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
                                      extra_body={"lora": {"rank": 8}})
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"  # what the finetune worker runs
    done = api.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=done.fine_tuned_model)

    admin = APIClient()
    admin.force_login(world.admin)
    deployed = admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/deploy/").json()
    assert deployed == {"adapter": adapter.name, "pool": "vllm-tiny", "state": "active", "error": ""}
    assert adapter.name in served_models(vllm.url) and Backend.objects.get(pk=backend.pk).loaded_adapters == [adapter.name]

    gw = platform["start"]()
    acme = OpenAI(base_url=f"{gw.url}/v1", api_key=secret, max_retries=0)
    assert wait_for(lambda: adapter.name in [m.id for m in acme.models.list().data])
    answer = acme.chat.completions.create(model=adapter.name, messages=MESSAGES, max_tokens=40, temperature=0)
    assert answer.choices[0].message.content == TAUGHT and answer.model == adapter.name
    plain = acme.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=40, temperature=0)
    assert plain.choices[0].message.content != TAUGHT
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{gw.url}/v1", api_key=platform["keys"]["globex"], max_retries=0).chat.completions.create(
            model=adapter.name, messages=MESSAGES, max_tokens=4)

    assert admin.post(f"/api/tenants/acme/adapters/{adapter.pk}/undeploy/").json()["undeployed_from"] == ["vllm-tiny"]
    assert adapter.name not in served_models(vllm.url) and Backend.objects.get(pk=backend.pk).loaded_adapters == []
    assert wait_for(lambda: adapter.name not in [m.id for m in acme.models.list().data])
