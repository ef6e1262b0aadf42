"""The console's page for uploading a tenant's own LoRA adapter (finetune/byo.py), under t/<tenant_slug>/finetune/.

Admins and owners only (uploading serves the adapter, as deploying does); the checks and the deployment are the API's
(`byo.adapter_upload`).
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.shortcuts import redirect

from finetune import byo
from finetune.services import FinetuneError
from finetune.views import _render
from serving.selectors import base_models_for_tenant
from tenants.access import TenantContext, tenant_view
from tenants.models import Role


class AdapterUploadForm(forms.Form):
    model = forms.ChoiceField(label="Base model", required=False,
                              help_text="The model the adapter was trained on; blank: the one its adapter_config.json names.")
    suffix = forms.RegexField(regex=byo.SUFFIX_RE, required=False, max_length=64,
                              help_text="Part of its model name (letters, digits, '-', '_', '.').")
    deploy = forms.BooleanField(required=False, initial=True, label="Deploy it once it is checked")

    def __init__(self, *args, tenant, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [("", "(as adapter_config.json says)")] + [
            (bm.name, bm.name) for bm in base_models_for_tenant(tenant)]


@tenant_view(read=Role.ADMIN, write=Role.ADMIN)
def adapter_upload(request, ctx: TenantContext):
    form = AdapterUploadForm(request.POST or None, tenant=ctx.tenant)
    problems: list[str] = []
    if request.method == "POST" and form.is_valid():
        try:
            outcome = byo.adapter_upload(tenant=ctx.tenant, actor=ctx.actor,
                                         parts=byo.parts_from_files(request.FILES.getlist("file")),
                                         model=form.cleaned_data["model"] or None,
                                         suffix=form.cleaned_data["suffix"] or None, deploy=form.cleaned_data["deploy"])
        except FinetuneError as exc:
            problems = getattr(exc, "problems", None) or [exc.message]
        else:
            name, deployment = outcome.adapter.name, outcome.deployment
            if deployment is None:
                messages.warning(request, f"{name} is stored and not deployed: {outcome.not_deployed}")
            else:
                level = messages.success if deployment.state == "active" else messages.warning
                level(request, f"{name} on {deployment.pool.name}: {deployment.get_state_display()}. "
                               f"{deployment.error}".strip())
            return redirect("finetune-adapters", ctx.tenant.slug)
    return _render(request, ctx, "finetune/adapter_upload.html", {
        "form": form, "problems": problems, "max_bytes": byo.max_upload_bytes()}, status=400 if problems else 200)
