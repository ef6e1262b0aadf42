"""Staff admin for what the gateway routes to, and the usage ledger (read-only)."""

from __future__ import annotations

from django.contrib import admin, messages

from serving import adapter_loads
from serving.models import Adapter, AdapterDeployment, Backend, BackendPool, BaseModel, ModelConfig, UsageRecord
from tenants.admin import AllTenantsAdmin


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ("name", "hf_id", "context_length", "available_to_all", "created_at")
    list_filter = ("available_to_all",)
    search_fields = ("name", "hf_id")


class BackendInline(admin.TabularInline):
    model = Backend
    extra = 0
    fields = ("url", "max_concurrency", "enabled", "healthy", "last_checked_at", "last_error", "loaded_adapters", "needs_restart")
    # Health is written by the gateways' health checker; staff only enable/disable.
    readonly_fields = ("healthy", "last_checked_at", "last_error")


@admin.register(BackendPool)
class BackendPoolAdmin(admin.ModelAdmin):
    list_display = ("name", "base_model", "kind", "dedicated_tenant", "capacity", "backends_healthy")
    list_filter = ("kind", "base_model")
    search_fields = ("name",)
    inlines = [BackendInline]
    actions: list = []  # finetune/admin.py adds the TGI "mark restarted" step

    def save_formset(self, request, form, formset, change):
        super().save_formset(request, form, formset, change)
        for backend_form in formset.forms:
            _note_enabled_again(backend_form)

    @admin.display(description="healthy / enabled backends")
    def backends_healthy(self, pool: BackendPool) -> str:
        enabled = [b for b in pool.backends.all() if b.enabled]
        return f"{sum(b.healthy for b in enabled)} / {len(enabled)}"


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    list_display = ("url", "pool", "enabled", "healthy", "last_checked_at", "last_error", "max_concurrency", "needs_restart")
    list_filter = ("enabled", "healthy", "pool")
    readonly_fields = ("healthy", "last_checked_at", "last_error")
    search_fields = ("url",)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        _note_enabled_again(form)


def _note_enabled_again(form) -> None:
    """A backend enabled again is a change: the adapters it refused are asked of it again (serving.adapter_loads)."""
    backend = form.instance
    if backend.pk and backend.enabled and "enabled" in form.changed_data:
        adapter_loads.backend_refusals_forget(backend)


@admin.register(Adapter)
class AdapterAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("name", "tenant", "base_model", "rank", "size_bytes", "created_at")
    list_filter = ("base_model",)
    search_fields = ("name", "tenant__slug")


@admin.action(description="Retry deployment: ask the pool's backends to load it again, those that refused it included")
def retry_deployments(modeladmin, request, queryset):
    from tenants.services import Actor

    retried = 0
    for deployment in queryset.select_related("adapter", "pool", "tenant"):
        if deployment.pool.kind not in adapter_loads.RUNTIME_KINDS:
            modeladmin.message_user(request, f"{deployment.adapter.name}: TGI pools load adapters at a restart (pool action "
                                             "'Mark restarted').", messages.WARNING)
            continue
        adapter_loads.deployment_retry(deployment=deployment, actor=Actor(user=request.user))
        deployment.refresh_from_db()
        retried += 1
        level = messages.SUCCESS if deployment.state == AdapterDeployment.State.ACTIVE else messages.WARNING
        modeladmin.message_user(request, f"{deployment.adapter.name} on {deployment.pool.name}: {deployment.get_state_display()}. "
                                         f"{deployment.error}".strip(), level)
    return retried


@admin.register(AdapterDeployment)
class AdapterDeploymentAdmin(AllTenantsAdmin, admin.ModelAdmin):
    """A deployment's `error` is what the tenant sees; `error_detail` (the backends' own answers) is for staff."""

    list_display = ("adapter", "tenant", "pool", "state", "error", "created_at")
    list_filter = ("state", "pool")
    search_fields = ("adapter__name", "tenant__slug")
    readonly_fields = ("state", "error", "error_detail", "failed_on")
    actions = [retry_deployments]


@admin.register(ModelConfig)
class ModelConfigAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ("tenant", "default_model", "default_max_tokens", "max_max_tokens", "system_message_rule")
    search_fields = ("tenant__slug",)


@admin.register(UsageRecord)
class UsageRecordAdmin(AllTenantsAdmin, admin.ModelAdmin):
    """The ledger is written once by the gateway and read by billing: staff can look, never edit."""

    list_display = ("created_at", "tenant", "endpoint", "model", "adapter", "pool", "status", "input_tokens", "output_tokens", "ttft_ms", "duration_ms")
    list_filter = ("status", "endpoint", "pool", "tenant", "created_at")
    search_fields = ("request_id", "model", "tenant__slug")
    date_hierarchy = "created_at"
    list_select_related = ("tenant", "pool")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
