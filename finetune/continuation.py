"""Continue from an adapter: a job that starts from one of the tenant's adapters or checkpoints instead of a fresh LoRA.

The job names where it starts in `from_checkpoint` (a platform extension beside OpenAI's job fields; Together's name
for it): a fine-tuned model name (`ft:…`, trained here or uploaded, finetune/byo.py), a checkpoint as OpenAI lists it
(`ftckpt-…`, or its `fine_tuned_model_checkpoint` name `ft:…:ckpt-step-N`), or a job id (`ftjob-…`: its adapter).
It must be of the job's base model, and the new LoRA keeps its rank and target modules (the weights are loaded into
the same shapes); alpha defaults to its. What it starts from is recorded in the job's `lora` as `init_from` (the name
the tenant gave; the worker looks it up again in the job's tenant, so no storage path is shown); the trainer loads
those weights before the first step (a re-claimed job resumes from its own checkpoint instead).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from finetune import lora_math, public_ids
from finetune.models import FineTuneJob, JobCheckpoint
from finetune.errors import FinetuneError
from serving.models import Adapter, BaseModel

PARAM = "from_checkpoint"
CHECKPOINT_NAME = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>\d{1,9})$")


@dataclass(frozen=True)
class StartPoint:
    """Weights a job starts from: a folder with adapter_config.json and adapter_model.safetensors."""

    ref: str  # what the tenant named
    path: str
    base_model_id: int
    rank: int
    alpha: int
    target_modules: list[str]


def _not_found(value) -> FinetuneError:
    return FinetuneError(f"No such adapter or checkpoint: {value}. Name one of your fine-tuned models (ft:…), a "
                         "checkpoint (ftckpt-…, as GET /v1/fine_tuning/jobs/{id}/checkpoints lists them) or a job "
                         "(ftjob-…).", status=404, param=PARAM, code="checkpoint_not_found")


def _from_folder(ref: str, folder: str, base_model_id: int) -> StartPoint:
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise FinetuneError(f"The weights of {ref} are no longer stored, so no job can start from them.", param=PARAM,
                            code="checkpoint_not_found") from None
    return StartPoint(ref=ref, path=folder, base_model_id=base_model_id, rank=int(config["r"]),
                      alpha=int(round(config["lora_alpha"])), target_modules=sorted(config["target_modules"]))


def _checkpoint_start(ref: str, checkpoint: JobCheckpoint | None) -> StartPoint:
    if checkpoint is None:
        raise _not_found(ref)
    return _from_folder(ref, checkpoint.path, checkpoint.job.base_model_id)


def start_point_for(tenant, value) -> StartPoint:
    """The tenant's adapter or checkpoint that `value` names (module docstring); 404 `checkpoint_not_found` for one
    that is not the tenant's, exactly as for one that does not exist."""
    if not isinstance(value, str) or not value:
        raise FinetuneError(f"{PARAM} must be the name of a fine-tuned model, a checkpoint id or a job id", param=PARAM)
    checkpoints = JobCheckpoint.objects.for_tenant(tenant).select_related("job")
    if value.startswith(f"{JobCheckpoint.PUBLIC_ID_PREFIX}-"):
        pk = public_ids.decode(JobCheckpoint.PUBLIC_ID_PREFIX, value)
        return _checkpoint_start(value, checkpoints.filter(pk=pk).first() if pk else None)
    if value.startswith("ftjob-"):
        job = FineTuneJob.objects.for_tenant(tenant).select_related("adapter").filter(pk=value).first()
        if job is None or job.adapter is None:
            raise _not_found(value) if job is None else FinetuneError(
                f"Job {value} has no fine-tuned model ({job.status}); name one of its checkpoints instead.",
                param=PARAM, code="checkpoint_not_found")
        value = job.adapter.name
    named = CHECKPOINT_NAME.match(value)
    if named:
        job = FineTuneJob.objects.for_tenant(tenant).filter(fine_tuned_model=named["model"]).first()
        return _checkpoint_start(value, checkpoints.filter(job=job, step=int(named["step"])).first() if job else None)
    adapter = Adapter.objects.for_tenant(tenant).filter(name=value).first()
    if adapter is None:
        raise _not_found(value)
    # The row was written from the adapter's own config (a job's, or a checked upload's): no need to read the disk here.
    return StartPoint(ref=value, path=adapter.path, base_model_id=adapter.base_model_id, rank=adapter.rank,
                      alpha=adapter.alpha, target_modules=sorted(adapter.target_modules))


def lora_request(start: StartPoint, requested: dict | None, *, base_model: BaseModel) -> dict:
    """The job's requested `lora` when it starts from `start`: its rank and target modules (a request for others is
    refused), alpha as requested or its; the caller checks it as any job's (services.resolve_lora)."""
    if start.base_model_id != base_model.pk:
        theirs = BaseModel.objects.filter(pk=start.base_model_id).values_list("name", flat=True).first()
        raise FinetuneError(f"{start.ref} is an adapter of {theirs}, not of {base_model.name}: a job continues from an "
                            "adapter of its own base model.", param=PARAM, code="base_model_mismatch")
    requested = dict(requested or {})
    if requested.get("rank") not in (None, start.rank):
        raise FinetuneError(f"lora.rank {requested['rank']} differs from the rank of {start.ref} ({start.rank}): a job "
                            "continues with the rank of the adapter it starts from.", param="lora.rank",
                            code="invalid_lora")
    targets = requested.get("target_modules")
    try:
        targets = sorted(lora_math.resolve_targets(targets)) if targets is not None else None
    except (TypeError, ValueError) as exc:
        raise FinetuneError(str(exc), param="target_modules", code="invalid_lora") from None
    if targets is not None and targets != start.target_modules:
        raise FinetuneError(f"lora.target_modules differ from those of {start.ref} ({', '.join(start.target_modules)}): "
                            "a job continues with the modules of the adapter it starts from.",
                            param="target_modules", code="invalid_lora")
    return {**requested, "rank": start.rank, "target_modules": start.target_modules,
            "alpha": requested.get("alpha") or start.alpha}


def start_path_for_job(job: FineTuneJob) -> str | None:
    """The folder the worker loads the job's first weights from (what its `init_from` names, looked up again in the
    job's tenant), or None for a fresh LoRA. FinetuneError when those weights are gone: the job fails saying so rather
    than training from scratch."""
    ref = (job.lora or {}).get("init_from")
    if not ref:
        return None
    start = start_point_for(job.tenant_id, ref)
    if not (Path(start.path) / "adapter_model.safetensors").is_file():
        raise FinetuneError(f"The weights of {ref}, which this job starts from, are no longer stored.", param=PARAM,
                            code="checkpoint_not_found")
    return start.path


def start_choices(tenant, *, limit: int = 200) -> list[tuple[str, str]]:
    """(value, label) of what a job of the tenant may start from, for the console's menu: its adapters, then its
    checkpoints, newest first."""
    choices = [(a.name, f"{a.name} ({a.get_source_display().lower()}, rank {a.rank})")
               for a in Adapter.objects.for_tenant(tenant).order_by("-created_at")[:limit]]
    for ckpt in JobCheckpoint.objects.for_tenant(tenant).select_related("job").order_by("-created_at")[:limit]:
        choices.append((ckpt.public_id, f"{ckpt.job_id} at step {ckpt.step} (checkpoint, rank {ckpt.job.lora.get('rank')})"))
    return choices
