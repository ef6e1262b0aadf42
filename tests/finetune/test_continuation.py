"""Continue from an adapter (finetune/continuation.py): a job starts from one of the tenant's adapters or checkpoints of
its base model, with its rank and target modules, named in `from_checkpoint`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.test import TestCase
from rest_framework.test import APIClient

from finetune import byo, continuation, services
from finetune.models import FineTuneJob, JobCheckpoint, TrainingFile
from serving.models import Adapter, BackendPool, BaseModel
from tenants import services as tenant_services
from tenants.services import Actor
from tests.support.adapters import lora_config, safetensors_bytes, tensors_for

QUESTIONS = ["Is request {i} approved?", "What is the status of ticket {i}?", "Can you check order {i}?"]


def _dataset(n: int = 12) -> bytes:
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % 3].format(i=i)},
                          {"role": "assistant", "content": "ZEBRA-42 approved"}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _committed(action):
    with TestCase.captureOnCommitCallbacks(execute=True):
        return action()


@pytest.fixture
def setup(world, base_model):
    """The tiny model served by a pool (rank ≤ 16), a validated training file and an uploaded rank-4 adapter of acme."""
    BackendPool.objects.create(name="shared-tiny", base_model=base_model, kind="dev", max_lora_rank=16)
    actor = Actor(user=world.owner)
    file = _committed(lambda: services.training_file_upload(tenant=world.tenant, actor=actor, filename="t.jsonl",
                                                            content=io.BytesIO(_dataset())))
    assert TrainingFile.objects.for_tenant(world.tenant).get(pk=file.pk).is_valid
    adapter = byo.adapter_upload(tenant=world.tenant, actor=actor, model="tiny-chat", deploy=False, parts=[
        byo.bytes_part("adapter_config.json", json.dumps(lora_config()).encode()),
        byo.bytes_part("adapter_model.safetensors", safetensors_bytes(tensors_for()))]).adapter
    return file, adapter


def _api(tenant, user) -> APIClient:
    _, secret = tenant_services.api_key_create(tenant=tenant, name="ft", scopes=["finetune"], actor=Actor(user=user))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def _create(client, file_id: str, **extra):
    return client.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": file_id, **extra}, format="json")


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code, response.content
    return response.json()["error"]["message"]


def test_a_job_starts_from_an_uploaded_adapter_with_its_rank_and_modules(world, setup):
    file, adapter = setup
    response = _create(_api(world.tenant, world.owner), file.id, from_checkpoint=adapter.name)
    assert response.status_code == 200, response.content
    lora = response.json()["lora"]
    assert lora == {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["down_proj", "q_proj", "v_proj"],
                    "init_from": adapter.name}  # the name the tenant gave, never a storage path
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=response.json()["id"])
    assert job.events.filter(message__startswith=f"Starts from {adapter.name} (rank 4)").exists()
    assert continuation.start_path_for_job(job) == adapter.path  # where the worker loads the first weights from


def test_the_official_sdk_sends_it_as_extra_body(world, setup, sdk_for):
    from openai import NotFoundError

    file, adapter = setup
    _, secret = tenant_services.api_key_create(tenant=world.tenant, name="sdk", scopes=["finetune"],
                                               actor=Actor(user=world.owner))
    sdk = sdk_for(secret)
    job = sdk.fine_tuning.jobs.create(model="tiny-chat", training_file=file.id,
                                      extra_body={"from_checkpoint": adapter.name})
    assert job.status == "queued" and job.lora["init_from"] == adapter.name and job.lora["rank"] == 4
    with pytest.raises(NotFoundError) as missing:
        sdk.fine_tuning.jobs.create(model="tiny-chat", training_file=file.id, extra_body={"from_checkpoint": "ft:nope"})
    assert missing.value.body["code"] == "checkpoint_not_found" and missing.value.body["param"] == "from_checkpoint"


def test_the_estimate_takes_the_same_field(world, setup):
    file, adapter = setup
    response = _api(world.tenant, world.owner).post("/v1/fine_tuning/jobs/estimate", {
        "model": "tiny-chat", "training_file": file.id, "from_checkpoint": adapter.name}, format="json")
    assert response.status_code == 200 and response.json()["lora"]["init_from"] == adapter.name


def test_another_rank_or_other_modules_than_the_adapters_are_refused(world, setup):
    file, adapter = setup
    api = _api(world.tenant, world.owner)
    assert "differs from the rank of" in _error(_create(api, file.id, from_checkpoint=adapter.name, lora={"rank": 8}),
                                                400, "invalid_lora")
    assert "differ from those of" in _error(_create(api, file.id, from_checkpoint=adapter.name,
                                                    lora={"target_modules": "all-linear"}), 400, "invalid_lora")
    alpha = _create(api, file.id, from_checkpoint=adapter.name, lora={"rank": 4, "alpha": 32})
    assert alpha.status_code == 200 and alpha.json()["lora"]["alpha"] == 32  # alpha is the job's to choose


def test_an_adapter_of_another_base_model_is_refused(world, setup, tiny_model_path):
    file, _ = setup
    other = BaseModel.objects.create(name="tiny-two", hf_id="platform/tiny-two", local_path=str(tiny_model_path))
    foreign = Adapter.objects.for_tenant(world.tenant).create(name="ft:tiny-two:acme::1", base_model=other,
                                                              path="/nowhere", rank=4)
    assert "not of tiny-chat" in _error(_create(_api(world.tenant, world.owner), file.id, from_checkpoint=foreign.name),
                                        400, "base_model_mismatch")


def test_another_tenants_adapter_or_checkpoint_is_not_found(world, setup, base_model):
    file, adapter = setup
    outsider_file = _committed(lambda: services.training_file_upload(
        tenant=world.other_tenant, actor=Actor(user=world.outsider), filename="t.jsonl", content=io.BytesIO(_dataset())))
    theirs = _api(world.other_tenant, world.outsider)
    assert _error(_create(theirs, outsider_file.id, from_checkpoint=adapter.name), 404, "checkpoint_not_found")
    checkpoint = _checkpoint(world.tenant, base_model, file, adapter, step=10)
    assert _error(_create(theirs, outsider_file.id, from_checkpoint=checkpoint.public_id), 404, "checkpoint_not_found")
    assert _error(_create(theirs, outsider_file.id, from_checkpoint=checkpoint.job_id), 404, "checkpoint_not_found")
    assert _error(_create(_api(world.tenant, world.owner), file.id, from_checkpoint="ft:tiny-chat:acme::nothing"), 404,
                  "checkpoint_not_found")


def _checkpoint(tenant, base_model, file, adapter, *, step: int) -> JobCheckpoint:
    """A finished job of `tenant` with a checkpoint whose folder holds a copy of `adapter`'s files."""
    job = FineTuneJob.objects.for_tenant(tenant).create(
        base_model=base_model, training_file=file, status=FineTuneJob.Status.SUCCEEDED, suffix="z",
        lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["down_proj", "q_proj", "v_proj"]},
        fine_tuned_model=f"ft:tiny-chat:{tenant.slug}:z:abcdef12", adapter=adapter)
    folder = Path(adapter.path).parent / f"ckpt-{step}"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((Path(adapter.path) / name).read_bytes())
    return JobCheckpoint.objects.for_tenant(tenant).create(job=job, step=step, epoch=1, path=str(folder))


def test_a_checkpoint_is_named_by_its_id_its_checkpoint_model_name_or_its_jobs_id(world, setup, base_model):
    file, adapter = setup
    checkpoint = _checkpoint(world.tenant, base_model, file, adapter, step=10)
    api = _api(world.tenant, world.owner)
    for ref, path in ((checkpoint.public_id, checkpoint.path),
                      (f"{checkpoint.job.fine_tuned_model}:ckpt-step-10", checkpoint.path),  # OpenAI's checkpoint name
                      (checkpoint.job_id, adapter.path)):  # a job: its fine-tuned model
        response = _create(api, file.id, from_checkpoint=ref)
        assert response.status_code == 200, (ref, response.content)
        job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=response.json()["id"])
        assert continuation.start_path_for_job(job) == path
        services.finetune_job_cancel(tenant=world.tenant, actor=Actor(user=world.owner), job=job)  # the job limit
    assert _error(_create(api, file.id, from_checkpoint=f"{checkpoint.job.fine_tuned_model}:ckpt-step-20"), 404,
                  "checkpoint_not_found")


@pytest.mark.slow
def test_a_job_whose_start_is_gone_fails_saying_so_instead_of_training_from_scratch(world, setup, _no_broker):
    import shutil

    from finetune.tasks import run_finetune_job

    file, adapter = setup
    response = _create(_api(world.tenant, world.owner), file.id, from_checkpoint=adapter.name)
    shutil.rmtree(adapter.path)
    assert run_finetune_job(response.json()["id"], world.tenant.pk) == "failed"
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=response.json()["id"])
    assert job.error_code == "checkpoint_not_found" and adapter.name in job.error_message


def test_the_worker_hands_the_start_to_the_trainer(world, setup, monkeypatch, _no_broker):
    from finetune import trainer
    from finetune.tasks import run_finetune_job

    file, adapter = setup
    seen = {}

    def fake_train_lora(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(trainer, "train_lora", fake_train_lora)
    fresh = _create(_api(world.tenant, world.owner), file.id).json()["id"]
    assert run_finetune_job(fresh, world.tenant.pk) == "failed" and seen["init_adapter"] is None
    continued = _create(_api(world.tenant, world.owner), file.id, from_checkpoint=adapter.name).json()["id"]
    assert run_finetune_job(continued, world.tenant.pk) == "failed"
    assert seen["init_adapter"] == adapter.path and seen["hyperparameters"]["lora_r"] == 4
    assert seen["hyperparameters"]["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_the_console_job_form_offers_the_tenants_adapters_and_checkpoints(world, setup, base_model, client):
    file, adapter = setup
    checkpoint = _checkpoint(world.tenant, base_model, file, adapter, step=10)
    client.force_login(world.developer)
    page = client.get("/t/acme/finetune/jobs/new/")
    assert page.status_code == 200
    assert f'value="{adapter.name}"'.encode() in page.content and f'value="{checkpoint.public_id}"'.encode() in page.content
    response = client.post("/t/acme/finetune/jobs/new/", {
        "training_file": file.id, "model": "tiny-chat", "n_epochs": "auto", "batch_size": "auto",
        "learning_rate_multiplier": "auto", "from_checkpoint": checkpoint.public_id})
    assert response.status_code == 302, response.content.decode()[:2000]
    job = FineTuneJob.objects.for_tenant(world.tenant).filter(status="queued").get()
    assert job.lora["init_from"] == checkpoint.public_id and job.lora["rank"] == 4
    # Another tenant's checkpoint id posted by hand is not one of the choices.
    other = client.post("/t/acme/finetune/jobs/new/", {
        "training_file": file.id, "model": "tiny-chat", "n_epochs": "auto", "batch_size": "auto",
        "learning_rate_multiplier": "auto", "from_checkpoint": "ftckpt-0000000000000001"})
    assert other.status_code == 400 and b"not one of the available choices" in other.content


@pytest.mark.slow
def test_the_trainer_starts_from_the_adapters_weights(tiny_model_path, tmp_path):
    """At learning rate 0 the job's adapter is the adapter it started from, weight for weight (and not a fresh LoRA)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.trainer import train_lora

    torch.manual_seed(5)
    start = tmp_path / "start"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                              init_lora_weights=False)).save_pretrained(start)
    examples = [{"messages": [{"role": "user", "content": f"Is request {i} approved?"},
                              {"role": "assistant", "content": "ZEBRA-42 approved"}]} for i in range(4)]
    hp = dict(n_epochs=1, batch_size=2, learning_rate=0.0, lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    events = []
    result = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat", train_examples=examples,
                        output_dir=tmp_path / "run", hyperparameters=hp, init_adapter=start, on_event=events.append)
    assert result.status == "succeeded"
    expected, got = load_file(str(start / "adapter_model.safetensors")), load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(e.get("message") == "Started from the given adapter's weights" for e in events)
    fresh = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat", train_examples=examples,
                       output_dir=tmp_path / "fresh", hyperparameters=hp)
    fresh_weights = load_file(str(fresh.adapter_dir / "adapter_model.safetensors"))
    assert not all(torch.equal(fresh_weights[k], expected[k]) for k in expected)
