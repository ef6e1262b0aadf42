"""Merged models for isolated tenants: a LoRA adapter folded into its base weights (peft's `merge_and_unload`) and
exported as a model folder that a tenant's dedicated pool serves as its model, at base-model speed (no LoRA).

Two halves, as the rest of fine-tuning:
- `merge_adapter` (torch, peft and transformers, imported inside it: only a worker runs it) writes the folder:
  `model.safetensors` (or shards) + `config.json` + `generation_config.json` + the base model's tokenizer files +
  `platform_model.json` (the served name, so `python -m devbackend --model <folder>` serves it under that name).
- the service (Django): `merged_model_request` (a tenant admin asks; refusals below), the worker's
  `merged_model_build` (Celery: `finetune.tasks.merge_adapter`), and staff's `merged_model_serve` (after restarting
  the dedicated pool's backends on the folder: every enabled backend must list the served name at /v1/models).

Routing (serving.routing.routes_for): a merged model that serves routes the adapter's own model name to its dedicated
pool, with the merged folder as the backend's model and no adapter; while it serves, that pool answers nothing else
(its backends run the merged weights). docs/finetuning.md, "Merged models".
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "platform_model.json"  # devbackend.tinymodel's marker: `model_id` is the name the dev backend serves
# The base model's files the merged folder carries unchanged (tokenizer and chat template, generation defaults).
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


class MergeError(Exception):
    """The adapter cannot be merged into these weights (wrong base, missing files, NaN after merging)."""


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    parameters: int  # every weight of the merged model (as the base model's: LoRA adds none once merged)
    size_bytes: int  # the folder on disk
    weights_bytes: int  # the .safetensors files alone
    dtype: str  # the weights' dtype as saved (the base model's)


def _stored_dtype(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")


def merge_adapter(*, base_model_path: str | Path, adapter_dir: str | Path, output_dir: str | Path,
                  served_name: str, device: str | None = None) -> MergeResult:
    """Fold the LoRA in `adapter_dir` into the base model at `base_model_path` and write the merged model to
    `output_dir` (created whole or not at all: written to a sibling temporary folder, renamed last).

    The merge is computed in float32 (W + B·A·alpha/r, peft's `merge_and_unload(safe_merge=True)`, which refuses a
    result with NaNs) and saved in the base model's own dtype, so the folder is the base model's size. Embeddings and
    the output head are the base's (LoRA never touches them here); the tokenizer files are copied byte for byte.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model_path, adapter_dir, output_dir = Path(base_model_path), Path(adapter_dir), Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"no adapter_config.json in {adapter_dir}")
    if not (base_model_path / "config.json").is_file():
        raise MergeError(f"no base model weights in {base_model_path}")
    if output_dir.exists():
        raise MergeError(f"{output_dir} exists already")
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.float32)
    dtype = _stored_dtype(base.config)
    if device:
        base = base.to(device)
    try:
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload(safe_merge=True)
    except ValueError as exc:  # peft: NaNs in the merged weights; shapes that do not fit
        raise MergeError(f"the adapter cannot be merged into {base_model_path.name}: {exc}") from exc
    except RuntimeError as exc:  # a LoRA of another model's shapes
        raise MergeError(f"the adapter does not fit {base_model_path.name}'s weights: {str(exc)[:300]}") from exc
    merged = merged.to(device="cpu", dtype=getattr(torch, dtype))
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        for name in CARRIED_FILES:
            if (base_model_path / name).is_file():
                shutil.copyfile(base_model_path / name, staging / name)
        (staging / MARKER).write_text(json.dumps({
            "model_id": served_name, "merged_from": {"base_model": str(base_model_path.name),
                                                     "adapter": str(adapter_dir.name)}}, indent=2, sort_keys=True) + "\n")
        for file in staging.iterdir():
            file.chmod(0o644)  # safetensors writes 0600; the backends may run as another user
        staging.chmod(0o755)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    weights = sum(f.stat().st_size for f in output_dir.glob("*.safetensors"))
    return MergeResult(output_dir=output_dir, parameters=sum(p.numel() for p in merged.parameters()),
                       size_bytes=sum(f.stat().st_size for f in output_dir.iterdir() if f.is_file()),
                       weights_bytes=weights, dtype=dtype)


def new_token() -> str:
    return secrets.token_hex(8)


# ---- the service: request, build on a worker, serve ---------------------------------------------------------------


class MergeRefused(Exception):
    """A merge the platform will not do, with the HTTP status and the stable code the API answers."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def dedicated_pool_for(tenant, base_model):
    """The tenant's dedicated pool for `base_model` that a merged model of it is served on (pools with enabled
    backends first, then by name: serving.routing.pool_choice, the rule routing applies), or a MergeRefused saying why
    there is none."""
    from django.db.models import Count, Q

    from serving.models import BackendPool
    from serving.routing import pool_choice

    dedicated = list(BackendPool.objects.dedicated_to(tenant).select_related("base_model")
                     .annotate(enabled_backends=Count("backends", filter=Q(backends__enabled=True))).order_by("name"))
    if not dedicated:
        raise MergeRefused(409, "no_dedicated_pool",
                           "Merged models are served on a pool dedicated to your account (isolated tenancy), and this "
                           "account has none; its fine-tuned models are served as LoRA adapters. Ask the platform team "
                           "for a dedicated pool.")
    fitting = [p for p in dedicated if p.base_model_id == base_model.pk]
    if not fitting:
        served = ", ".join(sorted({f"{p.name} ({p.base_model.name})" for p in dedicated}))
        raise MergeRefused(409, "base_model_not_served",
                           f"Your dedicated pools serve other base models ({served}), not {base_model.name}: a merged "
                           f"model runs on a pool of the base model it was merged into.")
    return pool_choice(fitting, tenant_id=tenant.pk)


def merged_model_request(*, tenant, adapter, actor):
    """A tenant admin asks for `adapter` merged for its dedicated pool: the row (`queued`, audited
    `finetune.merge_requested`) and the worker's task once the transaction commits. Asking again is idempotent (a queued
    one is sent to the workers again, in case the broker lost it: the worker's claim runs it once); a failed merge is
    tried again. Refusals (MergeRefused): no dedicated pool (409 `no_dedicated_pool`), none of the adapter's
    base model (409 `base_model_not_served`), the base model's weights not on the workers (409 `base_weights_missing`).
    Callers look the adapter up in the tenant (another tenant's is their 404)."""
    from django.db import transaction

    from common.queue import enqueue_on_commit
    from serving.models import MergedModel
    from tenants.services import audit_record

    if adapter.tenant_id != tenant.pk:
        raise ValueError(f"adapter {adapter.pk} is not tenant {tenant.pk}'s")
    pool = dedicated_pool_for(tenant, adapter.base_model)
    if not adapter.base_model.local_path:
        raise MergeRefused(409, "base_weights_missing",
                           f"{adapter.base_model.name}'s weights are not on the platform's workers, so it cannot be merged "
                           "into; ask the platform team.")
    with transaction.atomic():
        merged, created = MergedModel.objects.for_tenant(tenant).select_for_update().get_or_create(adapter=adapter, pool=pool)
        if not created and (merged.state == MergedModel.State.QUEUED or merge_lease_lost(merged)):
            enqueue_on_commit("finetune.tasks.merge_adapter", merged.pk, tenant.pk, robust=True)
        if not created and merged.state != MergedModel.State.FAILED:
            return merged  # queued, merging, ready or serving: nothing to do again
        merged.state, merged.error, merged.finished_at = MergedModel.State.QUEUED, "", None
        merged.save(update_fields=["state", "error", "finished_at"])
        audit_record(tenant=tenant, actor=actor, action="finetune.merge_requested", target=adapter,
                     data={"adapter": adapter.name, "pool": pool.name, "merged_model": merged.pk})
        enqueue_on_commit("finetune.tasks.merge_adapter", merged.pk, tenant.pk, robust=True)
    return merged


def merged_folder_remove_on_delete(sender, instance, **kwargs) -> None:
    """post_delete of a MergedModel (staff's delete in the admin, or its adapter's, pool's or tenant's cascade): its
    folder is removed once the deletion commits (a rolled-back delete keeps it). Only a folder inside the tenant's
    own merged storage is touched; a row naming another path keeps that path, with a warning. Connected in
    finetune.apps."""
    from django.db import transaction

    from finetune.storage import tenant_storage_dir

    if not instance.path:
        return  # never merged, or still merging (that worker removes its own folder when its row is gone)
    folder = Path(instance.path)
    if not folder.resolve().is_relative_to((tenant_storage_dir(instance.tenant_id) / "merged").resolve()):
        log.warning("merged model %s deleted; its folder %s is outside the tenant's storage and is left in place",
                    instance.pk, folder)
        return
    transaction.on_commit(lambda: shutil.rmtree(folder, ignore_errors=True), robust=True)


def merged_folder(merged) -> Path:
    from finetune.storage import tenant_storage_dir

    return tenant_storage_dir(merged.tenant_id) / "merged" / f"{merged.pk}-{new_token()}"


def merge_lease_lost(merged) -> bool:
    """Whether a `merging` row's worker stopped saying it is alive for LEASE_SECONDS (it died mid-merge)."""
    from django.utils import timezone

    from finetune.models import LEASE_SECONDS

    return merged.state == "merging" and (merged.worker_heartbeat_at is None or
                                          merged.worker_heartbeat_at < timezone.now() - timedelta(seconds=LEASE_SECONDS))


def merged_stale() -> list[tuple[int, int]]:
    """(merged model id, tenant id) of merges whose worker died (no heartbeat for LEASE_SECONDS): the periodic sweep
    (`finetune.tasks.requeue_stale_merges`) sends them again, and the next worker's claim takes them over."""
    from django.utils import timezone

    from serving.models import MergedModel

    # all_tenants: a sweep over every tenant's merges, returning ids only.
    return list(MergedModel.all_tenants.filter(_lease_expired(timezone.now())).values_list("id", "tenant_id"))


def _lease_expired(now):
    """The rows `merging` under a lease its worker let expire (or never renewed): what the sweep sends again and a
    worker's claim may take over."""
    from django.db.models import Q

    from finetune.models import LEASE_SECONDS
    from serving.models import MergedModel

    return Q(Q(worker_heartbeat_at__lt=now - timedelta(seconds=LEASE_SECONDS)) | Q(worker_heartbeat_at__isnull=True),
             state=MergedModel.State.MERGING)


class _Heartbeat:
    """While a merge runs (one long torch call), a thread renews the row's lease every LEASE_SECONDS / 4."""

    def __init__(self, rows, merged_id: int, worker_id: str):
        import threading

        self.rows, self.merged_id, self.worker_id = rows, merged_id, worker_id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"merge-lease-{merged_id}", daemon=True)

    def _run(self) -> None:
        from django.db import connection
        from django.utils import timezone

        from finetune.models import LEASE_SECONDS

        try:
            while not self.stop.wait(max(0.2, LEASE_SECONDS / 4)):
                try:
                    self.rows.filter(pk=self.merged_id, state="merging", worker_id=self.worker_id).update(
                        worker_heartbeat_at=timezone.now())
                except Exception:  # noqa: BLE001 - a database hiccup: the next beat tries again
                    log.warning("merge %s: could not renew its lease", self.merged_id, exc_info=True)
        finally:
            connection.close()  # this thread's own connection

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def merged_model_build(*, merged_id: int, tenant_id: int) -> str:
    """The worker (Celery `finetune.tasks.merge_adapter`, queue `finetune`, where the weights are): claim the row (queued,
    or merging under a lease its worker let expire), merge while a thread renews the lease, record the folder and its
    size (`ready`, audited `finetune.merge_ready`) or why not (`failed`). 'ready' | 'failed' | 'leased' (another live
    worker merges it) | 'lost' (this worker's lease was taken over meanwhile: its folder is removed) | 'gone'."""
    from django.db import transaction
    from django.db.models import Q
    from django.utils import timezone

    from serving.models import MergedModel
    from tenants.services import SYSTEM, audit_record

    rows = MergedModel.objects.for_tenant(tenant_id)
    worker_id = f"merge-{secrets.token_hex(6)}"
    now = timezone.now()
    claimed = rows.filter(Q(state=MergedModel.State.QUEUED) | _lease_expired(now), pk=merged_id).update(
        state=MergedModel.State.MERGING, worker_id=worker_id, worker_heartbeat_at=now)
    if not claimed:
        # done, or deleted; or another worker holds a live lease on it
        return "leased" if rows.filter(pk=merged_id, state=MergedModel.State.MERGING).exists() else "gone"
    mine = rows.filter(pk=merged_id, state=MergedModel.State.MERGING, worker_id=worker_id)
    merged = rows.select_related("adapter__base_model", "pool", "tenant").get(pk=merged_id)
    folder = merged_folder(merged)
    try:
        with _Heartbeat(rows, merged_id, worker_id):
            result = merge_adapter(base_model_path=merged.adapter.base_model.local_path, adapter_dir=merged.adapter.path,
                                   output_dir=folder, served_name=merged.served_name)
    except (MergeError, OSError) as exc:
        log.warning("merging %s failed: %s", merged.adapter.name, exc)
        mine.update(state=MergedModel.State.FAILED, error=str(exc)[:300], finished_at=timezone.now())
        return "failed"
    except Exception as exc:  # noqa: BLE001 - torch, peft: failed, in words, rather than retried by every sweep
        log.exception("merging %s failed unexpectedly", merged.adapter.name)
        shutil.rmtree(folder, ignore_errors=True)
        mine.update(state=MergedModel.State.FAILED, finished_at=timezone.now(),
                    error=f"The merge failed unexpectedly ({exc.__class__.__name__}: {exc}); ask again, and if it "
                          f"fails again tell the platform team."[:300])
        return "failed"
    with transaction.atomic():
        done = mine.update(
            state=MergedModel.State.READY, path=str(result.output_dir.resolve()), parameters=result.parameters,
            size_bytes=result.size_bytes, weights_bytes=result.weights_bytes, dtype=result.dtype, finished_at=timezone.now())
        if done:
            audit_record(tenant=merged.tenant, actor=SYSTEM, action="finetune.merge_ready", target=merged.adapter,
                         data={"adapter": merged.adapter.name, "pool": merged.pool.name, "size_bytes": result.size_bytes})
    if not done:
        shutil.rmtree(folder, ignore_errors=True)
        return "lost" if rows.filter(pk=merged_id).exists() else "gone"
    return "ready"


def _backends_lacking(merged) -> list[str]:
    """The enabled backends of the merged model's pool that do not list its served name at /v1/models (not restarted on
    it yet), each as 'url (what it serves)'."""
    from finetune.deploy import _served_models

    lacking = []
    for backend in merged.pool.backends.filter(enabled=True).order_by("id"):
        served = _served_models(backend.url)
        if served is None or merged.served_name not in served:
            lacking.append(f"{backend.url} ({', '.join(sorted(served)) if served else 'no answer'})")
    return lacking


def merged_model_serve(*, merged, actor):
    """Staff, once the dedicated pool's backends run the merged folder (`vllm serve <path> --served-model-name <adapter
    name>`, `python -m devbackend --model <path>`): route the adapter's name to it. Every enabled backend of the pool
    must list the served name at /v1/models (MergeRefused 409 `backends_not_restarted` otherwise, naming them). The
    pool's other serving merged model, if any, goes back to `ready`. Audited `finetune.merge_serving`."""
    from django.db import transaction
    from django.utils import timezone

    from serving.models import MergedModel
    from tenants.services import audit_record

    if merged.state not in (MergedModel.State.READY, MergedModel.State.SERVING):
        raise MergeRefused(409, "merge_not_ready", f"{merged.adapter.name} is {merged.get_state_display().lower()}, not merged yet.")
    if merged.pool.dedicated_tenant_id != merged.tenant_id:
        raise MergeRefused(409, "no_dedicated_pool", f"The {merged.pool.name} pool is no longer dedicated to {merged.tenant}.")
    if not merged.pool.backends.filter(enabled=True).exists():
        raise MergeRefused(409, "backends_not_restarted", f"The {merged.pool.name} pool has no enabled backend to serve it.")
    lacking = _backends_lacking(merged)
    if lacking:
        raise MergeRefused(409, "backends_not_restarted",
                           f"Restart these backends of {merged.pool.name} on {merged.path} as {merged.served_name} first: "
                           + "; ".join(lacking))
    with transaction.atomic():
        MergedModel.objects.for_tenant(merged.tenant_id).filter(pool=merged.pool, state=MergedModel.State.SERVING).exclude(pk=merged.pk).update(
            state=MergedModel.State.READY, serving_since=None)
        merged.state, merged.serving_since = MergedModel.State.SERVING, timezone.now()
        merged.save(update_fields=["state", "serving_since"])
        audit_record(tenant=merged.tenant, actor=actor, action="finetune.merge_serving", target=merged.adapter,
                     data={"adapter": merged.adapter.name, "pool": merged.pool.name, "path": merged.path})
    return merged


def merged_model_stop(*, merged, actor):
    """Staff, before restarting the pool's backends on the base model again: the adapter's name goes back to its LoRA
    deployment (if any) and the pool to the base model. Audited `finetune.merge_stopped`."""
    from django.db import transaction

    from serving.models import MergedModel
    from tenants.services import audit_record

    with transaction.atomic():
        if MergedModel.objects.for_tenant(merged.tenant_id).filter(pk=merged.pk, state=MergedModel.State.SERVING).update(
                state=MergedModel.State.READY, serving_since=None):
            audit_record(tenant=merged.tenant, actor=actor, action="finetune.merge_stopped", target=merged.adapter,
                         data={"adapter": merged.adapter.name, "pool": merged.pool.name})
    merged.refresh_from_db()
    return merged
