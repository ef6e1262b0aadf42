"""Console pages of fine-tuning: the new-job form's validation file (tenant-scoped choices, field errors)."""

from __future__ import annotations

import re

import pytest

from finetune.models import FineTuneJob, TrainingFile
from tenants.services import Actor
from tests.support.finetune import signed_in, upload_file, zebra_dataset

NEW_JOB = "/t/acme/finetune/jobs/new/"


def upload(tenant, user, data: bytes, name: str, base_model=None) -> TrainingFile:
    return upload_file(tenant, Actor(user=user), data, name, base_model)


@pytest.fixture
def files(world, base_model):
    """acme: a training and a validation file, a file with problems and one of another purpose; globex: a valid file."""
    return {
        "train": upload(world.tenant, world.owner, zebra_dataset(20), "train.jsonl", base_model),
        "valid": upload(world.tenant, world.owner, zebra_dataset(10), "valid.jsonl", base_model),
        "broken": upload(world.tenant, world.owner, b"not json\n", "broken.jsonl"),
        "assistants": TrainingFile.all_tenants.create(tenant=world.tenant, filename="a.jsonl", purpose="assistants",
                                                      path="x", status=TrainingFile.Status.PROCESSED),
        "foreign": upload(world.other_tenant, world.outsider, zebra_dataset(10), "theirs.jsonl", base_model),
    }


def job_form(**changes) -> dict:
    return {"model": "tiny-chat", "n_epochs": "1", "batch_size": "auto", "learning_rate_multiplier": "auto",
            "suffix": "v", "lora_rank": "8", **changes}


def test_form_offers_only_this_tenants_valid_fine_tune_files(world, files):
    response = signed_in(world.developer).get(NEW_JOB)
    assert response.status_code == 200
    fields = response.context["form"].fields
    own = [files["valid"].id, files["train"].id]  # newest first
    assert [value for value, _ in fields["validation_file"].choices] == ["", *own]
    assert [value for value, _ in fields["training_file"].choices] == own
    page = response.content.decode()
    assert 'name="validation_file"' in page
    for other in ("broken", "assistants", "foreign"):
        assert files[other].id not in page


@pytest.mark.parametrize("field", ["validation_file", "training_file"])
def test_another_tenants_file_posted_by_hand_is_a_field_error(world, files, field):
    chosen = {"training_file": files["train"].id, field: files["foreign"].id}
    for extra in ({}, {"estimate": "1"}):
        response = signed_in(world.developer).post(NEW_JOB, job_form(**chosen, **extra))
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == [field] and "not one of the available choices" in errors[field][0]
    assert not FineTuneJob.all_tenants.exists()


def test_a_file_with_problems_cannot_be_the_validation_file(world, files):
    response = signed_in(world.developer).post(NEW_JOB, job_form(training_file=files["train"].id,
                                                                 validation_file=files["broken"].id))
    assert response.status_code == 400 and list(response.context["form"].errors) == ["validation_file"]
    assert not FineTuneJob.all_tenants.exists()


def test_the_training_file_cannot_also_be_the_validation_file(world, files):
    same = files["train"].id
    for extra in ({}, {"estimate": "1"}):
        response = signed_in(world.developer).post(NEW_JOB, job_form(training_file=same, validation_file=same, **extra))
        assert response.status_code == 400
        errors = response.context["form"].errors
        assert list(errors) == ["validation_file"]
        assert "cannot be both the training and the validation file" in errors["validation_file"][0]
        assert "cannot be both" in response.content.decode()
    assert not FineTuneJob.all_tenants.exists()


def test_a_job_created_with_a_validation_file_records_and_shows_it(world, files):
    dev = signed_in(world.developer)
    response = dev.post(NEW_JOB, job_form(training_file=files["train"].id, validation_file=files["valid"].id))
    job = FineTuneJob.objects.for_tenant(world.tenant).get()
    assert response.status_code == 302 and response["Location"] == f"/t/acme/finetune/jobs/{job.id}/"
    assert (job.training_file_id, job.validation_file_id) == (files["train"].id, files["valid"].id)
    page = dev.get(response["Location"]).content.decode()
    assert f'href="/t/acme/finetune/files/{files["valid"].id}/" id="ft-validation-file"' in page


def test_without_a_validation_file_the_job_has_none(world, files):
    dev = signed_in(world.developer)
    response = dev.post(NEW_JOB, job_form(training_file=files["train"].id, validation_file=""))
    job = FineTuneJob.objects.for_tenant(world.tenant).get()
    assert response.status_code == 302 and job.validation_file_id is None
    assert "ft-validation-file" not in dev.get(response["Location"]).content.decode()


def test_admins_turn_automatic_deployment_of_fine_tuned_models_off_and_on(world, base_model):
    from serving.models import ModelConfig
    from tenants.models import AuditEvent

    url = "/t/acme/models/"
    admin = signed_in(world.admin)
    page = admin.get(url).content.decode()
    assert "Deploy fine-tuned models when their job succeeds" in page and 'name="auto_deploy_finetuned"' in page
    assert re.search(r"<input type=\"checkbox\" name=\"auto_deploy_finetuned\"[^>]* checked", page)  # on by default
    settings = {"default_model": "", "default_max_tokens": 256, "max_max_tokens": 4096, "default_temperature": "0.7",
                "max_temperature": "2", "system_message_rule": "keep", "redact_patterns": "", "blocked_terms": ""}
    assert admin.post(url, settings).status_code == 302  # an unticked box is not posted: off
    assert ModelConfig.objects.for_tenant(world.tenant).get().auto_deploy_finetuned is False
    assert admin.post(url, {**settings, "auto_deploy_finetuned": "on"}).status_code == 302
    assert ModelConfig.objects.for_tenant(world.tenant).get().auto_deploy_finetuned is True
    assert AuditEvent.objects.for_tenant(world.tenant).filter(action="model_config.updated").count() == 2
    viewer = signed_in(world.viewer)
    assert viewer.post(url, settings).status_code == 403
    assert ModelConfig.objects.for_tenant(world.tenant).get().auto_deploy_finetuned is True


def test_a_blank_rank_is_the_highest_the_pools_serve_up_to_16(world, files, base_model):
    from serving.models import BackendPool

    BackendPool.objects.create(name="vllm-small", base_model=base_model, kind="vllm", max_lora_rank=8)
    response = signed_in(world.developer).post(NEW_JOB, job_form(training_file=files["train"].id, lora_rank=""))
    assert response.status_code == 302
    assert FineTuneJob.objects.for_tenant(world.tenant).get().lora["rank"] == 8
