"""Fine-tuning console pages under t/<tenant_slug>/finetune/.

Roles: every member reads; developers and above upload, launch and cancel; admins and above deploy.
Objects are fetched inside the URL's tenant only (another tenant's id is a 404). Writes go through
`finetune.services` / `finetune.deploy`, exactly as the API's do.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import messages
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from finetune import base_models, continuation, deploy, lora_math, planning, pools, selectors, services, storage, system_prompts
from finetune.jobs_api import parse_method
from finetune.models import FineTuneJob, JobEvent, TrainingFile
from finetune.services import FinetuneError
from serving.models import Adapter, AdapterDeployment
from tenants.access import TenantContext, tenant_view
from tenants.models import Role

MAX_SHOWN_PROBLEMS = 200


def _render(request, ctx: TenantContext, template: str, context: dict | None = None, status: int = 200):
    return render(request, template, {
        "tenant": ctx.tenant, "section": "finetune", "can_train": ctx.can(Role.DEVELOPER),
        "can_deploy": ctx.can(Role.ADMIN), **(context or {})}, status=status)


def _file(ctx: TenantContext, file_id: str) -> TrainingFile:
    file = TrainingFile.objects.for_tenant(ctx.tenant).filter(pk=file_id).first()
    if file is None:
        raise Http404("No such file.")
    return file


def _job(ctx: TenantContext, job_id: str) -> FineTuneJob:
    job = FineTuneJob.objects.for_tenant(ctx.tenant).select_related("base_model", "adapter").filter(pk=job_id).first()
    if job is None:
        raise Http404("No such job.")
    return job


def _adapter(ctx: TenantContext, adapter_id: int) -> Adapter:
    adapter = Adapter.objects.for_tenant(ctx.tenant).select_related("base_model").filter(pk=adapter_id).first()
    if adapter is None:
        raise Http404("No such adapter.")
    return adapter


# ---- files ---------------------------------------------------------------------------------------


@tenant_view(write=Role.DEVELOPER)
def files(request, ctx: TenantContext):
    return _render(request, ctx, "finetune/files.html", {
        "files": TrainingFile.objects.for_tenant(ctx.tenant)[:200],
        "max_bytes": services.MAX_UPLOAD_BYTES, "base_models": base_models.trainable_base_models(ctx.tenant)})


@require_POST
@tenant_view(write=Role.DEVELOPER)
def file_upload(request, ctx: TenantContext):
    """The XHR target of the upload form (multipart `file`, optional `model`): JSON with the file's page, answered once
    the file is stored; a worker validates it (the page shows its progress)."""
    upload = request.FILES.get("file")
    if upload is None:
        return JsonResponse({"error": "Choose a .jsonl file to upload."}, status=400)
    base_model = next((bm for bm in base_models.trainable_base_models(ctx.tenant) if bm.name == request.POST.get("model")), None)
    try:
        file = services.training_file_upload(tenant=ctx.tenant, actor=ctx.actor, filename=upload.name,
                                             content=upload, base_model=base_model)
    except FinetuneError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    return JsonResponse({"id": file.id, "status": file.status,
                         "url": reverse("finetune-file", args=[ctx.tenant.slug, file.id])})


def _cost_previews(ctx: TenantContext, file: TrainingFile) -> list[dict]:
    """Per trainable base model: the tokens a worker counted and the job's cost and time, or `counting` (a worker has
    been asked: no request tokenizes a file)."""
    previews = []
    for bm in base_models.trainable_base_models(ctx.tenant):
        counts = selectors.file_token_counts(file, bm)
        if counts is None:
            services.training_file_request_token_count(file=file, base_model=bm)
            previews.append({"model": bm, "counting": True})
            continue
        epochs = planning.auto_n_epochs_for(counts["examples"] or file.examples)
        previews.append({"model": bm, "counts": counts, "epochs": epochs,
                         **planning.estimate(base_model=bm, tokens_per_epoch=counts["total_tokens"], n_epochs=epochs)})
    return previews


@tenant_view(write=Role.DEVELOPER)
def file_detail(request, ctx: TenantContext, file_id: str):
    file = _file(ctx, file_id)
    problems = file.validation.get("problems", [])[:MAX_SHOWN_PROBLEMS]
    texts = storage.training_file_lines(file, {p["line"] for p in problems if p.get("line")}) if problems else {}
    shown = [{**p, "text": texts.get(p.get("line"), "")} for p in problems]
    previews = _cost_previews(ctx, file) if file.is_valid else []
    return _render(request, ctx, "finetune/file.html", {
        "file": file, "problems": shown, "problem_count": len(file.validation.get("problems", [])) + file.validation.get("problems_omitted", 0),
        "stats": file.validation.get("stats", {}), "previews": previews,
        "status": file_status_data(ctx, file)})


def file_status_data(ctx: TenantContext, file: TrainingFile) -> dict:
    """What the file page polls while the file is validated or its tokens counted."""
    counting = [bm.name for bm in base_models.trainable_base_models(ctx.tenant)
                if file.is_valid and selectors.file_token_counts(file, bm) is None]
    return {"id": file.id, "status": file.status, "status_display": file.get_status_display(),
            "progress": file.progress_percent, "progress_text": file.progress_text,
            "lines_validated": file.lines_validated, "bytes_validated": file.bytes_validated, "bytes": file.bytes,
            "finished": not file.is_validating, "counting": counting}


@require_GET
@tenant_view(write=Role.DEVELOPER)
def file_status(request, ctx: TenantContext, file_id: str):
    return JsonResponse(file_status_data(ctx, _file(ctx, file_id)))


@require_POST
@tenant_view(write=Role.DEVELOPER)
def file_delete(request, ctx: TenantContext, file_id: str):
    file = _file(ctx, file_id)
    try:
        services.training_file_delete(tenant=ctx.tenant, actor=ctx.actor, file=file)
    except FinetuneError as exc:
        messages.error(request, exc.message)
        return redirect("finetune-file", ctx.tenant.slug, file.id)
    messages.success(request, f"Deleted {file.filename}.")
    return redirect("finetune-files", ctx.tenant.slug)


# ---- jobs ----------------------------------------------------------------------------------------


def _auto_or_number(kind):
    def clean(value: str):
        value = (value or "auto").strip()
        if value == "auto":
            return "auto"
        try:
            return kind(value)
        except ValueError:
            raise forms.ValidationError("Enter a number or “auto”.") from None
    return clean


# How the new-job form names a file's format (validation.stats.format).
FORMAT_LABELS = {"chat": "chat", "prompt_completion": "prompt/completion", "preference": "preference (DPO)"}


class FileSelect(forms.Select):
    """A file menu whose options carry their file's format (data-format), so the page can offer only the files the
    chosen method trains on."""

    formats: dict[str, str] = {}

    def create_option(self, name, value, *args, **kwargs):
        option = super().create_option(name, value, *args, **kwargs)
        if self.formats.get(str(value)):
            option["attrs"]["data-format"] = self.formats[str(value)]
        return option


class JobForm(forms.Form):
    method = forms.ChoiceField(choices=[("supervised", "Supervised"), ("dpo", "Preference (DPO)")], initial="supervised",
                               required=False,  # left out: supervised, as the API without `method`
                               help_text="Supervised trains on chat (or prompt/completion) files; preference (DPO) on "
                                         "files of an input with a preferred and a non-preferred answer.")
    training_file = forms.ChoiceField(widget=FileSelect)
    validation_file = forms.ChoiceField(required=False, widget=FileSelect,
                                        help_text="Optional: its loss is reported at each epoch's end. "
                                        "Use examples that are not in the training file.")
    model = forms.ChoiceField(label="Base model")
    n_epochs = forms.CharField(initial="auto", label="Epochs")
    batch_size = forms.CharField(initial="auto")
    learning_rate_multiplier = forms.CharField(initial="auto", label="Learning-rate multiplier")
    beta = forms.CharField(initial="auto", required=False, label="Beta (DPO)",
                           help_text="Preference jobs only: how far the model may move from where it starts; “auto” "
                                     "is 0.1, as OpenAI's.")
    sft_weight = forms.CharField(initial="auto", required=False, label="Preferred-answer weight (DPO)",
                                 help_text="Preference jobs only: also train on the preferred answers themselves, with "
                                           f"this weight (0 = DPO alone; “auto” is {services.DPO_AUTO_SFT_WEIGHT:g}). Keeps a "
                                           "taught ending from repeating.")
    suffix = forms.CharField(required=False, max_length=64, help_text="Part of the model name: ft:base:tenant:suffix:id")
    lora_rank = forms.IntegerField(required=False, min_value=1, max_value=services.MAX_RANK, label="LoRA rank",
                                   help_text="Blank: 16, or the highest rank the base model's pools serve if lower.")
    from_checkpoint = forms.ChoiceField(required=False, label="Start from",
                                        help_text="Continue one of your adapters or checkpoints (same base model; its "
                                                  "rank and modules are kept), or train a new LoRA.")

    def __init__(self, tenant, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Choices come from this tenant's rows only (never an unscoped queryset), so a hand-posted id of another
        # tenant's file is "not one of the available choices": a field error, like a file that does not exist.
        valid = TrainingFile.objects.for_tenant(tenant).filter(purpose="fine-tune", status=TrainingFile.Status.PROCESSED)
        formats = {f.id: (f.validation.get("stats") or {}).get("format") for f in valid}
        choices = [(f.id, f"{f.filename} ({f.id})" + (f" · {FORMAT_LABELS[formats[f.id]]}" if formats[f.id] in FORMAT_LABELS
                                                      else "")) for f in valid]
        for name in ("training_file", "validation_file"):
            self.fields[name].widget.formats = formats
        self.fields["training_file"].choices = choices
        self.fields["validation_file"].choices = [("", "None"), *choices]
        # The page offers only the files of the chosen method's formats (static/finetune/finetune.js); the service
        # refuses any other (wrong_file_format), shown on its field.
        self.fields["method"].widget.attrs["data-formats"] = json.dumps(services.METHOD_FORMATS)
        if not self.is_bound and formats.get(self.initial.get("training_file")) == "preference":
            self.initial["method"] = "dpo"  # "Train with this file" from a preference file's page
        self.fields["model"].choices = [(bm.name, bm.name) for bm in base_models.trainable_base_models(tenant)]
        self.fields["from_checkpoint"].choices = [("", "A new LoRA"), *continuation.start_choices(tenant)]

    def clean_n_epochs(self):
        return _auto_or_number(int)(self.cleaned_data["n_epochs"])

    def clean_batch_size(self):
        return _auto_or_number(int)(self.cleaned_data["batch_size"])

    def clean_learning_rate_multiplier(self):
        return _auto_or_number(float)(self.cleaned_data["learning_rate_multiplier"])

    def clean_method(self):
        return self.cleaned_data["method"] or "supervised"

    def _dpo_number(self, name):
        """"auto", a number, or the text as typed: its limits and messages are the API's (services.
        resolve_hyperparameters), whose refusal lands on this field."""
        value = (self.cleaned_data[name] or "auto").strip()
        try:
            return "auto" if value == "auto" else float(value)
        except ValueError:
            return value

    def clean_beta(self):
        return self._dpo_number("beta")

    def clean_sft_weight(self):
        return self._dpo_number("sft_weight")

    def clean(self):
        data = super().clean()
        for name, label in (("beta", "Beta"), ("sft_weight", "The preferred-answer weight")):
            if data.get("method") != "dpo" and data.get(name) not in (None, "auto"):
                self.add_error(name, f"{label} is a setting of preference (DPO) jobs: leave it at “auto” for a "
                                     "supervised job, or choose the Preference (DPO) method.")
        return data

    def method_request(self) -> tuple[str, dict]:
        """(method type, hyperparameters as requested), through the API's own `method` parser."""
        data = self.cleaned_data
        hp = {k: data[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        if data["method"] == "dpo":
            hp["beta"], hp["sft_weight"] = data["beta"], data["sft_weight"]
        return parse_method({"type": data["method"], data["method"]: {"hyperparameters": hp}}, None)


@tenant_view(write=Role.DEVELOPER)
def jobs(request, ctx: TenantContext):
    return _render(request, ctx, "finetune/jobs.html", {
        "jobs": FineTuneJob.objects.for_tenant(ctx.tenant).select_related("base_model")[:200]})


@tenant_view(write=Role.DEVELOPER)
def job_create(request, ctx: TenantContext):
    form = JobForm(ctx.tenant, request.POST or None, initial={"training_file": request.GET.get("file")})
    estimate = None
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        lora = {"rank": data["lora_rank"]} if data["lora_rank"] else {}
        try:
            method, hp = form.method_request()
            files = {"training_file": data["training_file"], "validation_file": data["validation_file"] or None,
                     "from_checkpoint": data["from_checkpoint"] or None}
            if "estimate" in request.POST:
                plan = services.finetune_job_plan(tenant=ctx.tenant, model=data["model"], **files,
                                                  hyperparameters=hp, lora=lora, method=method)
                estimate = {**plan.estimate, "hyperparameters": plan.hyperparameters, "tokens": plan.tokens,
                            "method": method}
            else:
                job = services.finetune_job_create(tenant=ctx.tenant, actor=ctx.actor, model=data["model"], **files,
                                                   suffix=data["suffix"], hyperparameters=hp, lora=lora, method=method)
                messages.success(request, f"Job {job.id} queued.")
                return redirect("finetune-job", ctx.tenant.slug, job.id)
        except FinetuneError as exc:  # the API's refusals, on the field they name
            field = {"lora.rank": "lora_rank", "method.type": "method"}.get(exc.param, exc.param)
            form.add_error(field if field in form.fields else None, exc.message)
    return _render(request, ctx, "finetune/job_form.html", {"form": form, "estimate": estimate},
                   status=400 if request.method == "POST" and form.errors else 200)


def job_status_data(job: FineTuneJob) -> dict:
    """What the job page polls: status, progress, ETA, the loss series and the latest events."""
    events = JobEvent.objects.for_tenant(job.tenant_id).filter(job=job).order_by("-id")[:30]
    return {
        "id": job.id, "status": job.status, "status_display": job.get_status_display(), "step": job.step, "total_steps": job.total_steps,
        "progress": job.progress_percent, "train_loss": job.train_loss,
        "estimated_finish": job.estimated_finish.isoformat() if job.estimated_finish else None,
        "fine_tuned_model": job.fine_tuned_model or None, "trained_tokens": job.trained_tokens,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "finished": job.status in FineTuneJob.FINISHED_STATUSES,
        "loss": selectors.loss_series(job),
        "events": [{"created_at": e.created_at.isoformat(), "level": e.level, "message": e.message} for e in events],
    }


@tenant_view(write=Role.DEVELOPER)
def job_detail(request, ctx: TenantContext, job_id: str):
    job = _job(ctx, job_id)
    skew = system_prompts.skew(ctx.tenant, job) if job.adapter_id else None
    return _render(request, ctx, "finetune/job.html", {"job": job, "status": job_status_data(job), "skew": skew})


@require_GET
@tenant_view(write=Role.DEVELOPER)
def job_status(request, ctx: TenantContext, job_id: str):
    return JsonResponse(job_status_data(_job(ctx, job_id)))


@require_POST
@tenant_view(write=Role.DEVELOPER)
def job_cancel(request, ctx: TenantContext, job_id: str):
    job = _job(ctx, job_id)
    try:
        services.finetune_job_cancel(tenant=ctx.tenant, actor=ctx.actor, job=job)
        messages.success(request, f"Job {job.id} cancelled; completed steps are billed.")
    except FinetuneError as exc:
        messages.error(request, exc.message)
    return redirect("finetune-job", ctx.tenant.slug, job.id)


# ---- adapters ------------------------------------------------------------------------------------


@tenant_view(write=Role.ADMIN)
def adapters(request, ctx: TenantContext):
    from finetune import merge_views

    rows = []
    served = system_prompts.snapshot(ctx.tenant)
    trained_by = {job.adapter_id: job for job in FineTuneJob.objects.for_tenant(ctx.tenant).filter(adapter__isnull=False)}
    for adapter in Adapter.objects.for_tenant(ctx.tenant).select_related("base_model"):
        deployments = AdapterDeployment.objects.for_tenant(ctx.tenant).filter(adapter=adapter).select_related("pool")
        rows.append({"adapter": adapter, "deployments": list(deployments),
                     "pool": pools.pool_for_adapter(ctx.tenant, adapter.base_model),
                     "skew": system_prompts.skew(ctx.tenant, trained_by.get(adapter.pk), served)})
    return _render(request, ctx, "finetune/adapters.html", {"rows": rows, **merge_views.adapters_context(ctx, rows)})


@require_POST
@tenant_view(write=Role.ADMIN)
def adapter_deploy(request, ctx: TenantContext, adapter_id: int):
    adapter = _adapter(ctx, adapter_id)
    try:
        deployment = deploy.adapter_deploy(tenant=ctx.tenant, adapter=adapter, actor=ctx.actor)
    except deploy.DeployError as exc:
        messages.error(request, str(exc))
        return redirect("finetune-adapters", ctx.tenant.slug)
    level = messages.success if deployment.state == "active" else messages.warning
    level(request, f"{adapter.name} on {deployment.pool.name}: {deployment.get_state_display()}. {deployment.error}".strip())
    skew = system_prompts.skew(ctx.tenant, system_prompts.job_for_adapter(ctx.tenant, adapter))
    if skew is not None:
        messages.warning(request, f"{adapter.name}: {skew.message}")
    return redirect("finetune-adapters", ctx.tenant.slug)


@require_POST
@tenant_view(write=Role.ADMIN)
def adapter_undeploy(request, ctx: TenantContext, adapter_id: int):
    adapter = _adapter(ctx, adapter_id)
    removed_from = deploy.adapter_undeploy(tenant=ctx.tenant, adapter=adapter, actor=ctx.actor)
    messages.success(request, f"{adapter.name} removed from {', '.join(removed_from) or 'no pool'}.")
    return redirect("finetune-adapters", ctx.tenant.slug)


# ---- capacity planner ----------------------------------------------------------------------------


class PlannerForm(forms.Form):
    pool = forms.ChoiceField()
    rank = forms.IntegerField(required=False, min_value=1, max_value=services.MAX_RANK,
                              help_text="Blank = the highest rank the pool serves.")
    targets = forms.MultipleChoiceField(choices=[(m, m) for m in lora_math.LLAMA_LINEAR_MODULES],
                                        widget=forms.CheckboxSelectMultiple, required=False,
                                        help_text="None ticked = all linear layers.")
    memory_gb = forms.FloatField(required=False, min_value=0.001, label="Memory for adapters (GB)",
                                 help_text="Default: the pool's GPU memory per backend.")

    def __init__(self, pools, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pools = {str(p.pk): p for p in pools}
        self.fields["pool"].choices = [(str(p.pk), f"{p.name} ({p.base_model.name})") for p in pools]


@require_GET
@tenant_view(write=Role.ADMIN)
def planner(request, ctx: TenantContext):
    reachable = list(pools.pools_for_tenant(ctx.tenant))
    form = PlannerForm(reachable, request.GET or None)
    plan = error = None
    if request.GET and form.is_valid():
        pool = form.pools[form.cleaned_data["pool"]]
        budget = form.cleaned_data["memory_gb"] or pool.gpu_memory_gb
        rank = form.cleaned_data["rank"] or pool.max_lora_rank
        if rank > pool.max_lora_rank:
            form.add_error("rank", f"The {pool.name} pool serves LoRA ranks up to {pool.max_lora_rank}; "
                                   "an adapter of a higher rank cannot be served there.")
            return _render(request, ctx, "finetune/planner.html", {"form": form, "plan": None, "error": None})
        try:
            plan = pools.capacity_plan(pool=pool, rank=rank,
                                       target_modules=form.cleaned_data["targets"] or "all-linear",
                                       memory_budget_gb=budget)
            plan.update(pool=pool, budget_gb=budget)
        except (ValueError, KeyError, ZeroDivisionError) as exc:
            error = f"{pool.base_model.name} lacks the architecture figures the planner needs ({exc}); ask staff to fill them in."
    return _render(request, ctx, "finetune/planner.html", {"form": form, "plan": plan, "error": error})

