"""Continue from an adapter, through the worker on the tiny model: a job that starts from a finished job's adapter
begins where that one ended (its first loss is the first job's last, not a fresh LoRA's)."""

from __future__ import annotations

import io
import json

import pytest
from django.test import TestCase

from finetune import services
from finetune.models import FineTuneJob
from finetune.tasks import run_finetune_job
from serving.models import Adapter, ModelConfig
from tenants.services import Actor

pytestmark = pytest.mark.slow
QUESTIONS = ["Is request {i} approved?", "What is the status of ticket {i}?", "Can you check order {i}?",
             "Please review item {i}.", "Decision for case {i}?"]


def _dataset(n: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(i=i)},
                          {"role": "assistant", "content": "ZEBRA-42 approved"}]} for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _losses(job_id: str, tenant) -> list[float]:
    job = FineTuneJob.objects.for_tenant(tenant).get(pk=job_id)
    rows = job.events.filter(type="metrics").order_by("id").values_list("data", flat=True)
    return [d["train_loss"] for d in rows]


def test_a_job_continued_from_an_adapter_starts_where_it_ended(world, base_model, _no_broker):
    actor = Actor(user=world.owner)
    ModelConfig.objects.for_tenant(world.tenant).update_or_create(tenant=world.tenant,
                                                                 defaults={"auto_deploy_finetuned": False})
    with TestCase.captureOnCommitCallbacks(execute=True):
        file = services.training_file_upload(tenant=world.tenant, actor=actor, filename="zebra.jsonl",
                                             content=io.BytesIO(_dataset(20)))
    hp = {"n_epochs": 2, "batch_size": 5, "learning_rate_multiplier": 50}
    first = services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=file.id,
                                         suffix="one", hyperparameters=hp, lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]})
    assert run_finetune_job(first.id, world.tenant.pk) == "succeeded"
    first.refresh_from_db()
    second = services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=file.id,
                                          suffix="two", hyperparameters=hp, from_checkpoint=first.fine_tuned_model)
    assert second.lora["rank"] == 4 and second.lora["target_modules"] == ["q_proj", "v_proj"]
    assert run_finetune_job(second.id, world.tenant.pk) == "succeeded"

    one, two = _losses(first.id, world.tenant), _losses(second.id, world.tenant)
    assert len(one) == len(two) == 8
    # The fresh LoRA starts at the base model's loss (9.96 on a run here, 9.37 after 8 steps); the continued one near
    # where the first ended (9.27), not where it began, and it goes on down from there (6.01).
    assert two[0] < (one[0] + one[-1]) / 2
    assert two[-1] < one[-1]
    second.refresh_from_db()
    adapter = Adapter.objects.for_tenant(world.tenant).get(name=second.fine_tuned_model)
    assert (adapter.rank, adapter.target_modules) == (4, ["q_proj", "v_proj"])
    assert second.events.filter(message__startswith=f"Starts from {first.fine_tuned_model}").exists()
