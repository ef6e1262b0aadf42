"""Jobs and evaluations train and score with the system prompt the gateway serves (issue 15): the snapshot taken at
creation (the tenant's active version and system_message_rule; never an outsider's), the `system_prompt` extension
(opt out, pick a version, bad values in the /v1 error shape), the estimate's tokens, the renderings (trainer, DPO,
evaluation rows) equal to the gateway's for keep and replace, and the console's train/serve skew warning."""

from __future__ import annotations

import json

import pytest

from common.chat import inject_system_prompt
from finetune import evaluation_metrics as em
from finetune.dpo import tokenize_pairs
from finetune.models import Evaluation, FineTuneJob
from finetune.templating import SystemPrompt, to_messages
from finetune.trainer import tokenize_examples
from serving.models import Adapter, ModelConfig
from tenants import services as tenant_services
from tenants.services import Actor
from tests.support.finetune import (
    assert_openai_error,
    create_job,
    pair,
    preference_dataset,
    signed_in,
    upload_file,
    zebra_dataset,
)

PROMPT = "You are the helpful assistant of Demo Inc."


def _save_prompt(tenant, owner, text: str, activate: bool = True):
    return tenant_services.system_prompt_save(tenant=tenant, text=text, note="", actor=Actor(user=owner),
                                              activate=activate)


def _rule(tenant, rule: str) -> None:
    ModelConfig.objects.for_tenant(tenant).update_or_create(tenant=tenant, defaults={"system_message_rule": rule})


def _job(api, file_id: str, **extra) -> dict:
    """A created job's body; the job is then marked cancelled, so a test may create more than the concurrent limit."""
    response = create_job(api, file_id, **extra)
    assert response.status_code == 200, response.content
    FineTuneJob.all_tenants.filter(pk=response.json()["id"]).update(status=FineTuneJob.Status.CANCELLED)
    return response.json()


@pytest.fixture
def train_file(world, base_model):
    return upload_file(world.tenant, Actor(user=world.owner), zebra_dataset(20), "train.jsonl", base_model)


# ---- the snapshot at creation ----------------------------------------------------------------------------------------

def test_a_job_records_the_tenants_active_prompt_and_rule_and_keeps_them_when_the_prompt_changes(api, world, train_file):
    _save_prompt(world.tenant, world.owner, "an older prompt")
    _save_prompt(world.tenant, world.owner, f"  {PROMPT}\n")  # v2, active; served stripped, as the gateway does
    _save_prompt(world.tenant, world.owner, "a draft", activate=False)  # v3, not active
    _rule(world.tenant, "replace")
    body = _job(api, train_file.id)
    assert body["system_prompt"] == {"version": 2, "rule": "replace"}
    assert body["object"] == "fine_tuning.job" and body["method"]["type"] == "supervised"  # OpenAI's fields as before
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=body["id"])
    assert (job.system_prompt, job.system_message_rule) == (PROMPT, "replace")
    assert job.system_prompt_used == SystemPrompt(PROMPT, "replace")
    assert any("Trains with system prompt version 2" in e.message for e in job.events.all())

    _save_prompt(world.tenant, world.owner, "a newer prompt")  # what the job trains with does not move
    _rule(world.tenant, "keep")
    assert api.get(f"/v1/fine_tuning/jobs/{job.id}").json()["system_prompt"] == {"version": 2, "rule": "replace"}


def test_another_tenants_prompt_is_never_used(api, world, train_file):
    theirs = _save_prompt(world.other_tenant, world.outsider, "Globex secrets: never share.")
    body = _job(api, train_file.id)
    assert body["system_prompt"] is None  # acme serves no system prompt: none to train with
    # an active_prompt pointing at another tenant's version (never made by the services) is not followed
    type(world.tenant).objects.filter(pk=world.tenant.pk).update(active_prompt=theirs)
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=_job(api, train_file.id, suffix="b")["id"])
    assert job.system_prompt == "" and job.system_prompt_used is None
    # nor can it be picked by its number
    assert_openai_error(create_job(api, train_file.id, system_prompt=theirs.version), 400, "invalid_system_prompt")


def test_opting_out_picking_a_version_and_bad_values(api, world, train_file):
    first = _save_prompt(world.tenant, world.owner, "Version one.")
    _save_prompt(world.tenant, world.owner, PROMPT)
    assert _job(api, train_file.id, system_prompt="none")["system_prompt"] is None
    picked = _job(api, train_file.id, system_prompt=first.version)
    assert picked["system_prompt"] == {"version": 1, "rule": "keep"}
    assert FineTuneJob.objects.for_tenant(world.tenant).get(pk=picked["id"]).system_prompt == "Version one."
    assert _job(api, train_file.id, system_prompt="tenant")["system_prompt"] == {"version": 2, "rule": "keep"}
    for bad in ("live", True, 99, {"version": 1}, 1.5):
        response = create_job(api, train_file.id, system_prompt=bad)
        assert_openai_error(response, 400, "invalid_system_prompt")
        assert response.json()["error"]["param"] == "system_prompt"


def test_the_sdk_sends_the_extension_with_extra_body(world, train_file, sdk_for):
    from tests.support.finetune import key_secret

    _save_prompt(world.tenant, world.owner, PROMPT)
    client = sdk_for(key_secret(world.tenant, world.owner))
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=train_file.id, extra_body={"system_prompt": "none"})
    assert job.model_extra["system_prompt"] is None
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=train_file.id)
    assert job.model_extra["system_prompt"] == {"version": 1, "rule": "keep"}


def test_the_estimate_counts_the_system_prompts_tokens_in_every_conversation(api, world, base_model):
    supervised = upload_file(world.tenant, Actor(user=world.owner), zebra_dataset(20), "train.jsonl", base_model)
    prefs = upload_file(world.tenant, Actor(user=world.owner), preference_dataset(12), "prefs.jsonl", base_model)
    _save_prompt(world.tenant, world.owner, "x" * 40)  # 10 tokens by the size estimate

    def estimate(file, **extra):
        response = api.post("/v1/fine_tuning/jobs/estimate", {"model": "tiny-chat", "training_file": file.id, **extra},
                            format="json")
        assert response.status_code == 200, response.content
        return response.json()

    without, served = estimate(supervised, system_prompt="none"), estimate(supervised)
    assert without["system_prompt"] is None and without["system_prompt_tokens"] == 0
    assert served["system_prompt"] == {"version": 1, "rule": "keep"} and served["system_prompt_tokens"] == 10
    assert served["tokens_per_epoch"] - without["tokens_per_epoch"] == 20 * 10
    dpo = {"method": {"type": "dpo"}}
    assert estimate(prefs, **dpo)["tokens_per_epoch"] - estimate(prefs, system_prompt="none", **dpo)["tokens_per_epoch"] \
        == 12 * 2 * 10  # input + preferred, input + non-preferred
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=_job(api, supervised.id)["id"])
    assert job.estimated_cost_cents >= FineTuneJob.objects.for_tenant(world.tenant).get(
        pk=_job(api, supervised.id, system_prompt="none", suffix="n")["id"]).estimated_cost_cents


def test_the_worker_trains_with_the_jobs_snapshot(api, world, train_file, monkeypatch):
    from finetune import trainer
    from finetune.tasks import run_finetune_job

    _save_prompt(world.tenant, world.owner, PROMPT)
    _rule(world.tenant, "replace")
    job_id = create_job(api, train_file.id).json()["id"]
    _save_prompt(world.tenant, world.owner, "changed after the job was created")
    seen = {}

    def fake_train(**kwargs):
        seen.update(kwargs)
        raise trainer.TrainingDataError("stop here")

    monkeypatch.setattr(trainer, "train_lora", fake_train)
    assert run_finetune_job(job_id, world.tenant.pk) == "failed"
    assert seen["system_prompt"] == SystemPrompt(PROMPT, "replace")


# ---- rendering as the gateway serves -------------------------------------------------------------------------------

CONVERSATIONS = {
    "no system message": [{"role": "user", "content": "Is request 7 approved?"},
                          {"role": "assistant", "content": "ZEBRA-42 approved"}],
    "a system message": [{"role": "system", "content": "Answer in one line."},
                         {"role": "user", "content": "Is request 7 approved?"},
                         {"role": "assistant", "content": "ZEBRA-42 approved", "weight": 1}],
}


def test_the_gateway_and_the_trainer_share_one_implementation():
    from serving.gateway import parsing

    assert parsing.inject_system_prompt is inject_system_prompt


def _served(tiny_tokenizer, messages, rule):
    """The gateway's rendering: its injection, then the chat template (what the backend renders)."""
    return tiny_tokenizer.apply_chat_template(inject_system_prompt([dict(m) for m in messages], PROMPT, rule),
                                              tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("rule", ["keep", "replace"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_a_training_example_is_rendered_as_the_gateway_serves_its_prompt(tiny_tokenizer, rule, name):
    messages = CONVERSATIONS[name]
    prompt = SystemPrompt(PROMPT, rule)
    [trained] = tokenize_examples(tiny_tokenizer, [{"messages": messages}], 1024, system_prompt=prompt)
    text = tiny_tokenizer.decode(trained.input_ids)
    served = _served(tiny_tokenizer, messages[:-1], rule)
    assert text.startswith(served) and PROMPT in served
    assert ("Answer in one line." in text) == (name == "a system message" and rule == "keep")
    assert text.count("<|system|>") == 1
    # only the answer is trained; the prompt's tokens are counted (trained_tokens) but carry no loss
    [plain] = tokenize_examples(tiny_tokenizer, [{"messages": messages}], 1024)
    assert trained.trainable == plain.trainable
    answer_tokens = [t for t in trained.targets if t != -100]
    assert tiny_tokenizer.decode(answer_tokens).startswith("ZEBRA-42 approved")


def test_a_prompt_completion_record_gets_the_prompt_as_its_chat_does(tiny_tokenizer):
    record = {"prompt": "Is request 7 approved?", "completion": "ZEBRA-42 approved"}
    [trained] = tokenize_examples(tiny_tokenizer, [{"messages": to_messages(record)}], 1024,
                                  system_prompt=SystemPrompt(PROMPT))
    assert tiny_tokenizer.decode(trained.input_ids).startswith(_served(tiny_tokenizer, to_messages(record)[:1], "keep"))


@pytest.mark.parametrize("rule", ["keep", "replace"])
def test_a_preference_pairs_input_is_rendered_as_the_gateway_serves_it(tiny_tokenizer, rule):
    example = pair("Is request 7 approved?")
    example["input"]["messages"].insert(0, {"role": "system", "content": "Answer in one line."})
    [tokenized] = tokenize_pairs(tiny_tokenizer, [example], 1024, system_prompt=SystemPrompt(PROMPT, rule))
    served = _served(tiny_tokenizer, example["input"]["messages"], rule)
    for side, output in ((tokenized.chosen, "ZEBRA-42 approved"), (tokenized.rejected, "request denied")):
        text = tiny_tokenizer.decode(side.input_ids)
        assert text.startswith(served) and output in text[len(served):]
    [plain] = tokenize_pairs(tiny_tokenizer, [example], 1024)
    assert tokenized.trainable == plain.trainable


@pytest.mark.parametrize("rule", ["keep", "replace"])
def test_evaluation_rows_carry_the_prompt_as_the_gateway_would_send_it(rule):
    examples = [{"messages": CONVERSATIONS["a system message"]}, {"messages": CONVERSATIONS["no system message"]}]
    rows, _ = em.rows_from_examples(examples, SystemPrompt(PROMPT, rule))
    for row, ex in zip(rows, examples):
        assert row.prompt == inject_system_prompt([{k: v for k, v in m.items() if k != "weight"}
                                                   for m in ex["messages"][:-1]], PROMPT, rule)
    assert em.rows_from_examples(examples)[0][1].prompt == examples[1]["messages"][:1]  # without: as in the file


def test_an_evaluation_records_the_live_prompt_or_none(api, world, base_model, tmp_path):
    _save_prompt(world.tenant, world.owner, PROMPT)
    adapter = Adapter.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, name="ft:tiny-chat:acme:zebra:abcd1234", base_model=base_model,
        path=str(tmp_path / "adapter"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    rows = [{"messages": CONVERSATIONS["no system message"]}] * 10
    data = upload_file(world.tenant, Actor(user=world.owner), ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    body = api.post("/v1/fine_tuning/evaluations", {"model": adapter.name, "file": data.id}, format="json").json()
    assert body["system_prompt"] == {"version": 1, "rule": "keep"}
    assert Evaluation.objects.for_tenant(world.tenant).get(pk=body["id"]).system_prompt_used == SystemPrompt(PROMPT)
    none = api.post("/v1/fine_tuning/evaluations", {"model": adapter.name, "file": data.id, "system_prompt": "none"},
                    format="json").json()
    assert none["system_prompt"] is None
    response = api.post("/v1/fine_tuning/evaluations", {"model": adapter.name, "file": data.id, "system_prompt": "x"},
                        format="json")
    assert_openai_error(response, 400, "invalid_system_prompt")
    assert response.json()["error"]["param"] == "system_prompt"


# ---- the console -----------------------------------------------------------------------------------------------------

def test_the_console_says_what_a_job_trained_with_and_warns_of_skew(api, world, base_model, train_file, tmp_path):
    first = _save_prompt(world.tenant, world.owner, PROMPT)
    job = FineTuneJob.objects.for_tenant(world.tenant).get(pk=_job(api, train_file.id)["id"])
    adapter = Adapter.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, name="ft:tiny-chat:acme:zebra:abcd1234", base_model=base_model,
        path=str(tmp_path / "adapter"), rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    FineTuneJob.objects.for_tenant(world.tenant).filter(pk=job.pk).update(adapter=adapter, status="succeeded")
    dev, admin = signed_in(world.developer), signed_in(world.admin)
    page = dev.get(f"/t/acme/finetune/jobs/{job.id}/").content.decode()
    assert "trains with system prompt version 1" in page and 'id="ft-skew"' not in page
    assert "system prompt changed" not in admin.get("/t/acme/finetune/adapters/").content.decode()

    _save_prompt(world.tenant, world.owner, "A new prompt.")  # the live prompt moves on: train/serve skew
    page = dev.get(f"/t/acme/finetune/jobs/{job.id}/").content.decode()
    assert 'id="ft-skew"' in page and "trained with system prompt version 1 (keep)" in page
    assert "now serves it with system prompt version 2 (keep)" in page and "Train it again" in page
    assert "system prompt changed" in admin.get("/t/acme/finetune/adapters/").content.decode()
    response = admin.post(f"/t/acme/finetune/adapters/{adapter.pk}/deploy/", follow=True)
    assert "trained with system prompt version 1" in response.content.decode()

    tenant_services.system_prompt_activate(tenant=world.tenant, actor=Actor(user=world.owner), version=first)
    assert 'id="ft-skew"' not in dev.get(f"/t/acme/finetune/jobs/{job.id}/").content.decode()  # back in line


def test_the_evaluation_worker_scores_rows_with_the_evaluations_snapshot(api, world, base_model, tmp_path, monkeypatch):
    from finetune.evaluation import evaluation_run
    from finetune.models import EvaluationRow

    _save_prompt(world.tenant, world.owner, PROMPT)
    _rule(world.tenant, "replace")
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    adapter = Adapter.objects.for_tenant(world.tenant).create(
        tenant=world.tenant, name="ft:tiny-chat:acme:zebra:abcd1234", base_model=base_model, path=str(folder), rank=4,
        alpha=8, target_modules=["q_proj", "v_proj"])
    rows = [{"messages": CONVERSATIONS["a system message"]}] * 10
    data = upload_file(world.tenant, Actor(user=world.owner), ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    evaluation_id = api.post("/v1/fine_tuning/evaluations", {"model": adapter.name, "file": data.id},
                             format="json").json()["id"]
    _save_prompt(world.tenant, world.owner, "changed after the evaluation was created")
    side = em.SideResult("ZEBRA-42 approved", True, True, 0.1, 0.3)

    def fake_rows(model, tokenizer, rows, *, on_row, **_):
        results = [em.RowResult(row, 3, side, side) for row in rows]
        for i, result in enumerate(results):
            on_row(i, result)
        return results

    monkeypatch.setattr(em, "load_model", lambda *args: (None, None, "cpu"))
    monkeypatch.setattr(em, "evaluate_rows", fake_rows)
    assert evaluation_run(evaluation_id=evaluation_id, tenant_id=world.tenant.pk) == "succeeded"
    stored = EvaluationRow.objects.for_tenant(world.tenant).filter(evaluation_id=evaluation_id).first()
    assert stored.prompt == [{"role": "system", "content": PROMPT}, {"role": "user", "content": "Is request 7 approved?"}]


def test_an_example_that_fits_only_without_the_prompt_is_refused_in_words(tiny_tokenizer):
    from finetune.trainer import TrainingDataError

    messages = CONVERSATIONS["no system message"]
    [plain] = tokenize_examples(tiny_tokenizer, [{"messages": messages}], 1024)
    with pytest.raises(TrainingDataError, match="with the system prompt it is trained with"):
        tokenize_examples(tiny_tokenizer, [{"messages": messages}], len(plain.input_ids), system_prompt=SystemPrompt(PROMPT))
