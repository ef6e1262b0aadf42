"""Staff tools. Staff see every tenant (the admin uses the `all_tenants` managers by design)."""

from __future__ import annotations

from django.contrib import admin, messages

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, PlatformSettings, Policy, SystemPromptVersion, Tenant
from tenants.selectors import effective_quota_tokens


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


class PolicyInline(admin.StackedInline):
    model = Policy
    can_delete = False


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "status", "tenancy", "weight", "derived_quota", "created_at"]
    list_filter = ["status", "tenancy"]
    search_fields = ["slug", "name"]
    readonly_fields = ["created_at", "active_prompt"]
    inlines = [PolicyInline, MembershipInline]
    actions = ["suspend", "reactivate"]

    @admin.display(description="weight")
    def weight(self, obj):
        return obj.policy.weight

    @admin.display(description="quota in force (tokens/window)")
    def derived_quota(self, obj):
        quota = effective_quota_tokens(obj.policy)
        return f"{quota:,}" if quota else "unlimited"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("policy")

    @admin.action(description="Suspend selected tenants (their API calls are refused)")
    def suspend(self, request, queryset):
        for tenant in queryset:
            services.tenant_set_status(tenant=tenant, status="suspended", actor=services.Actor(user=request.user), reason="Suspended by staff.")
        self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.SUCCESS)

    @admin.action(description="Reactivate selected tenants")
    def reactivate(self, request, queryset):
        for tenant in queryset:
            services.tenant_set_status(tenant=tenant, status="active", actor=services.Actor(user=request.user))
        self.message_user(request, f"Reactivated {queryset.count()} tenant(s).", messages.SUCCESS)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role"]
    search_fields = ["user__email", "user__username", "tenant__slug"]
    autocomplete_fields = ["user", "tenant"]


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ["email", "tenant", "role", "state", "created_at", "expires_at"]
    list_filter = ["role"]
    search_fields = ["email", "tenant__slug"]
    exclude = ["token_hash"]
    readonly_fields = ["accepted_at", "accepted_by", "revoked_at", "invited_by"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["prefix", "name", "tenant", "scopes", "state", "created_at", "last_used_at", "expires_at"]
    list_filter = ["revoked_at", "tenant"]
    search_fields = ["prefix", "name", "tenant__slug"]
    exclude = ["secret_hash"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at", "created_by"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are created in the console or the API, where the secret can be shown once

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            services.api_key_revoke(key=key, actor=services.Actor(user=request.user))
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)


@admin.register(SystemPromptVersion)
class SystemPromptVersionAdmin(admin.ModelAdmin):
    list_display = ["tenant", "version", "note", "author", "created_at"]
    search_fields = ["tenant__slug", "note", "text"]
    readonly_fields = ["tenant", "version", "text", "note", "author", "created_at"]

    def has_add_permission(self, request):
        return False


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    list_display = ["tenant", "weight", "fair_share", "quota_tokens", "quota_window", "quota_mode", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests"]
    list_filter = ["quota_mode", "quota_window", "fair_share"]
    search_fields = ["tenant__slug"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and form.changed_data:
            services.audit_record(tenant=obj.tenant, actor=services.Actor(user=request.user), action="policy.updated", target=obj, data={"fields": form.changed_data})


@admin.register(PlatformSettings)
class PlatformSettingsAdmin(admin.ModelAdmin):
    list_display = ["__str__", "fair_share_total_tokens", "updated_at"]

    def has_add_permission(self, request):
        return not PlatformSettings.objects.exists()


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "tenant", "action", "actor", "actor_key", "target_type", "target_id"]
    list_filter = ["action", "actor_is_staff"]
    search_fields = ["tenant__slug", "action", "actor__email"]
    readonly_fields = [f.name for f in AuditEvent._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
