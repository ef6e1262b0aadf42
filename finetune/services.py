"""Writes for fine-tuning: uploading files, creating and cancelling jobs, and running a job on a worker.

Every public service takes the tenant explicitly and records its audit event. Errors a tenant can fix
are `FinetuneError`s carrying an HTTP status, a stable code and the parameter at fault: the OpenAI-style
API and the console show them as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from common.queue import enqueue_on_commit
from finetune import base_models, continuation, hub, lora_math, planning, pools, selectors, storage, system_prompts
from finetune.errors import FinetuneError  # noqa: F401 - defined in a leaf module; callers import it from here
from finetune.models import (
    LEASE_SECONDS,
    FineTuneJob,
    JobCheckpoint,
    JobEvent,
    TrainingFile,
    TrainingUsage,
)
from finetune.validation import Problem, ValidationResult, validate_stream
from serving import selectors as serving_selectors
from serving.models import Adapter, BaseModel
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record

log = logging.getLogger(__name__)

# Upload cap (bytes); a settings value may lower or raise it, the environment never does.
MAX_UPLOAD_BYTES = settings.FINETUNE_MAX_UPLOAD_BYTES
MAX_CONCURRENT_JOBS = settings.FINETUNE_MAX_CONCURRENT_JOBS  # per tenant
CANCEL_POLL_SECONDS = 1.0  # the worker reads the job's status (and renews its lease) at most this often
SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
MAX_RANK = 256
DEFAULT_RANK = 16
# After an automatic deployment the worker waits this many gateway config polls before the job says "succeeded":
# gateways reload their snapshot on a poll, and the model must be callable as soon as the job has succeeded.
GATEWAY_POLLS_BEFORE_SUCCESS = 2



# ---- files ---------------------------------------------------------------------------------------

UPLOAD_CHUNK_BYTES = 1024 * 1024  # an upload is copied to storage this much at a time
VALIDATION_PROGRESS_SECONDS = 1.0  # a validating worker writes its progress at most this often
# A token count asked for a (file, base model) is not asked again for this long (cache), unless it has been stored.
TOKEN_COUNT_PENDING_SECONDS = 600
# An upload still `uploaded` with no progress for this long lost its message (broker down at the upload, or wiped):
# the periodic sweep enqueues its validation again (a second delivery of a live one is harmless: it stores nothing).
STALE_VALIDATION_SECONDS = 600


def training_file_upload(*, tenant: Tenant, actor: Actor, filename: str, content: BinaryIO, purpose: str = "fine-tune",
                         base_model: BaseModel | None = None) -> TrainingFile:
    """Store an uploaded JSONL file under the tenant's storage and queue its validation on a worker (`validation`
    queue), after the tenant's earlier uploads (one validation per tenant at a time: training_file_validation_next).
    429 while FINETUNE_MAX_PENDING_FILES of its uploads wait (training_file_upload_check).

    `content` is a binary stream (Django's UploadedFile: spooled to a temporary file when large). It is copied in
    UPLOAD_CHUNK_BYTES chunks, counted against MAX_UPLOAD_BYTES while copying (413), and flushed to disk under the
    file's final name before the row is written in a short transaction; bytes whose row cannot be saved are removed.
    A crash in between leaves orphan bytes, never a row without its bytes. The file is `uploaded` until the worker
    has validated it: `processed`, or `error` with every problem and its line (kept so its report can be read; jobs
    refuse it). With `base_model` the worker also counts tokens with its chat template.
    """
    if purpose != "fine-tune":
        raise FinetuneError(f"purpose must be 'fine-tune', got {purpose!r}", param="purpose", code="invalid_purpose")
    training_file_upload_check(tenant=tenant)  # before copying a byte (checked again, exactly, under the lock)
    declared = getattr(content, "size", None)
    if declared is not None and declared > MAX_UPLOAD_BYTES:
        raise _too_large(declared)
    name = Path(filename or "upload.jsonl").name[:255]
    file = TrainingFile(tenant=tenant, filename=name, purpose=purpose, status=TrainingFile.Status.UPLOADED,
                        base_model=base_model)
    relative = Path("tenants") / str(tenant.pk) / "files" / f"{file.id}.jsonl"
    target = storage.storage_root() / relative
    file.bytes = _store_upload(content, target)
    file.path = str(relative)
    try:
        with transaction.atomic():
            _lock_tenant(tenant.pk)  # the pending count and the turn below, one upload of the tenant at a time
            training_file_upload_check(tenant=tenant)
            file.save(force_insert=True)
            audit_record(tenant=tenant, actor=actor, action="finetune.file_uploaded", target=file,
                         data={"id": file.id, "filename": name, "bytes": file.bytes,
                               "model": base_model.name if base_model else None})
            # Sent to a worker now unless another of the tenant's files is being validated (then when it ends).
            training_file_validation_next(tenant_id=tenant.pk)
    except BaseException:
        target.unlink(missing_ok=True)  # no row: no bytes either
        raise
    return file


def training_file_upload_check(*, tenant: Tenant) -> None:
    """Raise 429 `too_many_pending_files` while the tenant has FINETUNE_MAX_PENDING_FILES uploads not yet validated:
    its files are validated one at a time, so more would only wait (and fill storage) — the client should wait for
    one to be processed. Cheap (one count): the /v1 upload calls it before parsing the request's body."""
    limit = settings.FINETUNE_MAX_PENDING_FILES
    pending = TrainingFile.objects.for_tenant(tenant).filter(status=TrainingFile.Status.UPLOADED).count()
    if pending >= limit:
        raise FinetuneError(f"{pending:,} of this account's uploads are still waiting to be validated, the most it may "
                            f"have at once ({limit:,}): wait until one is processed (GET /v1/files/{{file_id}} says "
                            "'processed' or 'error'), then upload again.", status=429, param="file",
                            code="too_many_pending_files")


def _lock_tenant(tenant_id: int) -> None:
    """Lock the tenant's row until the transaction ends: its uploads' turns are decided one at a time. (SQLite has no
    row locks; its transactions take the database's write lock at their start here, which serialises them.)"""
    list(Tenant.objects.select_for_update().filter(pk=tenant_id).values_list("pk", flat=True))


def training_file_validation_next(*, tenant_id: int) -> str | None:
    """Send the validation of the tenant's oldest waiting upload to a worker (the `validation` queue), unless one of
    its files is being validated already (sent and not finished). So a tenant has at most one validation queued or
    running, and one tenant's backlog of large files never stands in front of another tenant's file: the queue
    takes the tenants in turn. Called when an upload is stored, when a validation ends, when a file is deleted and
    by the periodic sweep. The message goes when the transaction commits; a broker that is down is logged, not
    raised (the sweep sends it again). Returns the id of the file sent, or None."""
    with transaction.atomic():
        _lock_tenant(tenant_id)
        waiting = TrainingFile.objects.for_tenant(tenant_id).filter(status=TrainingFile.Status.UPLOADED)
        if waiting.filter(validation_queued_at__isnull=False).exists():
            return None
        file_id = waiting.order_by("created_at", "pk").values_list("pk", flat=True).first()
        if file_id is None:
            return None
        waiting.filter(pk=file_id).update(validation_queued_at=timezone.now())
        enqueue_on_commit("finetune.tasks.validate_training_file", file_id, tenant_id, robust=True)
    return file_id


def _too_large(size: int) -> FinetuneError:
    return FinetuneError(f"The file is {size:,} bytes; the limit is {MAX_UPLOAD_BYTES:,} bytes.", status=413,
                         param="file", code="file_too_large")


def _store_upload(content: BinaryIO, target: Path) -> int:
    """Copy `content` to `target` with bounded memory and durably: into a temporary name beside it, fsync'd, then
    renamed (the final name only ever holds a whole file) and the folder fsync'd. Returns the bytes copied; nothing
    is left behind when it fails (413 past MAX_UPLOAD_BYTES, 503 when storage fails)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    copied = 0
    try:
        with open(part, "wb") as out:
            while chunk := content.read(UPLOAD_CHUNK_BYTES):
                copied += len(chunk)
                if copied > MAX_UPLOAD_BYTES:
                    raise _too_large(copied)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, target)
        folder = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as exc:
        part.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
        log.exception("storing an upload at %s", target)
        raise FinetuneError(f"The file could not be stored ({exc.strerror or exc}); nothing was kept. Please try "
                            "again later.", status=503, param="file", code="storage_error") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return copied


def training_file_validate(*, file_id: str, tenant_id: int) -> str:
    """Validate an uploaded file on a worker (the `validate_training_file` task) and store the outcome once: status
    `processed` or `error`, the full report and, for the base model named at upload, its token counts; then send the
    tenant's next waiting upload (training_file_validation_next).

    The file is read line by line (memory bounded by the longest line: no example is kept) and its progress written
    about once every VALIDATION_PROGRESS_SECONDS. Idempotent: a redelivered message finds the file validated, and of
    two workers validating it at once only the first stores its result. Returns 'processed' | 'error' | 'done'
    (validated before) | 'gone' (deleted meanwhile).
    """
    outcome = _training_file_validate_once(file_id=file_id, tenant_id=tenant_id)
    training_file_validation_next(tenant_id=tenant_id)
    return outcome


def _training_file_validate_once(*, file_id: str, tenant_id: int) -> str:
    files = TrainingFile.objects.for_tenant(tenant_id)
    file = files.select_related("tenant", "base_model").filter(pk=file_id).first()
    if file is None:
        return "gone"
    if not file.is_validating:
        return "done"
    pending = files.filter(pk=file_id, status=TrainingFile.Status.UPLOADED)
    bm = file.base_model
    tokenizer = base_models.tokenizer_for(bm)
    last = time.monotonic()

    def progress(lines: int, nbytes: int) -> None:
        nonlocal last
        if time.monotonic() - last >= VALIDATION_PROGRESS_SECONDS:
            last = time.monotonic()
            _validation_progress(pending, lines, nbytes)

    result = _validate_stored(file, tokenizer=tokenizer, context_length=base_models.max_seq_len(bm) if bm else None,
                              on_progress=progress)
    counted = bm is not None and tokenizer is not None and result.lines > 0  # (an unreadable file counted nothing)
    status = TrainingFile.Status.PROCESSED if result.ok else TrainingFile.Status.ERROR
    with transaction.atomic():
        stored = pending.update(
            status=status, validation={**result.to_dict(), "model": bm.name if counted else None},
            token_counts={bm.name: _token_counts(result, problems=[])} if counted else {},
            lines_validated=result.lines, bytes_validated=result.bytes, validated_at=timezone.now())
        if not stored:
            return "gone" if not files.filter(pk=file_id).exists() else "done"
        audit_record(tenant=file.tenant, actor=SYSTEM, action="finetune.file_validated", target=file,
                     data={"id": file.id, "ok": result.ok, "examples": result.example_count,
                           "problems": len(result.problems) + result.problems_omitted})
    return status


def _validation_progress(pending, lines: int, nbytes: int) -> None:
    """One short write: how far the validation has read (the console's bar, the API's `progress`)."""
    pending.update(lines_validated=lines, bytes_validated=nbytes, progress_at=timezone.now())


def training_file_stale_validations() -> list[tuple[str, int]]:
    """(file id, tenant id) of uploads whose validation was sent to a worker and shows no progress for
    STALE_VALIDATION_SECONDS since (its message was lost: broker down at the upload, or wiped). Files still waiting
    their turn are not stale: they were never sent."""
    stale = timezone.now() - timedelta(seconds=STALE_VALIDATION_SECONDS)
    # all_tenants: a sweep over every tenant's uploads, returning ids only.
    return list(TrainingFile.all_tenants.filter(status=TrainingFile.Status.UPLOADED, validation_queued_at__lt=stale)
                .filter(Q(progress_at__lt=stale) | Q(progress_at__isnull=True))
                .values_list("id", "tenant_id"))


def training_file_validations_resume() -> int:
    """The periodic sweep (finetune.tasks.requeue_stale_validations): send again each stale validation
    (training_file_stale_validations; its file keeps its turn), and give a turn to every tenant whose uploads wait
    with none being validated (a turn lost between a validation's end and the next one's send). Each tenant still
    has at most one validation sent. Returns how many were sent."""
    sent = 0
    for file_id, tenant_id in training_file_stale_validations():
        with transaction.atomic():
            if TrainingFile.objects.for_tenant(tenant_id).filter(pk=file_id, status=TrainingFile.Status.UPLOADED) \
                    .update(validation_queued_at=timezone.now()):
                enqueue_on_commit("finetune.tasks.validate_training_file", file_id, tenant_id, robust=True)
                sent += 1
    # all_tenants: the tenants with uploads waiting for their turn, ids only.
    waiting = set(TrainingFile.all_tenants.filter(status=TrainingFile.Status.UPLOADED, validation_queued_at__isnull=True)
                  .order_by().values_list("tenant_id", flat=True))
    for tenant_id in sorted(waiting):
        sent += training_file_validation_next(tenant_id=tenant_id) is not None
    return sent


def _validate_stored(file: TrainingFile, **options) -> ValidationResult:
    """validate_stream over the stored bytes. A file that cannot be read, or a validator that fails, is a problem of
    the file (the tenant is told what to do), never an exception that would leave it `uploaded` for good."""
    try:
        with storage.training_file_open(file) as stream:
            return validate_stream(stream, size=file.bytes, filename=file.filename, max_bytes=MAX_UPLOAD_BYTES, **options)
    except OSError as exc:
        log.exception("reading %s for validation", file.id)
        code, message = "unreadable_file", (f"the stored file could not be read ({exc.strerror or exc}); upload it "
                                            "again, and contact support with the file id if this happens again")
    except Exception as exc:  # noqa: BLE001 - a validator bug must still end the validation, in words
        log.exception("validating %s", file.id)
        code, message = "validation_failed", (f"validation stopped unexpectedly ({type(exc).__name__}); upload the "
                                              "file again, and contact support with the file id if this happens again")
    return ValidationResult(problems=[Problem(None, "", code, message)])


def _token_counts(result: ValidationResult, *, problems: list[Problem]) -> dict:
    """What TrainingFile.token_counts keeps per base model, from a validation with its tokenizer."""
    return {"total_tokens": result.total_tokens or 0, "trainable_tokens": result.trainable_tokens or 0,
            "examples": result.example_count, "estimated": False, "min_tokens": result.min_tokens,
            "max_tokens": result.max_tokens, "problems": [asdict(p) for p in problems][:100]}


def training_file_request_token_count(*, file: TrainingFile, base_model: BaseModel) -> None:
    """Ask a worker to count a validated file's tokens with `base_model`'s chat template (finetune.tasks.
    count_file_tokens), unless they are counted or were asked for in the last TOKEN_COUNT_PENDING_SECONDS."""
    if not file.is_valid or selectors.file_token_counts(file, base_model) is not None:
        return
    if cache.add(f"finetune:token-count:{file.pk}:{base_model.pk}", 1, TOKEN_COUNT_PENDING_SECONDS):
        # A lost message is asked for again once TOKEN_COUNT_PENDING_SECONDS have passed.
        enqueue_on_commit("finetune.tasks.count_file_tokens", file.pk, file.tenant_id, base_model.pk, robust=True)


def training_file_count_tokens(*, file_id: str, tenant_id: int, base_model_id: int) -> str:
    """Count a validated file's tokens with a base model's tokenizer on a worker and keep them on the file (the
    `count_file_tokens` task). Without the tokenizer here they are estimated from the size, and marked so.
    Returns 'counted' | 'estimated' | 'done' (counted before) | 'gone' (file or model deleted, or not validated)."""
    file = TrainingFile.objects.for_tenant(tenant_id).filter(pk=file_id, status=TrainingFile.Status.PROCESSED).first()
    bm = BaseModel.objects.filter(pk=base_model_id).first()
    if file is None or bm is None:
        return "gone"
    if selectors.file_token_counts(file, bm) is not None:
        return "done"
    tokenizer = base_models.tokenizer_for(bm)
    if tokenizer is None:
        counts = selectors.estimated_token_counts(file)
    else:
        result = _validate_stored(file, tokenizer=tokenizer, context_length=base_models.max_seq_len(bm))
        counts = _token_counts(result, problems=result.problems)
    with transaction.atomic():  # read-modify-write of one JSON field: counts of other models may land meanwhile
        row = TrainingFile.objects.for_tenant(tenant_id).select_for_update().filter(pk=file_id).first()
        if row is None:
            return "gone"
        row.token_counts = {**row.token_counts, bm.name: counts}
        row.save(update_fields=["token_counts"])
    return "estimated" if counts["estimated"] else "counted"


@transaction.atomic
def training_file_delete(*, tenant: Tenant, actor: Actor, file: TrainingFile) -> None:
    """Delete a file and its bytes: the row first, the bytes once that has committed (a crash in between leaves
    orphan bytes, never a row without them). A file a job uses is kept until those jobs are gone (409)."""
    in_use = FineTuneJob.objects.for_tenant(tenant).filter(Q(training_file=file) | Q(validation_file=file)).exists()
    if in_use:
        raise FinetuneError("This file is used by a fine-tuning job and cannot be deleted.", status=409,
                            param="file_id", code="file_in_use")
    if file.is_validating:
        # The tenant's row before the file's, as every turn takes them (else, on PostgreSQL, a validation ending now
        # could hold the tenant and wait for this row while this waits for the tenant: a deadlock).
        _lock_tenant(tenant.pk)
    audit_record(tenant=tenant, actor=actor, action="finetune.file_deleted", target=file, data={"id": file.id})
    TrainingFile.objects.for_tenant(tenant).filter(pk=file.pk).delete()
    if file.is_validating:
        training_file_validation_next(tenant_id=tenant.pk)  # its turn (if it had it) passes to the next upload
    stored = storage.storage_root() / file.path
    transaction.on_commit(lambda: stored.unlink(missing_ok=True))


# ---- jobs: create, estimate, cancel --------------------------------------------------------------


def _number(value: Any, name: str, kind: type, low: float, high: float):
    """'auto' → None; otherwise a number within [low, high] (booleans refused)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise FinetuneError(f"{name} must be {'an integer' if kind is int else 'a number'} or \"auto\"", param=name,
                            code="invalid_hyperparameter")
    if not low <= value <= high:
        raise FinetuneError(f"{name} must be between {low} and {high}, got {value}", param=name,
                            code="invalid_hyperparameter")
    return kind(value)


# A DPO job's "auto" learning-rate multiplier is the supervised one divided by this. The supervised auto over-trains
# DPO: on the demo model (40 pairs, 15 steps) 8.16 drove the loss to 0.0007 and shrank answers to a few words, 8.16 / 3
# = 2.72 kept whole answers in 11 of 12 and put the exact sign-off in 12 of 12 (docs/finetuning.md, "Tried on the demo
# model").
DPO_AUTO_LR_DIVISOR = 3
# A DPO job's "auto" sft_weight (platform extension: the preferred output's NLL per token, weighted, added to the DPO
# loss; 0 = DPO alone, as OpenAI's DPO). On the demo model (40 sign-off pairs, the same job otherwise) DPO alone signed
# 12 of 12 held-out answers but only 6 once and then ended the turn (3 repeated the sign-off to max_tokens); with 1,
# 12 of 12 signed once and ended (docs/finetuning.md, "Tried as a new user would").
DPO_AUTO_SFT_WEIGHT = 1.0


def resolve_hyperparameters(requested: dict | None, n_examples: int, method: str = "supervised") -> dict:
    """{"n_epochs", "batch_size", "learning_rate_multiplier"} with every "auto" (or missing) decided: epochs by OpenAI's
    rule, the batch from the file's size, the multiplier from the number of optimizer steps these make (for the "dpo"
    method a third of it, DPO_AUTO_LR_DIVISOR); for "dpo" also "beta" (auto: 0.1, as OpenAI) and the platform's
    "sft_weight" (auto: DPO_AUTO_SFT_WEIGHT; 0 to 10)."""
    requested = requested or {}
    unknown = set(requested) - {"n_epochs", "batch_size", "learning_rate_multiplier"} - ({"beta", "sft_weight"} if method == "dpo" else set())
    if unknown:
        raise FinetuneError(f"unknown hyperparameters: {', '.join(sorted(unknown))}", param="hyperparameters",
                            code="invalid_hyperparameter")
    n_epochs = _number(requested.get("n_epochs"), "n_epochs", int, 1, 50)
    batch_size = _number(requested.get("batch_size"), "batch_size", int, 1, 256)
    lr = _number(requested.get("learning_rate_multiplier"), "learning_rate_multiplier", float, 1e-3, 100)
    n_epochs = n_epochs or planning.auto_n_epochs_for(n_examples)
    batch_size = batch_size or planning.auto_batch_size(n_examples)
    if lr is None:
        lr = planning.auto_learning_rate_multiplier(math.ceil(max(1, n_examples) / batch_size) * n_epochs)
        if method == "dpo":
            lr = round(lr / DPO_AUTO_LR_DIVISOR, 2)
    if method == "dpo":
        beta = _number(requested.get("beta"), "beta", float, 1e-3, 10) or 0.1
        sft_weight = _number(requested.get("sft_weight"), "sft_weight", float, 0, 10)
        return {"beta": beta, "sft_weight": DPO_AUTO_SFT_WEIGHT if sft_weight is None else sft_weight,
                "n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}
    return {"n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}


# The file format (validation.stats.format) each training method trains on.
METHOD_FORMATS = {"supervised": ("chat", "prompt_completion"), "dpo": ("preference",)}


def _check_method_format(file: TrainingFile, method: str, param: str) -> None:
    """A preference file trains only with the "dpo" method, chat data only with "supervised" (400 `wrong_file_format`)."""
    if method not in METHOD_FORMATS:
        raise FinetuneError(f"method.type must be 'supervised' or 'dpo', got {method!r}", param="method.type",
                            code="invalid_method")
    fmt = (file.validation.get("stats") or {}).get("format")
    if fmt is not None and fmt not in METHOD_FORMATS[method]:
        if method == "dpo":
            wanted = ('preference data ({"input": {"messages": [...]}, "preferred_output": [...], '
                      '"non_preferred_output": [...]} a line)')
        else:
            wanted = 'chat data ({"messages": [...]} a line) or prompt/completion pairs'
        other = "dpo" if fmt == "preference" else "supervised"
        raise FinetuneError(f"File {file.id} holds {fmt.replace('_', '/')} data, but the {method} method trains on "
                            f"{wanted}. Upload such a file, or create the job with method type '{other}'.",
                            param=param, code="wrong_file_format")


def resolve_lora(requested: dict | None, *, base_model: BaseModel | None = None, max_served_rank: int | None = None) -> dict:
    """{rank, alpha, dropout, target_modules}: rank 16 (or the highest a pool serves, if lower), alpha 2·rank, no
    dropout, all linear layers by default. A rank above `max_served_rank` (the highest rank a pool of the base model
    loads) is refused: no backend could serve the adapter the tenant would pay for."""
    requested = requested or {}
    unknown = set(requested) - {"rank", "alpha", "dropout", "target_modules"}
    if unknown:
        raise FinetuneError(f"unknown lora settings: {', '.join(sorted(unknown))}", param="lora", code="invalid_lora")
    rank = _number(requested.get("rank"), "lora.rank", int, 1, MAX_RANK) or min(DEFAULT_RANK, max_served_rank or DEFAULT_RANK)
    if max_served_rank is not None and rank > max_served_rank:
        raise FinetuneError(f"LoRA rank {rank} is above the highest rank the pools serving "
                            f"{base_model.name if base_model else 'this model'} load ({max_served_rank}): an adapter of "
                            f"that rank could not be served. Choose a rank of at most {max_served_rank}.",
                            param="lora.rank", code="rank_not_served")
    alpha = _number(requested.get("alpha"), "alpha", int, 1, 4 * MAX_RANK) or 2 * rank
    dropout = _number(requested.get("dropout"), "dropout", float, 0, 0.5) or 0.0
    targets = requested.get("target_modules", "all-linear")
    try:
        resolved = lora_math.resolve_targets(targets)
    except (ValueError, TypeError) as exc:
        raise FinetuneError(str(exc), param="target_modules", code="invalid_lora") from None
    return {"rank": rank, "alpha": alpha, "dropout": dropout,
            "target_modules": "all-linear" if targets == "all-linear" else list(resolved)}


def _base_model_for(tenant: Tenant, name: str) -> BaseModel:
    if not isinstance(name, str) or not name:
        raise FinetuneError("model is required: the name of a base model to fine-tune", param="model", code="missing_model")
    usable = {bm.name: bm for bm in serving_selectors.base_models_for_tenant(tenant)}
    bm = usable.get(name)
    if bm is None:
        raise FinetuneError(f"The model '{name}' does not exist or you do not have access to it.", status=404,
                            param="model", code="model_not_found")
    if not bm.local_path:
        trainable = ", ".join(sorted(b.name for b in usable.values() if b.local_path)) or "none"
        raise FinetuneError(f"The model '{name}' cannot be fine-tuned here. Trainable models: {trainable}.",
                            param="model", code="model_not_trainable")
    return bm


def _file_for(tenant: Tenant, file_id: Any, param: str) -> TrainingFile:
    file = TrainingFile.objects.for_tenant(tenant).filter(pk=file_id).first() if isinstance(file_id, str) else None
    if file is None:
        raise FinetuneError(f"No such file: {file_id}", status=404, param=param, code="file_not_found")
    if file.purpose != "fine-tune":
        raise FinetuneError(f"File {file.id} has purpose {file.purpose!r}; upload it with purpose 'fine-tune'.", param=param)
    if file.is_validating:
        raise FinetuneError(f"File {file.id} is still being processed and is not ready to be used for fine-tuning "
                            f"({file.progress_text}). Please try again later: GET /v1/files/{file.id} says "
                            "status 'processed' once it is ready.", param=param, code="file_not_ready")
    if not file.is_valid:
        n = len(file.validation.get("problems", [])) + file.validation.get("problems_omitted", 0)
        raise FinetuneError(f"File {file.id} has {n} problem(s); fix them and upload it again "
                            f"(see GET /v1/files/{file.id}/validation).", param=param, code="invalid_file")
    return file


@dataclass
class JobPlan:
    base_model: BaseModel
    training_file: TrainingFile
    validation_file: TrainingFile | None
    hyperparameters: dict
    lora: dict
    tokens: dict
    estimate: dict
    system_prompt: dict  # the SystemPromptSnapshot fields the job trains with (finetune.system_prompts.snapshot)


def _with_system_prompt_tokens(tokens: dict, text: str, method: str) -> dict:
    """The file's token counts plus what the system prompt adds to every rendered conversation (a DPO example is two:
    input + preferred, input + non-preferred), estimated from its size: what the job will train (and bill) per epoch."""
    per_conversation = system_prompts.estimated_tokens(text)
    added = per_conversation * (2 if method == "dpo" else 1) * (tokens["examples"] or 0)
    return {**tokens, "total_tokens": tokens["total_tokens"] + added, "system_prompt_tokens": per_conversation}


def finetune_job_plan(*, tenant: Tenant, model: str, training_file: str, validation_file: str | None = None,
                      hyperparameters: dict | None = None, lora: dict | None = None,
                      from_checkpoint: str | None = None, method: str = "supervised",
                      system_prompt: str | int | None = None) -> JobPlan:
    """Check a job's inputs and compute its hyperparameters, tokens, cost (cents) and time (seconds). With
    `from_checkpoint` the job starts from that adapter or checkpoint of the tenant (finetune.continuation). `method`
    is OpenAI's method.type: "supervised" (chat data) or "dpo" (preference data, finetune.dpo). `system_prompt`
    (extension): which system prompt every example is rendered with, "tenant" (default: the one the gateway serves),
    "none" or a saved version number (finetune.system_prompts.snapshot); its tokens count in the estimate."""
    prompt = system_prompts.snapshot(tenant, system_prompt)
    bm = _base_model_for(tenant, model)
    train = _file_for(tenant, training_file, "training_file")
    valid = _file_for(tenant, validation_file, "validation_file") if validation_file else None
    _check_method_format(train, method, "training_file")
    if valid is not None:
        _check_method_format(valid, method, "validation_file")
    if valid is not None and valid.pk == train.pk:
        raise FinetuneError(f"File {train.id} cannot be both the training and the validation file: its loss would "
                            "not show how the model does on unseen examples. Upload held-out examples as a separate "
                            "file, or leave validation_file out.", param="validation_file", code="same_file")
    tokens = selectors.file_token_counts(train, bm)
    if tokens is None:  # not counted with this model yet: a worker counts them; the size estimates them until then
        training_file_request_token_count(file=train, base_model=bm)
        tokens = selectors.estimated_token_counts(train)
    tokens = _with_system_prompt_tokens(tokens, prompt["system_prompt"], method)
    hp = resolve_hyperparameters(hyperparameters, tokens["examples"] or train.examples, method)
    preview = planning.estimate(base_model=bm, tokens_per_epoch=tokens["total_tokens"], n_epochs=hp["n_epochs"])
    start = continuation.start_point_for(tenant, from_checkpoint) if from_checkpoint is not None else None
    if start is not None:  # its rank and modules, checked as any job's
        lora = continuation.lora_request(start, lora, base_model=bm)
    lora = resolve_lora(lora, base_model=bm, max_served_rank=pools.max_lora_rank_served(tenant, bm))
    if start is not None:
        lora["init_from"] = start.ref
    return JobPlan(bm, train, valid, hp, lora, tokens, preview, prompt)


def _fine_tuned_model_name(bm: BaseModel, tenant: Tenant, suffix: str, job_id: str) -> str:
    return f"ft:{bm.name}:{tenant.slug}:{suffix}:{job_id.rsplit('-', 1)[-1][:8]}"


@transaction.atomic
def finetune_job_create(*, tenant: Tenant, actor: Actor, model: str, training_file: str,
                        validation_file: str | None = None, suffix: str | None = None, seed: int | None = None,
                        hyperparameters: dict | None = None, lora: dict | None = None,
                        metadata: dict | None = None, from_checkpoint: str | None = None,
                        method: str = "supervised", system_prompt: str | int | None = None) -> FineTuneJob:
    """Create a queued job and enqueue it on the `finetune` queue once the transaction commits. It records the system
    prompt it trains with (finetune_job_plan's `system_prompt`; default: the tenant's live one).

    Refuses (429) when the tenant already runs MAX_CONCURRENT_JOBS jobs.
    """
    suffix = suffix or ""
    if not isinstance(suffix, str) or not SUFFIX_RE.match(suffix):
        raise FinetuneError("suffix must be at most 64 letters, digits, '-', '_' or '.'", param="suffix", code="invalid_suffix")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1):
        raise FinetuneError("seed must be an integer between 0 and 2147483647", param="seed", code="invalid_seed")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16
                                 or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise FinetuneError("metadata must be at most 16 string keys with string values", param="metadata")
    plan = finetune_job_plan(tenant=tenant, model=model, training_file=training_file,
                             validation_file=validation_file, hyperparameters=hyperparameters, lora=lora,
                             from_checkpoint=from_checkpoint, method=method, system_prompt=system_prompt)
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()  # serialise this tenant's creations (the limit)
    active = selectors.active_job_count(tenant)
    if active >= MAX_CONCURRENT_JOBS:
        raise FinetuneError(f"You already have {active} fine-tuning jobs queued or running; the limit is "
                            f"{MAX_CONCURRENT_JOBS}. Wait for one to finish or cancel one.", status=429,
                            code="too_many_concurrent_jobs")
    job = FineTuneJob(tenant=tenant, base_model=plan.base_model, training_file=plan.training_file,
                      validation_file=plan.validation_file, suffix=suffix, seed=seed if seed is not None else 0,
                      hyperparameters=plan.hyperparameters, requested_hyperparameters=hyperparameters or {},
                      lora=plan.lora, metadata=metadata or {}, status=FineTuneJob.Status.QUEUED, method=method,
                      estimated_cost_cents=plan.estimate["estimated_cost_cents"],
                      created_by_key=actor.key, **plan.system_prompt)
    name = _fine_tuned_model_name(plan.base_model, tenant, suffix, job.id)
    if len(name) > Adapter._meta.get_field("name").max_length:
        raise FinetuneError("the suffix is too long for this model's name; shorten it", param="suffix", code="invalid_suffix")
    job.save()
    _event(job, f"Created fine-tuning job: {job.id}")
    if plan.lora.get("init_from"):
        _event(job, f"Starts from {plan.lora['init_from']} (rank {plan.lora['rank']}) instead of a new LoRA")
    about = " (estimated from the file's size: not counted with this model yet)" if plan.tokens["estimated"] else ""
    _event(job, f"Validated training file {plan.training_file.id}: {plan.tokens['examples']} examples, "
                f"{plan.tokens['total_tokens']:,} tokens per epoch{about}; estimated cost "
                f"${plan.estimate['estimated_cost_cents'] / 100:.2f}. {_system_prompt_words(job)}")
    audit_record(tenant=tenant, actor=actor, action="finetune.job_created", target=job,
                 data={"id": job.id, "model": plan.base_model.name, "training_file": plan.training_file.id,
                       "system_prompt": job.system_prompt_data})
    enqueue_on_commit("finetune.tasks.run_finetune_job", job.id, tenant.pk)
    return job


@transaction.atomic
def finetune_job_cancel(*, tenant: Tenant, actor: Actor, job: FineTuneJob) -> FineTuneJob:
    """Cancel a job. A running worker notices within about a second and bills only completed steps. 409 when the job
    has finished, even if it did so since `job` was read."""
    if job.status in FineTuneJob.FINISHED_STATUSES:
        raise _already_finished(job)
    now = timezone.now()
    cancelled = FineTuneJob.objects.for_tenant(tenant).filter(pk=job.pk, status__in=FineTuneJob.ACTIVE_STATUSES).update(
        status=FineTuneJob.Status.CANCELLED, finished_at=now, estimated_finish=None)
    job.refresh_from_db()
    if not cancelled:  # the worker finished it (or another request cancelled it) meanwhile
        raise _already_finished(job)
    _event(job, "Job cancelled by request")
    audit_record(tenant=tenant, actor=actor, action="finetune.job_cancelled", target=job, data={"id": job.id})
    return job


def _system_prompt_words(job: FineTuneJob) -> str:
    if not job.system_prompt:
        return "Trains without a system prompt: the examples are rendered as they are in the file"
    return (f"Trains with system prompt version {job.system_prompt_version} (rule '{job.system_message_rule}'), as "
            "the gateway serves this account's requests: every example is rendered with it")


def _already_finished(job: FineTuneJob) -> FinetuneError:
    words = "is already cancelled" if job.status == FineTuneJob.Status.CANCELLED else f"has already {job.status}"
    return FinetuneError(f"Job {job.id} {words}, so it cannot be cancelled.", status=409, param="fine_tuning_job_id",
                         code="job_finished")


def _event(job: FineTuneJob, message: str, *, level: str = "info", type: str = "message", data: dict | None = None) -> JobEvent:
    return JobEvent.objects.for_tenant(job.tenant_id).create(
        job=job, level=level, type=type, message=message, data=data or {})


# ---- running a job (the worker side) -------------------------------------------------------------


class JobRunner:
    """One attempt at running one job on this worker: claim, validate, train, record.

    The lease (`worker_id`, `worker_heartbeat_at`) is renewed on every status poll; every write after
    the claim is conditional on still holding it, so a worker presumed dead cannot overwrite its successor.
    """

    def __init__(self, job_id: str, tenant_id: int):
        self.job_id, self.tenant_id = job_id, tenant_id
        self.worker_id = uuid.uuid4().hex
        self._last_poll = 0.0
        self._cancelled = False
        self._last_metrics: dict = {}

    def mine(self):
        return FineTuneJob.objects.for_tenant(self.tenant_id).filter(
            pk=self.job_id, worker_id=self.worker_id, status=FineTuneJob.Status.RUNNING)

    def claim(self) -> str:
        """'claimed', 'leased' (another live worker runs it) or 'gone' (finished, cancelled or missing)."""
        now = timezone.now()
        stale = now - timedelta(seconds=LEASE_SECONDS)
        claimable = (Q(status__in=[FineTuneJob.Status.VALIDATING_FILES, FineTuneJob.Status.QUEUED])
                     | Q(status=FineTuneJob.Status.RUNNING, worker_heartbeat_at__lt=stale)
                     | Q(status=FineTuneJob.Status.RUNNING, worker_heartbeat_at__isnull=True))
        claimed = FineTuneJob.objects.for_tenant(self.tenant_id).filter(claimable, pk=self.job_id).update(
            status=FineTuneJob.Status.RUNNING, worker_id=self.worker_id, worker_heartbeat_at=now,
            attempts=F("attempts") + 1, started_at=Coalesce("started_at", now))
        if claimed == 1:
            return "claimed"
        status = FineTuneJob.objects.for_tenant(self.tenant_id).filter(pk=self.job_id).values_list("status", flat=True).first()
        return "leased" if status == FineTuneJob.Status.RUNNING else "gone"

    # -- callbacks handed to train_lora ------------------------------------------------------------

    def should_cancel(self) -> bool:
        """True once the job is no longer ours and running (cancelled, or re-claimed after a lost lease)."""
        if self._cancelled:
            return True
        if time.monotonic() - self._last_poll < CANCEL_POLL_SECONDS:
            return False
        self._last_poll = time.monotonic()
        self._cancelled = self.mine().update(worker_heartbeat_at=timezone.now()) == 0
        return self._cancelled

    def on_event(self, event: dict) -> None:
        job = self.job
        kind = event.get("type")
        if kind == "metrics":
            data = {k: v for k, v in event.items() if k != "type"}
            self._last_metrics = data
            parts = [f"Step {event['step']}/{event['total_steps']}: training loss={event['train_loss']:.4f}"]
            if event.get("train_reward_accuracy") is not None:  # DPO: how often, and by how much, the preferred wins
                parts.append(f"reward margin={event['train_reward_margin']:.4f}, "
                             f"reward accuracy={event['train_reward_accuracy']:.2f}")
            if event.get("train_preferred_nll") is not None:  # DPO with sft_weight: the preferred answers' own loss
                parts.append(f"preferred-answer loss={event['train_preferred_nll']:.4f}")
            if event.get("valid_loss") is not None:
                parts.append(f"validation loss={event['valid_loss']:.4f}")
            _event(job, ", ".join(parts), type="metrics", data=data)
            eta = event.get("eta_seconds")
            self.mine().update(step=event["step"], total_steps=event["total_steps"], train_loss=event["train_loss"],
                               tokens_per_second=event.get("tokens_per_second"), load_seconds=event.get("load_seconds"),
                               worker_heartbeat_at=timezone.now(),
                               estimated_finish=timezone.now() + timedelta(seconds=eta) if eta is not None else None)
        elif kind == "checkpoint":
            path = Path(self.output_dir) / "checkpoints" / f"step-{event['step']:06d}"
            JobCheckpoint.objects.for_tenant(self.tenant_id).get_or_create(
                job=job, step=event["step"],
                defaults={"epoch": event["epoch"], "path": str(path), "metrics": self._last_metrics})
            _event(job, f"Checkpoint saved at step {event['step']} (epoch {event['epoch']})")
        elif kind == "message":
            _event(job, event.get("message", ""), level=event.get("level", "info"))

    # -- the run -----------------------------------------------------------------------------------

    def run(self) -> str:
        from finetune.dpo import train_dpo  # the same arguments, events and result as train_lora, with the DPO loss
        from finetune.trainer import TrainingDataError, train_lora

        self.job = job = FineTuneJob.objects.for_tenant(self.tenant_id).select_related("base_model", "training_file", "validation_file").get(pk=self.job_id)
        self.output_dir = storage.job_output_dir(job)
        bm = job.base_model
        if job.attempts > 1:
            _event(job, f"Resuming on a new worker (attempt {job.attempts}) after the previous one stopped responding")
        else:
            _event(job, "Fine-tuning job started")
        try:
            train_examples = self._validated_examples(job.training_file, bm, "training_file")
            valid_examples = self._validated_examples(job.validation_file, bm, "validation_file") if job.validation_file else None
            hp = job.hyperparameters
            dpo = {"beta": hp["beta"], "sft_weight": hp.get("sft_weight", 0.0)} if job.method == "dpo" else {}  # older jobs: none
            n = len(train_examples)
            steps = -(-n // hp["batch_size"]) * hp["n_epochs"]
            result = (train_dpo if job.method == "dpo" else train_lora)(
                base_model_path=bm.local_path, base_model_id=bm.hf_id, train_examples=train_examples,
                valid_examples=valid_examples, output_dir=self.output_dir,
                hyperparameters={
                    "n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                    "learning_rate": bm.finetune_learning_rate * hp["learning_rate_multiplier"],
                    "lora_r": job.lora["rank"], "lora_alpha": job.lora["alpha"], "lora_dropout": job.lora["dropout"],
                    "target_modules": job.lora["target_modules"], "seed": job.seed,
                    "max_seq_len": base_models.max_seq_len(bm), "log_every": max(1, steps // 100), **dpo,
                },
                on_event=self.on_event, should_cancel=self.should_cancel, resume=True,
                compile_layers=settings.FINETUNE_COMPILE, init_adapter=continuation.start_path_for_job(job),
                system_prompt=job.system_prompt_used)
        except FinetuneError as exc:
            return self._fail(exc.code, exc.message, exc.param)
        except TrainingDataError as exc:
            return self._fail("invalid_training_file", f"The training data cannot be used: {exc}", "training_file")
        except Exception as exc:  # noqa: BLE001 - every failure must reach the tenant in words
            log.exception("fine-tuning job %s failed", self.job_id)
            return self._fail(*_describe_failure(exc))
        if result.status == "cancelled":
            return self._record_cancel(result)
        return self._record_success(result)

    def _validated_examples(self, file: TrainingFile, bm: BaseModel, param: str):
        tokenizer = base_models.tokenizer_for(bm)
        # Streamed as at upload (nesting depth and line length bounded), keeping the examples to train on; a storage
        # failure propagates (the job fails with storage_error).
        with storage.training_file_open(file) as stream:
            result = validate_stream(stream, size=file.bytes, filename=file.filename, tokenizer=tokenizer,
                                     context_length=base_models.max_seq_len(bm), keep_examples=True)
        if not result.ok:
            shown = "; ".join(f"line {p.line}: {p.message}" if p.line else p.message for p in result.problems[:5])
            more = len(result.problems) + result.problems_omitted - 5
            raise FinetuneError(f"The {param.replace('_', ' ')} {file.id} has problems with {bm.name}'s tokenizer: "
                                f"{shown}{f' (and {more} more)' if more > 0 else ''}", param=param, code="invalid_file")
        return result.examples

    def _fail(self, code: str, message: str, param: str | None) -> str:
        if self.mine().update(status=FineTuneJob.Status.FAILED, error_code=code, error_message=message,
                              error_param=param or "", finished_at=timezone.now(), estimated_finish=None) == 1:
            _event(self.job, message, level="error")
        return "failed"

    def _record_cancel(self, result) -> str:
        job = FineTuneJob.objects.for_tenant(self.tenant_id).get(pk=self.job_id)
        if job.worker_id != self.worker_id or job.status != FineTuneJob.Status.CANCELLED:
            return "lost"  # re-claimed by another worker after our lease expired: it records the outcome
        with transaction.atomic():
            FineTuneJob.objects.for_tenant(self.tenant_id).filter(pk=job.pk).update(
                trained_tokens=result.trained_tokens, step=result.steps)
            _usage(job, result.trained_tokens)
        _event(job, f"Stopped at step {result.steps}/{result.total_steps}; {result.trained_tokens:,} tokens of "
                    f"completed steps are billed")
        return "cancelled"

    def _record_success(self, result) -> str:
        """The adapter, then its deployment (unless the tenant turned that off), then "succeeded": as with OpenAI,
        the model is callable as soon as the job says it succeeded. Backends are called outside any transaction."""
        job = self.job
        bm = job.base_model
        name = _fine_tuned_model_name(bm, job.tenant, job.suffix, job.id)
        with transaction.atomic():
            if not self.mine().select_for_update().exists():
                return self._record_cancel(result)  # cancelled in the last instant, or no longer ours
            adapter = self._create_adapter(job, bm, name, result)
        resumed = f" (resumed from step {result.resumed_from_step})" if result.resumed_from_step else ""
        _event(job, f"New fine-tuned model created: {name}{resumed}")
        self._auto_deploy(job, adapter)
        with transaction.atomic():
            updated = self.mine().update(status=FineTuneJob.Status.SUCCEEDED, fine_tuned_model=name, adapter=adapter,
                                         trained_tokens=result.trained_tokens, step=result.steps,
                                         total_steps=result.total_steps, finished_at=timezone.now(),
                                         estimated_finish=None, train_loss=result.train_loss,
                                         load_seconds=result.load_seconds)
            if updated == 1:
                self._record_adapter(job, adapter, result)
                return "succeeded"
        # Cancelled while it was being deployed: the adapter goes with the job (nothing of it is billed or served).
        from finetune import deploy

        deploy.adapter_undeploy(tenant=job.tenant, adapter=adapter, actor=SYSTEM)
        Adapter.objects.for_tenant(job.tenant_id).filter(pk=adapter.pk).delete()
        return self._record_cancel(result)

    def _create_adapter(self, job: FineTuneJob, bm: BaseModel, name: str, result) -> Adapter:
        """The adapter row (again, if a worker that died after writing it ran this job before)."""
        adapter_config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
        targets = sorted(adapter_config["target_modules"])
        rank = adapter_config["r"]
        adapter, _ = Adapter.objects.for_tenant(job.tenant_id).update_or_create(name=name, defaults=dict(
            base_model=bm, path=str(Path(result.adapter_dir).resolve()),
            rank=rank, alpha=int(adapter_config["lora_alpha"]), target_modules=targets,
            parameters=lora_math.lora_param_count(base_models.model_config(bm), rank, targets),
            size_bytes=sum(f.stat().st_size for f in Path(result.adapter_dir).iterdir() if f.is_file())))
        return adapter

    def _auto_deploy(self, job: FineTuneJob, adapter: Adapter) -> None:
        """Deploy the new adapter to its base model's pool, unless the tenant's model settings say not to. A
        deployment that fails leaves the job to succeed (the adapter is the product) and says why in its events."""
        from finetune import deploy
        from serving.models import AdapterDeployment, ModelConfig

        config = ModelConfig.objects.for_tenant(job.tenant_id).first()
        if config is not None and not config.auto_deploy_finetuned:
            _event(job, f"{adapter.name} is not deployed: automatic deployment is off in the model settings. Deploy it "
                        "from the console's Adapters page or with POST /api/tenants/<slug>/adapters/<id>/deploy/.")
            return
        try:
            deployment = deploy.adapter_deploy(tenant=job.tenant, adapter=adapter, actor=SYSTEM)
        except deploy.DeployError as exc:
            _event(job, f"{adapter.name} is not deployed: {exc}", level="warn")
            return
        except Exception as exc:  # noqa: BLE001 - a deployment problem must not fail a finished training
            log.exception("deploying %s after job %s", adapter.name, job.id)
            _event(job, f"{adapter.name} could not be deployed ({type(exc).__name__}: {exc}); deploy it again from "
                        "the console's Adapters page.", level="warn")
            return
        if deployment.state == AdapterDeployment.State.ACTIVE:
            _event(job, f"Deployed {adapter.name} to the {deployment.pool.name} pool: it is callable now")
            time.sleep(GATEWAY_POLLS_BEFORE_SUCCESS * settings.PLATFORM_GATEWAY_CONFIG_POLL_MS / 1000)
        elif deployment.state == AdapterDeployment.State.PENDING:
            _event(job, f"Deploying {adapter.name} to the {deployment.pool.name} pool: {deployment.error}")
        else:
            _event(job, f"{adapter.name} could not be deployed to the {deployment.pool.name} pool: {deployment.error}",
                   level="warn")

    def _record_adapter(self, job: FineTuneJob, adapter: Adapter, result) -> None:
        name = adapter.name
        _usage(job, result.trained_tokens)
        hub.push_on_commit(adapter.pk, job.tenant_id)
        _event(job, f"The job has successfully completed; {result.trained_tokens:,} tokens trained")
        audit_record(tenant=job.tenant, actor=SYSTEM, action="finetune.job_succeeded", target=job,
                     data={"id": job.id, "fine_tuned_model": name, "trained_tokens": result.trained_tokens})


def _usage(job: FineTuneJob, trained_tokens: int) -> None:
    TrainingUsage.objects.for_tenant(job.tenant_id).get_or_create(job=job, defaults={
        "base_model": job.base_model.name, "trained_tokens": trained_tokens})


def _describe_failure(exc: Exception) -> tuple[str, str, str | None]:
    """(code, message, param) a tenant understands, for a failure inside training."""
    text = str(exc).strip() or type(exc).__name__
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return ("out_of_memory", "Training ran out of GPU memory. Lower batch_size or the LoRA rank, or shorten "
                "the longest examples, and start a new job.", "hyperparameters")
    if isinstance(exc, ValueError):
        return ("invalid_hyperparameters", f"The job's settings cannot be used: {text}", "hyperparameters")
    if isinstance(exc, OSError):
        return ("storage_error", f"The worker could not read or write the job's files ({text}). Please retry the job; "
                "if it fails again, contact support with the job id.", None)
    return ("training_failed", f"Training stopped with an unexpected error ({type(exc).__name__}: {text}). "
            "Please retry the job; if it fails again, contact support with the job id.", None)


def finetune_job_run(*, job_id: str, tenant_id: int) -> str:
    """Claim and run one job (the Celery task's body). Returns claimed outcome:
    'succeeded' | 'failed' | 'cancelled' | 'leased' (another live worker holds it) | 'gone' | 'lost'."""
    runner = JobRunner(job_id, tenant_id)
    claimed = runner.claim()
    if claimed != "claimed":
        return claimed
    return runner.run()


def finetune_stale_jobs() -> list[tuple[str, int]]:
    """(job id, tenant id) of running jobs whose worker stopped renewing its lease; for a periodic re-enqueue."""
    stale = timezone.now() - timedelta(seconds=LEASE_SECONDS)
    return list(FineTuneJob.all_tenants.filter(status=FineTuneJob.Status.RUNNING)
                .filter(Q(worker_heartbeat_at__lt=stale) | Q(worker_heartbeat_at__isnull=True))
                .values_list("id", "tenant_id"))
