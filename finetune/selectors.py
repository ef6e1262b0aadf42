"""Reads of a tenant's fine-tuning jobs and files: a file's token counts (as a worker counted them, or estimated),
the active job count, a job's loss series."""

from __future__ import annotations

import math

from finetune.models import FineTuneJob, TrainingFile
from serving.models import BaseModel


def file_token_counts(file: TrainingFile, base_model: BaseModel) -> dict | None:
    """Tokens of a file with a base model's chat template, as a worker counted them: {total_tokens, trainable_tokens,
    examples, estimated, min_tokens, max_tokens, problems}; None until counted (services.training_file_request_token_count
    asks a worker; nothing is tokenized in a request)."""
    return file.token_counts.get(base_model.name) or None


def estimated_token_counts(file: TrainingFile) -> dict:
    """Tokens of a file estimated from its size (4 bytes a token), until a worker has counted them, and so marked."""
    return {"total_tokens": math.ceil(file.bytes / 4), "trainable_tokens": None, "examples": file.examples,
            "estimated": True, "min_tokens": None, "max_tokens": None, "problems": []}


def active_job_count(tenant) -> int:
    return FineTuneJob.objects.for_tenant(tenant).filter(status__in=FineTuneJob.ACTIVE_STATUSES).count()


# A DPO job's metrics events also carry these (finetune/dpo.py); the job page charts them.
DPO_SERIES = ("train_reward_margin", "train_reward_accuracy", "train_chosen_reward", "train_rejected_reward",
              "valid_reward_margin", "valid_reward_accuracy")


def loss_series(job: FineTuneJob) -> list[dict]:
    """Metrics events in step order, for the loss chart: [{step, train_loss, valid_loss}], and for a DPO job its
    rewards (DPO_SERIES) too."""
    rows = job.events.filter(type="metrics").order_by("id").values_list("data", flat=True)
    extra = DPO_SERIES if job.method == "dpo" else ()
    return [{"step": d.get("step"), "train_loss": d.get("train_loss"), "valid_loss": d.get("valid_loss"),
             **{k: d.get(k) for k in extra}}
            for d in rows if d.get("step") is not None]
