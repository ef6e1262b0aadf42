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
