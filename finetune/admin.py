"""Staff admin for fine-tuning rows (serving's Adapter / AdapterDeployment / BackendPool are serving's to register).

`mark_pools_restarted` is the TGI rolling-restart action: attach it to serving's BackendPool admin
(`actions = [mark_pools_restarted]`).
"""

from django.contrib import admin

from finetune import deploy
from finetune.models import Evaluation, FineTuneJob, JobCheckpoint, JobEvent, TrainingFile, TrainingUsage
from tenants.admin import AllTenantsAdmin
from tenants.services import Actor


@admin.register(TrainingFile)
class TrainingFileAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("id", "tenant", "filename", "bytes", "status", "created_at")
    list_filter = ("status",)
    search_fields = ("id", "filename", "tenant__slug")
    readonly_fields = ("id", "tenant", "filename", "purpose", "bytes", "path", "status", "base_model", "lines_validated",
                       "bytes_validated", "progress_at", "validated_at", "validation", "token_counts", "created_at")


class JobEventInline(AllTenantsAdmin, admin.TabularInline):
    model = JobEvent
    fields = ("created_at", "level", "type", "message", "data")
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("-id",)


class JobCheckpointInline(AllTenantsAdmin, admin.TabularInline):
    model = JobCheckpoint
    fields = ("step", "epoch", "path", "metrics", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(FineTuneJob)
class FineTuneJobAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("id", "tenant", "base_model", "status", "step", "total_steps", "trained_tokens", "attempts", "created_at")
    list_filter = ("status", "base_model")
    search_fields = ("id", "fine_tuned_model", "tenant__slug")
    # Operational state (status, steps, hyperparameters, the model's name) belongs to the trainer and the API: a hand
    # edit would show the tenant a job that never ran that way. Staff read it; cancelling is the tenant's API call.
    readonly_fields = tuple(f.name for f in FineTuneJob._meta.fields)
    inlines = [JobCheckpointInline, JobEventInline]

    def has_add_permission(self, request):
        return False


@admin.register(JobCheckpoint)
class JobCheckpointAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("job", "tenant", "step", "epoch", "created_at")
    search_fields = ("job__id",)


@admin.register(TrainingUsage)
class TrainingUsageAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("job", "tenant", "base_model", "trained_tokens", "created_at")
    list_filter = ("base_model",)
    readonly_fields = ("tenant", "job", "base_model", "trained_tokens", "created_at")


@admin.register(Evaluation)
class EvaluationAdmin(AllTenantsAdmin, admin.ModelAdmin):
    """Read-only: an evaluation's numbers come from its worker (finetune/evaluation.py); its rows are in the API."""

    list_display = ("id", "tenant", "model", "status", "rows_done", "rows_total", "created_at")
    list_filter = ("status",)
    search_fields = ("id", "model", "tenant__slug")
    readonly_fields = tuple(f.name for f in Evaluation._meta.fields)

    def has_add_permission(self, request):
        return False


@admin.action(description="Mark restarted: backends now serve the pool's LORA_ADAPTERS (TGI)")
def mark_pools_restarted(modeladmin, request, queryset):
    for pool in queryset:
        deploy.pool_mark_restarted(pool=pool, actor=Actor(user=request.user))
    modeladmin.message_user(request, f"{queryset.count()} pool(s) marked restarted.")


# The TGI rolling-restart step belongs with adapter deployment; serving does not depend on finetune, so
# finetune adds the action to the pools' admin.
from serving.admin import BackendPoolAdmin  # noqa: E402

BackendPoolAdmin.actions = [*BackendPoolAdmin.actions, mark_pools_restarted]


# ---- merged models (finetune/merge.py): serving's MergedModel, registered here because its actions are finetune's ----

from finetune import merge as _merge  # noqa: E402
from finetune import planning as _planning  # noqa: E402
from serving.models import MergedModel  # noqa: E402


@admin.action(description="Serve: the pool's backends run the merged folder now (each must list its name at /v1/models)")
def serve_merged_models(modeladmin, request, queryset):
    from django.contrib import messages

    for merged in queryset.select_related("adapter", "pool", "tenant"):
        try:
            _merge.merged_model_serve(merged=merged, actor=Actor(user=request.user))
        except _merge.MergeRefused as exc:
            modeladmin.message_user(request, f"{merged.adapter.name}: {exc.message}", messages.ERROR)
        else:
            modeladmin.message_user(request, f"{merged.adapter.name} serves on {merged.pool.name}.", messages.SUCCESS)


@admin.action(description="Stop serving (before restarting the pool's backends on the base model)")
def stop_merged_models(modeladmin, request, queryset):
    for merged in queryset.select_related("adapter", "pool", "tenant"):
        _merge.merged_model_stop(merged=merged, actor=Actor(user=request.user))
        modeladmin.message_user(request, f"{merged.adapter.name}: {merged.get_state_display()}.")


@admin.register(MergedModel)
class MergedModelAdmin(AllTenantsAdmin, admin.ModelAdmin):
    """Staff's side of merged models: where the folder is and the command that serves it, its size and the GPU memory
    the pool needs (finetune.planning.merged_model_plan), Serve / Stop serving."""

    list_display = ("adapter", "tenant", "pool", "state", "size_bytes", "gpu_memory_needed", "serving_since", "error")
    list_filter = ("state", "pool")
    search_fields = ("adapter__name", "tenant__slug")
    readonly_fields = ("tenant", "adapter", "pool", "state", "path", "serve_command", "parameters", "size_bytes",
                       "weights_bytes", "dtype", "gpu_memory_needed", "error", "created_at", "finished_at", "serving_since")
    fields = readonly_fields
    actions = [serve_merged_models, stop_merged_models]

    def has_add_permission(self, request) -> bool:
        return False  # tenants ask for merges (console, API); staff serve them

    @admin.display(description="GPU memory needed per backend")
    def gpu_memory_needed(self, merged: MergedModel) -> str:
        from django.template.defaultfilters import filesizeformat

        plan = _planning.merged_model_plan(pool=merged.pool, merged=merged)
        if not plan["known"]:
            return f"unknown: fill in {merged.pool.base_model.name}'s architecture"
        verdict = "" if plan["fits"] is None else (" (fits)" if plan["fits"] else " (does not fit)")
        return (f"{filesizeformat(plan['need_bytes'])}: weights {filesizeformat(plan['weights_gpu_bytes'])} + KV cache "
                f"{filesizeformat(plan['kv_cache_bytes'])}, of {filesizeformat(plan['available_bytes'])} usable{verdict}")

    @admin.display(description="Serve it with")
    def serve_command(self, merged: MergedModel) -> str:
        if not merged.path:
            return "(not merged yet)"
        return (f"vllm serve {merged.path} --served-model-name {merged.served_name}   |   "
                f"python -m devbackend --model {merged.path}")
