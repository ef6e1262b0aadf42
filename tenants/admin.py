"""Staff tools. Staff see every tenant (the admin uses the `all_tenants` managers by design).

Staff changes go through the same services as the console and the API: the same rules (a tenant keeps an owner,
a suspension has a reason, the slug never changes) and the same audit events, recorded with `actor_is_staff`.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db import transaction

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, PlatformSettings, Policy, Role, SystemPromptVersion, Tenant
from tenants.selectors import effective_quota_tokens


def _staff(request) -> services.Actor:
    return services.Actor(user=request.user)


class MembershipFormSet(forms.models.BaseInlineFormSet):
    def clean(self):
        super().clean()
        if self.instance.pk is None:
            return
        owners = 0
        for form in self.forms:
            data = getattr(form, "cleaned_data", None) or {}
            if not data or data.get("DELETE"):
                continue
            owners += data.get("role") == Role.OWNER
        if owners == 0:
            raise ValidationError("A tenant must keep at least one owner: make someone else owner first.")


class MembershipInline(admin.TabularInline):
    model = Membership
    formset = MembershipFormSet
    extra = 0
    autocomplete_fields = ["user"]

    def get_readonly_fields(self, request, obj=None):
        return ["user"] if obj is not None else []  # a row is a member: change the role, or remove the row


class PolicyInline(admin.StackedInline):
    model = Policy
    can_delete = False


class TenantAdminForm(forms.ModelForm):
    class Meta:
        model = Tenant
        fields = "__all__"

    def clean(self):
        data = super().clean()
        if data.get("status") == Tenant.Status.SUSPENDED and not (data.get("suspended_reason") or "").strip():
            self.add_error("suspended_reason", "Say why: the tenant's admins see this reason on every refused call.")
        return data


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "status", "tenancy", "weight", "derived_quota", "created_at"]
    list_filter = ["status", "tenancy"]
    search_fields = ["slug", "name"]
    form = TenantAdminForm
    inlines = [PolicyInline, MembershipInline]
    actions = ["suspend", "reactivate"]

    def get_readonly_fields(self, request, obj=None):
        fields = ["created_at", "active_prompt"]
        return fields + ["slug"] if obj is not None else fields  # the slug is in URLs and keys' history: permanent

    @transaction.atomic
    def save_model(self, request, obj, form, change):
        if not change:
            return super().save_model(request, obj, form, change)
        current = Tenant.objects.get(pk=obj.pk)
        if "name" in form.changed_data:
            services.tenant_rename(tenant=current, name=obj.name, actor=_staff(request))
        if {"status", "suspended_reason"} & set(form.changed_data):
            services.tenant_set_status(tenant=current, status=obj.status, actor=_staff(request), reason=obj.suspended_reason.strip())
        other = [f for f in form.changed_data if f not in ("name", "status", "suspended_reason")]
        if other:
            Tenant.objects.filter(pk=obj.pk).update(**{f: getattr(obj, f) for f in other})
            services.audit_record(tenant=current, actor=_staff(request), action="tenant.updated", target=current,
                                  data={f: {"from": getattr(current, f), "to": getattr(obj, f)} for f in other})

    @transaction.atomic
    def save_formset(self, request, form, formset, change):
        tenant = form.instance
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []  # the admin's history message
        if formset.model is Policy:
            for f in formset.forms:
                if f.instance.pk is not None and f.has_changed():
                    services.policy_update(tenant=tenant, actor=_staff(request), **{n: f.cleaned_data[n] for n in f.changed_data})
                elif f.instance.pk is None and f.has_changed():
                    f.save()
            return
        if formset.model is Membership:
            actor = _staff(request)
            changed = [f for f in formset.forms if f.has_changed() and not f.cleaned_data.get("DELETE")]
            # New owners first, then the other changes, then removals: the last-owner rule sees the new owners.
            changed.sort(key=lambda f: f.cleaned_data.get("role") != Role.OWNER)
            for f in changed:
                if f.instance.pk is None:
                    membership = f.save()
                    services.audit_record(tenant=tenant, actor=actor, action="member.added", target=membership,
                                          data={"user": membership.user.email, "role": membership.role})
                elif "role" in f.changed_data:
                    membership = Membership.objects.for_tenant(tenant).get(pk=f.instance.pk)
                    services.membership_change_role(membership=membership, role=f.cleaned_data["role"], actor=actor)
            for f in formset.forms:
                if f.instance.pk is not None and f.cleaned_data.get("DELETE"):
                    services.membership_remove(membership=Membership.objects.for_tenant(tenant).get(pk=f.instance.pk), actor=actor)
            return
        super().save_formset(request, form, formset, change)

    @admin.display(description="weight")
    def weight(self, obj):
        return obj.policy.weight

    @admin.display(description="quota in force (tokens/window)")
    def derived_quota(self, obj):
        quota = effective_quota_tokens(obj.policy)
        return f"{quota:,}" if quota else "unlimited"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("policy")

    @admin.action(description="Suspend selected tenants (their API calls are refused; open a tenant to give a specific reason)")
    def suspend(self, request, queryset):
        for tenant in queryset:
            services.tenant_set_status(tenant=tenant, status="suspended", actor=services.Actor(user=request.user),
                                       reason="Suspended by the platform team: contact support.")
        self.message_user(request, f"Suspended {queryset.count()} tenant(s).", messages.SUCCESS)

    @admin.action(description="Reactivate selected tenants")
    def reactivate(self, request, queryset):
        for tenant in queryset:
            services.tenant_set_status(tenant=tenant, status="active", actor=services.Actor(user=request.user))
        self.message_user(request, f"Reactivated {queryset.count()} tenant(s).", messages.SUCCESS)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    """Read-only list: members are changed on their tenant's page, where the last-owner rule sees every row."""

    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role"]
    search_fields = ["user__email", "user__username", "tenant__slug"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


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

    readonly_fields = ["tenant"]

    def has_add_permission(self, request):
        return False  # every tenant gets its policy when it is created

    def save_model(self, request, obj, form, change):
        services.policy_update(tenant=obj.tenant, actor=_staff(request), **{n: form.cleaned_data[n] for n in form.changed_data})


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
