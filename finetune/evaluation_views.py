"""Console pages of evaluations under t/<tenant_slug>/finetune/evaluations/ (finetune/evaluation.py).

Every member reads; developers and above start one (as they start jobs). Objects are fetched inside the URL's tenant
only (another tenant's id is a 404); the form's menus hold this tenant's adapters, checkpoints and files only.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import Http404, JsonResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_GET

from common.charts import bar_chart
from finetune import continuation
from finetune import evaluation as evaluations
from finetune.models import Evaluation, EvaluationRow, TrainingFile
from finetune.services import FinetuneError
from finetune.views import _render
from tenants.access import TenantContext, tenant_view
from tenants.models import Role

SHOWN_ROWS = 200  # differing rows on the page (the API pages through all of them)


class EvaluationForm(forms.Form):
    model = forms.ChoiceField(label="Adapter or checkpoint",
                              help_text="Its answers are compared with its base model's on the same rows.")
    file = forms.ChoiceField(label="File", help_text="Chat rows: each row's last assistant message is the expected "
                             "answer. Use rows that were not in the training file.")
    max_tokens = forms.IntegerField(initial=evaluations.DEFAULT_MAX_TOKENS, min_value=1,
                                    max_value=evaluations.MAX_TOKENS_LIMIT, label="Longest answer (tokens)")

    def __init__(self, tenant, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = continuation.start_choices(tenant)
        valid = TrainingFile.objects.for_tenant(tenant).filter(purpose="fine-tune", status=TrainingFile.Status.PROCESSED)
        self.fields["file"].choices = [(f.id, f"{f.filename} ({f.id}, {f.examples} rows)") for f in valid]


def _evaluation(ctx: TenantContext, evaluation_id: str) -> Evaluation:
    found = Evaluation.objects.for_tenant(ctx.tenant).select_related("base_model", "adapter").filter(
        pk=evaluation_id).first()
    if found is None:
        raise Http404("No such evaluation.")
    return found


@tenant_view(write=Role.DEVELOPER)
def evaluations_page(request, ctx: TenantContext):
    """The tenant's evaluations and the form that starts one (`?model=` preselects an adapter or checkpoint)."""
    form = EvaluationForm(ctx.tenant, request.POST or None, initial={"model": request.GET.get("model")})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            created = evaluations.evaluation_create(tenant=ctx.tenant, actor=ctx.actor, model=data["model"],
                                                    file=data["file"], max_tokens=data["max_tokens"])
        except FinetuneError as exc:
            form.add_error(exc.param if exc.param in form.fields else None, exc.message)
        else:
            messages.success(request, f"Evaluation {created.id} queued.")
            return redirect("finetune-evaluation", ctx.tenant.slug, created.id)
    shown = list(Evaluation.objects.for_tenant(ctx.tenant).select_related("base_model")[:200])
    for e in shown:
        e.exact_text = (f"{_percent(e.metrics['base']['exact_match'])} → {_percent(e.metrics['adapter']['exact_match'])}"
                        if e.metrics else "—")
    return _render(request, ctx, "finetune/evaluations.html", {"form": form, "evaluations": shown},
        status=400 if request.method == "POST" and form.errors else 200)


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def comparison(evaluation: Evaluation) -> list[dict]:
    """The table's rows: metric × (base, adapter), formatted, with which side is better."""
    m = evaluation.metrics or {}
    if not m:
        return []
    base, adapter = m["base"], m["adapter"]
    out = []
    for key, label, fmt, higher in (("exact_match", "Exact match", _percent, True),
                                    ("contains", "Contains the expected answer", _percent, True),
                                    ("loss", "Loss on the expected answer (nats per token)",
                                     lambda v: "—" if v is None else f"{v:.3f}", False)):
        b, a = base.get(key), adapter.get(key)
        better = None if a is None or b is None or a == b else ("adapter" if (a > b) == higher else "base")
        out.append({"key": key, "label": label, "base": fmt(b), "adapter": fmt(a), "better": better})
    return out


def chart(evaluation: Evaluation):
    """Exact match and contains, base and adapter side by side, in percent (the loss is in the table)."""
    m = evaluation.metrics or {}
    if not m:
        return None
    points = [(f"{label} · {side}", round(100 * (m[side][key] or 0), 1))
              for key, label in (("exact_match", "Exact match"), ("contains", "Contains")) for side in ("base", "adapter")]
    return bar_chart(points, unit=" %", fmt=lambda v: f"{v:g} %", min_slots=4)


def _with_prompt_text(rows) -> list[EvaluationRow]:
    """Each row with `prompt_text`: its prompt's last message as text (the question the answers differ on)."""
    from finetune.evaluation_metrics import message_text

    rows = list(rows)
    for r in rows:
        r.prompt_text = message_text(r.prompt[-1].get("content")) if r.prompt else ""
    return rows


def status_data(evaluation: Evaluation) -> dict:
    return {"id": evaluation.id, "status": evaluation.status, "status_display": evaluation.get_status_display(),
            "rows_done": evaluation.rows_done, "rows_total": evaluation.rows_total,
            "progress": evaluation.progress_percent, "finished": evaluation.is_finished,
            "error": evaluation.error_message or None}


@require_GET
@tenant_view(write=Role.DEVELOPER)
def evaluation_detail(request, ctx: TenantContext, evaluation_id: str):
    evaluation = _evaluation(ctx, evaluation_id)
    differing = evaluations.differing_rows(evaluation)
    return _render(request, ctx, "finetune/evaluation.html", {
        "evaluation": evaluation, "status": status_data(evaluation), "comparison": comparison(evaluation),
        "chart": chart(evaluation), "differing": _with_prompt_text(differing[:SHOWN_ROWS]),
        "differing_count": differing.count(),
        "row_count": EvaluationRow.objects.for_tenant(ctx.tenant).filter(evaluation=evaluation).count(),
        "shown_rows": SHOWN_ROWS})


@require_GET
@tenant_view(write=Role.DEVELOPER)
def evaluation_status(request, ctx: TenantContext, evaluation_id: str):
    """What the evaluation page polls while it runs."""
    return JsonResponse(status_data(_evaluation(ctx, evaluation_id)))
