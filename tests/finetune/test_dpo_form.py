"""The console's new-job form for preference tuning (DPO): the method choice, beta validated by the API's own rules
(field errors, the API's messages), files labelled and matched by their format, the price preview of a preference file
(both conversations' tokens), roles and tenant isolation; and DPO's own "auto" learning-rate multiplier."""

from __future__ import annotations

import re

import pytest

from finetune import planning
from finetune.estimates import estimate_cost_cents
from finetune.models import FineTuneJob
from finetune.templating import tokenize_chat_example
from finetune.validation import preference_pair, validate_jsonl
from tests.support.finetune import preference_dataset, signed_in, upload_file, zebra_dataset
from tenants.services import Actor

NEW_JOB = "/t/acme/finetune/jobs/new/"


@pytest.fixture
def files(world, base_model):
    """acme: a chat file, a preference training file and a preference validation file; globex: a preference file."""
    def up(tenant, user, data, name):
        return upload_file(tenant, Actor(user=user), data, name, base_model)

    return {
        "chat": up(world.tenant, world.owner, zebra_dataset(20), "chat.jsonl"),
        "prefs": up(world.tenant, world.owner, preference_dataset(12), "prefs.jsonl"),
        "prefs_valid": up(world.tenant, world.owner, preference_dataset(10), "held-out.jsonl"),
        "foreign": up(world.other_tenant, world.outsider, preference_dataset(12), "theirs.jsonl"),
    }


def dpo_form(files, **changes) -> dict:
    return {"method": "dpo", "training_file": files["prefs"].id, "model": "tiny-chat", "n_epochs": "2",
            "batch_size": "auto", "learning_rate_multiplier": "auto", "beta": "auto", "suffix": "prefs",
            "lora_rank": "8", **changes}


def test_the_form_offers_the_method_and_labels_each_file_with_its_format(world, files):
    response = signed_in(world.developer).get(NEW_JOB)
    assert response.status_code == 200
    form = response.context["form"]
    assert [v for v, _ in form.fields["method"].choices] == ["supervised", "dpo"]
    assert form["method"].value() == "supervised"
    labels = dict(form.fields["training_file"].choices)
    assert labels[files["chat"].id].endswith("· chat") and labels[files["prefs"].id].endswith("· preference (DPO)")
    page = response.content.decode()
    for name, fmt in (("chat", "chat"), ("prefs", "preference"), ("prefs_valid", "preference")):
        assert re.search(rf'<option value="{files[name].id}" data-format="{fmt}"', page), name
    assert '"dpo": ["preference"]' in page.replace("&quot;", '"')  # the method menu's formats, for the page's filter
    assert 'name="beta"' in page and files["foreign"].id not in page
    # "Train with this file" from a preference file's page starts as a DPO job
    assert signed_in(world.developer).get(NEW_JOB, {"file": files["prefs"].id}).context["form"]["method"].value() == "dpo"
    assert signed_in(world.developer).get(NEW_JOB, {"file": files["chat"].id}).context["form"]["method"].value() == "supervised"


def test_a_dpo_job_created_from_the_form_has_its_method_and_beta(world, files):
    dev = signed_in(world.developer)
    response = dev.post(NEW_JOB, dpo_form(files, beta="0.25", validation_file=files["prefs_valid"].id))
    job = FineTuneJob.objects.for_tenant(world.tenant).get()
    assert response.status_code == 302 and response["Location"] == f"/t/acme/finetune/jobs/{job.id}/"
    assert job.method == "dpo" and job.hyperparameters["beta"] == 0.25 and job.hyperparameters["n_epochs"] == 2
    assert (job.training_file_id, job.validation_file_id) == (files["prefs"].id, files["prefs_valid"].id)
    assert "preference tuning (DPO, beta 0.25" in dev.get(response["Location"]).content.decode()
    dev.post(NEW_JOB, dpo_form(files))  # beta left at "auto": OpenAI's 0.1
    auto = FineTuneJob.objects.for_tenant(world.tenant).exclude(pk=job.pk).get()
    assert auto.method == "dpo" and auto.hyperparameters["beta"] == 0.1


@pytest.mark.parametrize("beta", ["0", "high", "11", "-1"])
def test_beta_is_refused_on_its_field_with_the_apis_message(world, files, api, beta):
    """The form's beta goes through the API's parser: the same limits and, word for word, the same message."""
    value = beta if beta == "high" else float(beta)
    answer = api.post("/v1/fine_tuning/jobs", {"model": "tiny-chat", "training_file": files["prefs"].id, "method": {
        "type": "dpo", "dpo": {"hyperparameters": {"beta": value}}}}, format="json")
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "beta"
    for extra in ({}, {"estimate": "1"}):
        response = signed_in(world.developer).post(NEW_JOB, dpo_form(files, beta=beta, **extra))
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == ["beta"] and errors["beta"] == [answer.json()["error"]["message"]]
    assert not FineTuneJob.all_tenants.exists()


def test_beta_at_the_apis_limits_is_accepted(world, files):
    dev = signed_in(world.developer)
    for beta in ("0.001", "10"):
        assert dev.post(NEW_JOB, dpo_form(files, beta=beta, estimate="1")).status_code == 200
    assert dev.post(NEW_JOB, dpo_form(files, beta="10")).status_code == 302
    assert FineTuneJob.objects.for_tenant(world.tenant).get().hyperparameters["beta"] == 10.0


def test_a_file_of_the_other_format_is_an_error_on_its_field(world, files):
    dev = signed_in(world.developer)
    cases = [
        ({"method": "supervised", "beta": ""}, "training_file", "method type 'dpo'"),  # preference data, supervised
        ({"training_file": files["chat"].id}, "training_file", "preference data"),
        ({"validation_file": files["chat"].id}, "validation_file", "preference data"),
    ]
    for changes, field, words in cases:
        for extra in ({}, {"estimate": "1"}):
            response = dev.post(NEW_JOB, dpo_form(files, **changes, **extra))
            assert response.status_code == 400
            errors = response.context["form"].errors
            assert list(errors) == [field] and words in errors[field][0], (changes, errors)
    assert not FineTuneJob.all_tenants.exists()


def test_beta_on_a_supervised_job_is_an_error_on_its_field(world, files):
    response = signed_in(world.developer).post(NEW_JOB, dpo_form(files, method="supervised", beta="0.5",
                                                                  training_file=files["chat"].id))
    assert response.status_code == 400 and list(response.context["form"].errors) == ["beta"]
    assert "preference (DPO) jobs" in response.context["form"].errors["beta"][0]
    assert not FineTuneJob.all_tenants.exists()
    # the supervised form without a method (as before) still creates a supervised job
    created = signed_in(world.developer).post(NEW_JOB, {k: v for k, v in dpo_form(files, training_file=files["chat"].id).items()
                                                          if k not in ("method", "beta")})
    assert created.status_code == 302 and FineTuneJob.objects.for_tenant(world.tenant).get().method == "supervised"


def test_the_preferred_answer_weight_is_a_dpo_setting_of_the_form(world, files):
    dev = signed_in(world.developer)
    response = dev.post(NEW_JOB, dpo_form(files, method="supervised", sft_weight="1", training_file=files["chat"].id))
    assert response.status_code == 400 and list(response.context["form"].errors) == ["sft_weight"]
    assert "preference (DPO) jobs" in response.context["form"].errors["sft_weight"][0]
    response = dev.post(NEW_JOB, dpo_form(files, sft_weight="20"))  # the API's limit, on its field
    assert response.status_code == 400 and list(response.context["form"].errors) == ["sft_weight"]
    assert not FineTuneJob.all_tenants.exists()
    assert dev.post(NEW_JOB, dpo_form(files, sft_weight="0.5")).status_code == 302
    assert FineTuneJob.objects.for_tenant(world.tenant).get().hyperparameters["sft_weight"] == 0.5


def test_the_preview_of_a_preference_file_prices_both_conversations_tokens(world, files, base_model, tiny_tokenizer):
    response = signed_in(world.developer).post(NEW_JOB, dpo_form(files, beta="0.3", estimate="1"))
    assert response.status_code == 200 and not FineTuneJob.all_tenants.exists()
    estimate = response.context["estimate"]
    # as the validator counts them: each pair's input with its preferred, and with its non-preferred, answer
    examples = validate_jsonl(preference_dataset(12), filename="p.jsonl", min_examples=1).examples
    both = sum(len(tokenize_chat_example(tiny_tokenizer, side)[0]) for ex in examples for side in preference_pair(ex))
    one = sum(len(tokenize_chat_example(tiny_tokenizer, preference_pair(ex)[0])[0]) for ex in examples)
    assert estimate["tokens"]["total_tokens"] == both > one and estimate["tokens"]["estimated"] is False
    assert estimate["trained_tokens"] == 2 * both
    price = planning.training_price_cents_per_million(base_model)
    assert estimate["estimated_cost_cents"] == estimate_cost_cents(both, 2, price) > 0
    assert estimate["hyperparameters"]["beta"] == 0.3 and estimate["method"] == "dpo"
    page = response.content.decode()
    assert f"{both} tokens (each pair twice" in page and "preference tuning (DPO), beta 0.3" in page


def test_an_outsider_gets_404_a_viewer_is_refused_and_another_tenants_file_is_not_a_choice(world, files):
    assert signed_in(world.outsider).get(NEW_JOB).status_code == 404
    assert signed_in(world.outsider).post(NEW_JOB, dpo_form(files)).status_code == 404
    viewer = signed_in(world.viewer)
    assert viewer.post(NEW_JOB, dpo_form(files)).status_code == 403
    for field in ("training_file", "validation_file"):
        response = signed_in(world.developer).post(NEW_JOB, dpo_form(files, **{field: files["foreign"].id}))
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == [field] and "not one of the available choices" in errors[field][0]
    assert not FineTuneJob.all_tenants.exists()


# ---- DPO's "auto" learning rate ------------------------------------------------------------------


def test_dpo_auto_learning_rate_multiplier_is_a_third_of_the_supervised_one():
    from finetune.services import DPO_AUTO_SFT_WEIGHT, resolve_hyperparameters

    # the demo model's 40 pairs (docs/finetuning.md): 3 epochs of batches of 8 = 15 steps; supervised sqrt(1000/15)
    assert resolve_hyperparameters({}, 40) == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 8.16}
    assert resolve_hyperparameters({}, 40, "dpo") == {"beta": 0.1, "sft_weight": DPO_AUTO_SFT_WEIGHT, "n_epochs": 3,
                                                      "batch_size": 8, "learning_rate_multiplier": 2.72}
    # a long job: the supervised floor of 1 becomes 0.33
    assert resolve_hyperparameters({"n_epochs": 1, "batch_size": 1}, 5000, "dpo")["learning_rate_multiplier"] == 0.33
    # a number asked for is kept as it is, for either method
    assert resolve_hyperparameters({"learning_rate_multiplier": 8.16}, 40, "dpo")["learning_rate_multiplier"] == 8.16


def test_a_dpo_job_from_the_form_gets_the_dpo_auto_learning_rate(world, files):
    signed_in(world.developer).post(NEW_JOB, dpo_form(files, n_epochs="3", batch_size="4"))
    job = FineTuneJob.objects.for_tenant(world.tenant).get()
    steps = 3 * 3  # 12 pairs in batches of 4, 3 epochs
    assert job.hyperparameters["learning_rate_multiplier"] == round(planning.auto_learning_rate_multiplier(steps) / 3, 2)
    assert job.hyperparameters["learning_rate_multiplier"] == 3.33  # sqrt(1000 / 9) = 10.5, capped at 10, ÷ 3
