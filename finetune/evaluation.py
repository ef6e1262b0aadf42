"""Evaluations: one of the tenant's adapters or checkpoints against one of its chat files, base model vs adapter.

`evaluation_create` checks what the tenant named and queues the run on the `finetune` queue (finetune.tasks.
run_evaluation: the GPU hosts, never the gateway or the web process); `evaluation_run` is the task's body: it claims
the evaluation (a lease, as jobs have), loads the base model with the adapter once (transformers + peft), answers
every row twice, adapter disabled and enabled (finetune/evaluation_metrics.py: greedy, exact match, contains, loss),
writes each row and the progress (`rows_done` of `rows_total`) as it goes, then the summary. A worker that died is
replaced when its lease expires (the redelivered message finds it stale) and the run starts over.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from common.queue import enqueue_on_commit
from finetune import base_models, continuation, public_ids, services, storage, system_prompts
from finetune.errors import FinetuneError
from finetune.models import LEASE_SECONDS, Evaluation, EvaluationRow, FineTuneJob, JobCheckpoint
from finetune.validation import validate_stream
from serving.models import Adapter, BaseModel
from tenants.models import Tenant
from tenants.services import SYSTEM, Actor, audit_record

log = logging.getLogger(__name__)

MAX_ROWS = getattr(settings, "FINETUNE_EVAL_MAX_ROWS", 500)  # the first this many rows of the file are evaluated
MAX_TOKENS_LIMIT, DEFAULT_MAX_TOKENS = 512, 64
MAX_ACTIVE = getattr(settings, "FINETUNE_EVAL_MAX_ACTIVE", 3)  # queued or running, per tenant


def _target(tenant, model) -> tuple[continuation.StartPoint, Adapter | None, JobCheckpoint | None]:
    """The adapter or checkpoint `model` names (as a job's from_checkpoint: ft:…, ft:…:ckpt-step-N, ftckpt-…, ftjob-…);
    404 `model_not_found` for one that is not the tenant's."""
    if not isinstance(model, str) or not model:
        raise FinetuneError("model must name one of your fine-tuned models (ft:…), a checkpoint (ftckpt-…) or a job "
                            "(ftjob-…)", param="model")
    try:
        start = continuation.start_point_for(tenant, model)
    except FinetuneError as exc:
        raise FinetuneError(exc.message.replace("no job can start from them", "they cannot be evaluated"),
                            status=exc.status, param="model",
                            code="model_not_found" if exc.status == 404 else exc.code) from None
    checkpoint = None
    if model.startswith(f"{JobCheckpoint.PUBLIC_ID_PREFIX}-"):
        checkpoint = JobCheckpoint.objects.for_tenant(tenant).filter(
            pk=public_ids.decode(JobCheckpoint.PUBLIC_ID_PREFIX, model)).first()
    elif (named := continuation.CHECKPOINT_NAME.match(model)):
        job = FineTuneJob.objects.for_tenant(tenant).filter(fine_tuned_model=named["model"]).first()
        checkpoint = JobCheckpoint.objects.for_tenant(tenant).filter(job=job, step=int(named["step"])).first()
    adapter = None
    if checkpoint is None:
        if model.startswith("ftjob-"):
            adapter = FineTuneJob.objects.for_tenant(tenant).select_related("adapter").get(pk=model).adapter
        else:
            adapter = Adapter.objects.for_tenant(tenant).filter(name=model).first()
    return start, adapter, checkpoint


@transaction.atomic
def evaluation_create(*, tenant: Tenant, actor: Actor, model: str, file: str,
                      max_tokens: int | None = None, system_prompt: str | int | None = None) -> Evaluation:
    """Queue an evaluation of `model` (an adapter or checkpoint of the tenant) on `file` (a processed chat file of the
    tenant). Every row's prompt is rendered with `system_prompt` as the gateway would serve it: "tenant" (default:
    the tenant's live one, recorded now), "none" or a saved version number (finetune.system_prompts.snapshot). 404 for a model or file that is not the tenant's; 400 for a file not ready or with problems, a base model
    without local weights or a bad max_tokens; 429 past MAX_ACTIVE queued or running evaluations."""
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise FinetuneError(f"max_tokens must be an integer between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens",
                            code="invalid_max_tokens")
    prompt = system_prompts.snapshot(tenant, system_prompt)
    start, adapter, checkpoint = _target(tenant, model)
    bm = BaseModel.objects.get(pk=start.base_model_id)
    if not bm.local_path:
        raise FinetuneError(f"{bm.name} has no local weights here, so its adapters cannot be evaluated.", param="model",
                            code="model_not_evaluable")
    data_file = services._file_for(tenant, file, "file")
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()  # serialise this tenant's creations (the limit)
    active = Evaluation.objects.for_tenant(tenant).exclude(status__in=Evaluation.FINISHED_STATUSES).count()
    if active >= MAX_ACTIVE:
        raise FinetuneError(f"You already have {active} evaluations queued or running; the limit is {MAX_ACTIVE}. "
                            "Wait for one to finish.", status=429, code="too_many_concurrent_evaluations")
    evaluation = Evaluation.objects.for_tenant(tenant).create(
        tenant=tenant, base_model=bm, model=model, adapter=adapter, checkpoint=checkpoint, file=data_file,
        file_name=data_file.filename, max_tokens=max_tokens, rows_total=min(data_file.examples, MAX_ROWS),
        created_by_key=actor.key, **prompt)
    audit_record(tenant=tenant, actor=actor, action="finetune.evaluation_created", target=evaluation,
                 data={"id": evaluation.id, "model": model, "file": data_file.id, "max_tokens": max_tokens,
                       "system_prompt": evaluation.system_prompt_data})
    enqueue_on_commit("finetune.tasks.run_evaluation", evaluation.id, tenant.pk)
    return evaluation


def differing_rows(evaluation: Evaluation):
    """The rows whose base and adapter answers differ."""
    return EvaluationRow.objects.for_tenant(evaluation.tenant_id).filter(evaluation=evaluation).exclude(
        base_answer=F("adapter_answer"))


# ---- on the worker -------------------------------------------------------------------------------


class EvaluationRunner:
    def __init__(self, evaluation_id: str, tenant_id: int):
        self.evaluation_id, self.tenant_id = evaluation_id, tenant_id
        self.worker_id = f"eval-{uuid.uuid4().hex[:12]}"

    def mine(self):
        return Evaluation.objects.for_tenant(self.tenant_id).filter(pk=self.evaluation_id, worker_id=self.worker_id,
                                                                     status=Evaluation.Status.RUNNING)

    def claim(self) -> str:
        now = timezone.now()
        stale = now - timedelta(seconds=LEASE_SECONDS)
        claimable = Q(status=Evaluation.Status.QUEUED) | Q(
            Q(worker_heartbeat_at__lt=stale) | Q(worker_heartbeat_at__isnull=True), status=Evaluation.Status.RUNNING)
        claimed = Evaluation.objects.for_tenant(self.tenant_id).filter(claimable, pk=self.evaluation_id).update(
            status=Evaluation.Status.RUNNING, worker_id=self.worker_id, worker_heartbeat_at=now, rows_done=0,
            attempts=F("attempts") + 1, started_at=Coalesce("started_at", now))
        if claimed:
            return "claimed"
        status = Evaluation.objects.for_tenant(self.tenant_id).filter(pk=self.evaluation_id).values_list(
            "status", flat=True).first()
        return {None: "gone", Evaluation.Status.RUNNING: "leased"}.get(status, "done")

    def run(self) -> str:
        from finetune import evaluation_metrics as em

        evaluation = Evaluation.objects.for_tenant(self.tenant_id).select_related("base_model", "file").get(
            pk=self.evaluation_id)
        bm = evaluation.base_model
        try:
            if evaluation.file is None:
                raise FinetuneError("The file to evaluate on was deleted.", param="file", code="file_not_found")
            rows, skipped = em.rows_from_examples(self._examples(evaluation, bm), evaluation.system_prompt_used)
            skipped += max(0, len(rows) - MAX_ROWS)
            rows = rows[:MAX_ROWS]
            if not rows:
                raise FinetuneError("The file has no row whose last assistant message has text to compare with.",
                                    param="file", code="no_rows")
            start = continuation.start_point_for(self.tenant_id, evaluation.model)
            if not (Path(start.path) / "adapter_model.safetensors").is_file():
                raise FinetuneError(f"The weights of {evaluation.model} are no longer stored.", param="model",
                                    code="model_not_found")
            with transaction.atomic():
                EvaluationRow.objects.for_tenant(self.tenant_id).filter(evaluation=evaluation).delete()  # a re-run
                self.mine().update(rows_total=len(rows), rows_skipped=skipped, rows_done=0)
            model, tokenizer, dev = em.load_model(bm.local_path, start.path)
            results = em.evaluate_rows(model, tokenizer, rows, max_tokens=evaluation.max_tokens, dev=dev,
                                       on_row=lambda i, r: self._row(evaluation, i, r),
                                       should_stop=lambda: not self.mine().exists())
        except FinetuneError as exc:
            return self._fail(evaluation, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the tenant in words
            log.exception("evaluation %s failed", self.evaluation_id)
            code, message, _ = services._describe_failure(exc)
            return self._fail(evaluation, code, message.replace("Training", "The evaluation")
                              .replace("and start a new job", "and start a new evaluation")
                              .replace("retry the job", "retry the evaluation"))
        if len(results) < len(rows):
            return "lost"  # no longer ours (re-claimed after a lost lease)
        metrics = em.summarize(results)
        with transaction.atomic():
            if self.mine().update(status=Evaluation.Status.SUCCEEDED, metrics=metrics, rows_done=len(results),
                                  finished_at=timezone.now()) != 1:
                return "lost"
            audit_record(tenant=evaluation.tenant, actor=SYSTEM, action="finetune.evaluation_succeeded",
                         target=evaluation, data={"id": evaluation.id, "rows": len(results),
                                                  "differing_rows": metrics["differing_rows"]})
        return "succeeded"

    def _examples(self, evaluation: Evaluation, bm: BaseModel):
        file = evaluation.file
        with storage.training_file_open(file) as stream:
            result = validate_stream(stream, size=file.bytes, filename=file.filename,
                                     tokenizer=base_models.tokenizer_for(bm),
                                     context_length=base_models.max_seq_len(bm), keep_examples=True)
        if not result.ok:
            shown = "; ".join(f"line {p.line}: {p.message}" if p.line else p.message for p in result.problems[:3])
            raise FinetuneError(f"The file {file.id} has problems with {bm.name}'s tokenizer: {shown}", param="file",
                                code="invalid_file")
        return result.examples

    def _row(self, evaluation: Evaluation, index: int, r) -> None:
        EvaluationRow.objects.for_tenant(self.tenant_id).create(
            tenant_id=self.tenant_id, evaluation=evaluation, index=index, line=r.row.line, prompt=r.row.prompt,
            expected=r.row.expected, base_answer=r.base.answer, adapter_answer=r.adapter.answer,
            base_exact=r.base.exact, adapter_exact=r.adapter.exact, base_contains=r.base.contains,
            adapter_contains=r.adapter.contains, base_loss=r.base.loss, adapter_loss=r.adapter.loss,
            answer_tokens=r.answer_tokens)
        self.mine().update(rows_done=index + 1, worker_heartbeat_at=timezone.now())

    def _fail(self, evaluation: Evaluation, code: str, message: str) -> str:
        with transaction.atomic():
            if self.mine().update(status=Evaluation.Status.FAILED, error_code=code, error_message=message,
                                  finished_at=timezone.now()) == 1:
                audit_record(tenant=evaluation.tenant, actor=SYSTEM, action="finetune.evaluation_failed",
                             target=evaluation, data={"id": evaluation.id, "code": code})
        return "failed"


def evaluation_run(*, evaluation_id: str, tenant_id: int) -> str:
    """Claim and run one evaluation (the Celery task's body): 'succeeded' | 'failed' | 'leased' (another live worker
    holds it) | 'done' (finished before) | 'gone' | 'lost'."""
    runner = EvaluationRunner(evaluation_id, tenant_id)
    claimed = runner.claim()
    return runner.run() if claimed == "claimed" else claimed



def evaluation_stale() -> list[tuple[str, int]]:
    """(evaluation id, tenant id) of running evaluations whose worker stopped writing progress for LEASE_SECONDS (the
    periodic requeue sends them again; the next claim starts them over)."""
    stale = timezone.now() - timedelta(seconds=LEASE_SECONDS)
    # all_tenants: a sweep over every tenant's evaluations, returning ids only.
    return list(Evaluation.all_tenants.filter(status=Evaluation.Status.RUNNING)
                .filter(Q(worker_heartbeat_at__lt=stale) | Q(worker_heartbeat_at__isnull=True))
                .values_list("id", "tenant_id"))
