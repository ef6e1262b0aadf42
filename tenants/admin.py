"""Staff tools. Staff see every tenant: every admin below that shows tenant-owned rows, or offers them as choices,
inherits `AllTenantsAdmin`, the one place the admin reads `all_tenants` (the default manager refuses, see
tenants.scoping). serving, finetune and billing use the same mixin for theirs.

Staff changes go through the same services as the console and the API: the same rules (a tenant keeps an owner,
a suspension has a reason, the slug never changes) and the same audit events, recorded with `actor_is_staff`.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.exceptions import NotRegistered
from django.contrib.admin.widgets import AutocompleteSelect
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import transaction

from tenants import services
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, PlatformSettings, Policy, Role, SystemPromptVersion, Tenant
from tenants.scoping import TenantOwnedModel, all_tenants_by_default, foreign_key_formfield
from tenants.selectors import effective_quota_tokens


class AllTenantsInlineFormSet(forms.models.BaseInlineFormSet):
    """An admin inline's formset over tenant-owned rows: its hidden row-id field chooses among every tenant's rows
    (Django builds it from the default manager, which refuses)."""

    def add_fields(self, form, index):
        with all_tenants_by_default(self.model):
            super().add_fields(form, index)


class AllTenantsAdmin:
    """Mixin for a ModelAdmin or inline over tenant-owned rows, or with foreign keys to them: staff see every tenant.

    Django's admin asks a model's default manager for its rows and for a foreign key's choices; a tenant-owned
    model's refuses (tenants.scoping), so this asks `all_tenants`, loudly and only for staff. An inline's formset
    must be an AllTenantsInlineFormSet.
    """

    formset = AllTenantsInlineFormSet  # used by inlines only

    def get_queryset(self, request):
        if not issubclass(self.model, TenantOwnedModel):
            return super().get_queryset(request)
        qs = self.model.all_tenants.get_queryset()  # all_tenants: the staff admin sees every tenant's rows
        ordering = self.get_ordering(request)
        return qs.order_by(*ordering) if ordering else qs

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if not issubclass(db_field.remote_field.model, TenantOwnedModel):
            return super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name in self.raw_id_fields or db_field.name in self.radio_fields:
            raise ImproperlyConfigured(f"{type(self).__name__}.{db_field.name}: list it in autocomplete_fields or as a plain "
                                       "select; raw-id and radio widgets look tenant-owned rows up unscoped.")
        db = kwargs.get("using")
        if "widget" not in kwargs and db_field.name in self.get_autocomplete_fields(request):
            kwargs["widget"] = AutocompleteSelect(db_field, self.admin_site, using=db)
        kwargs.setdefault("queryset", self.get_field_queryset(db, db_field, request))
        return foreign_key_formfield(db_field, **kwargs)

    def get_field_queryset(self, db, db_field, request):
        related = db_field.remote_field.model
        if not issubclass(related, TenantOwnedModel):
            return super().get_field_queryset(db, db_field, request)
        try:
            ordering = self.admin_site.get_model_admin(related).get_ordering(request)
        except NotRegistered:
            ordering = None
        qs = related.all_tenants.using(db)  # all_tenants: staff may pick any tenant's row
        return qs.order_by(*ordering) if ordering else qs


def _staff(request) -> services.Actor:
    return services.Actor(user=request.user)


class MembershipFormSet(AllTenantsInlineFormSet):
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


class MembershipInline(AllTenantsAdmin, admin.TabularInline):
    model = Membership
    formset = MembershipFormSet
    extra = 0
    autocomplete_fields = ["user"]

    def get_readonly_fields(self, request, obj=None):
        return ["user"] if obj is not None else []  # a row is a member: change the role, or remove the row


class PolicyInline(AllTenantsAdmin, admin.StackedInline):
    model = Policy
    can_delete = False


class TenantAdminForm(forms.ModelForm):
    class Meta:
        model = Tenant
        # `active_prompt` is read-only here (prompts are versioned through the services); a choice field over it
        # would ask SystemPromptVersion's default manager, which refuses to list every tenant's prompts.
        exclude = ["active_prompt"]

    def clean(self):
        data = super().clean()
        if data.get("status") == Tenant.Status.SUSPENDED and not (data.get("suspended_reason") or "").strip():
            self.add_error("suspended_reason", "Say why: the tenant's admins see this reason on every refused call.")
        return data


@admin.register(Tenant)
class TenantAdmin(AllTenantsAdmin, admin.ModelAdmin):
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
class MembershipAdmin(AllTenantsAdmin, admin.ModelAdmin):
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
class InvitationAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ["email", "tenant", "role", "state", "created_at", "expires_at"]
    list_filter = ["role"]
    search_fields = ["email", "tenant__slug"]
    exclude = ["token_hash"]
    readonly_fields = ["accepted_at", "accepted_by", "revoked_at", "invited_by"]


@admin.register(ApiKey)
class ApiKeyAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ["prefix", "name", "tenant", "scopes", "state", "created_at", "last_used_at", "expires_at"]
    list_filter = ["revoked_at", "tenant"]
    search_fields = ["prefix", "name", "tenant__slug"]
    exclude = ["secret_hash", "previous_secret_hash"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at", "created_by", "previous_valid_until", "rotated_at"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are created in the console or the API, where the secret can be shown once

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            services.api_key_revoke(key=key, actor=services.Actor(user=request.user))
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)


@admin.register(SystemPromptVersion)
class SystemPromptVersionAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ["tenant", "version", "note", "author", "created_at"]
    search_fields = ["tenant__slug", "note", "text"]
    readonly_fields = ["tenant", "version", "text", "note", "author", "created_at"]

    def has_add_permission(self, request):
        return False


@admin.register(Policy)
class PolicyAdmin(AllTenantsAdmin, admin.ModelAdmin):
    list_display = ["tenant", "weight", "fair_share", "quota_tokens", "quota_window", "quota_mode", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests", "budget_ceiling_cents"]
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
class AuditEventAdmin(AllTenantsAdmin, admin.ModelAdmin):
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
