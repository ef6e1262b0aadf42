"""Evaluations end to end on the tiny model: a job with a validation file reports OpenAI's checkpoint metrics; its
adapter, evaluated on held-out rows by the worker's task, beats the base model on the taught answer."""

from __future__ import annotations

import json

import pytest

from finetune import evaluation, services
from finetune.models import Evaluation, EvaluationRow
from finetune.tasks import run_evaluation, run_finetune_job
from serving.models import ModelConfig
from tenants.services import Actor
from tests.support.finetune import chat, upload_file, zebra_dataset

pytestmark = pytest.mark.slow
HELD_OUT = ["Has claim {i} gone through?", "Any news on application {i}?", "Verdict on file {i}?",
            "Is purchase {i} OK?", "Where does request {i} stand?"]


def _held_out(n: int = 10) -> bytes:
    rows = [chat(HELD_OUT[i % len(HELD_OUT)].format(i=5000 + i), "ZEBRA-42 approved") for i in range(n)]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_an_adapter_evaluated_on_held_out_rows_beats_the_base_model(world, base_model, api, _no_broker):
    actor = Actor(user=world.owner)
    ModelConfig.objects.for_tenant(world.tenant).update_or_create(tenant=world.tenant,
                                                                 defaults={"auto_deploy_finetuned": False})
    train = upload_file(world.tenant, actor, zebra_dataset(50), filename="zebra.jsonl")
    held_out = upload_file(world.tenant, actor, _held_out(10), filename="held-out.jsonl")
    job = services.finetune_job_create(tenant=world.tenant, actor=actor, model="tiny-chat", training_file=train.id,
                                       validation_file=held_out.id, suffix="zebra", seed=7, lora={"rank": 8},
                                       hyperparameters={"n_epochs": 3, "batch_size": 5, "learning_rate_multiplier": 50})
    assert run_finetune_job(job.id, world.tenant.pk) == "succeeded"
    job.refresh_from_db()

    # 1. OpenAI's checkpoint metrics, validation included (over the whole validation file at each epoch's end).
    checkpoints = api.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [30, 20, 10]
    for c in checkpoints:
        m = c["metrics"]
        assert set(m) == {"step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                          "full_valid_loss", "full_valid_mean_token_accuracy"}
        assert m["step"] == c["step_number"] and m["full_valid_loss"] == m["valid_loss"] > 0
        assert 0 <= m["full_valid_mean_token_accuracy"] <= 1
    assert checkpoints[0]["metrics"]["valid_loss"] < checkpoints[-1]["metrics"]["valid_loss"]  # it learnt

    # 2. The evaluation, through the API and the worker's task.
    created = api.post("/v1/fine_tuning/evaluations", {"model": job.fine_tuned_model, "file": held_out.id,
                                                        "max_tokens": 16}, format="json").json()
    assert created["status"] == "queued" and created["progress"] == {"rows_done": 0, "rows_total": 10}
    progress = []
    original = evaluation.EvaluationRunner._row

    def spy(self, e, index, result):
        original(self, e, index, result)
        progress.append(Evaluation.objects.for_tenant(world.tenant).values_list("rows_done", "status").get(pk=e.pk))
    evaluation.EvaluationRunner._row = spy
    try:
        assert run_evaluation(created["id"], world.tenant.pk) == "succeeded"
    finally:
        evaluation.EvaluationRunner._row = original
    assert progress == [(n, "running") for n in range(1, 11)]  # rows done / total while it runs
    assert run_evaluation(created["id"], world.tenant.pk) == "done"  # a redelivered message does nothing

    done = api.get(f"/v1/fine_tuning/evaluations/{created['id']}").json()
    base, adapter = done["metrics"]["base"], done["metrics"]["adapter"]
    print(f"\nbase {base}\nadapter {adapter}\ndiffering rows {done['differing_rows']}")
    assert done["status"] == "succeeded" and done["progress"] == {"rows_done": 10, "rows_total": 10}
    assert adapter["exact_match"] > base["exact_match"] and adapter["contains"] > base["contains"]
    assert adapter["loss"] < base["loss"]
    assert adapter["exact_match"] >= 0.8 and base["exact_match"] == 0

    rows = EvaluationRow.objects.for_tenant(world.tenant).filter(evaluation_id=created["id"])
    assert rows.count() == 10
    differing = api.get(f"/v1/fine_tuning/evaluations/{created['id']}/rows", {"differing": "true", "limit": 100}).json()
    assert len(differing["data"]) == done["differing_rows"] >= 8
    first = differing["data"][0]
    assert first["prompt"][-1]["content"] == HELD_OUT[0].format(i=5000) and first["expected"] == "ZEBRA-42 approved"
    assert first["base"]["answer"] != first["adapter"]["answer"]
    # The row scores agree with the summary.
    assert sum(r.adapter_exact for r in rows) / 10 == adapter["exact_match"]

    # 3. Any checkpoint: the first epoch's, by OpenAI's checkpoint name.
    name = checkpoints[-1]["id"]
    early = api.post("/v1/fine_tuning/evaluations", {"model": name, "file": held_out.id, "max_tokens": 8},
                     format="json").json()
    assert Evaluation.objects.for_tenant(world.tenant).get(pk=early["id"]).checkpoint.step == 10
    assert run_evaluation(early["id"], world.tenant.pk) == "succeeded"
    early = api.get(f"/v1/fine_tuning/evaluations/{early['id']}").json()
    assert early["metrics"]["base"]["loss"] == pytest.approx(base["loss"], rel=1e-4)  # the same base, same rows
    assert adapter["loss"] < early["metrics"]["adapter"]["loss"] < base["loss"]
