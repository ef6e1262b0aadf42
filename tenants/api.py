"""Management REST API under /api/: tenants, members, invitations, API keys, prompts, policy, audit log.

One view per resource or operation, with nested Input/Output serializers; every write goes through
`tenants.services`. Tenant-scoped views inherit `TenantAPIView` (tenants/api_base.py), which resolves
`<tenant_slug>` through `tenants.access` before any handler runs and hands out objects only through
`Model.objects.for_tenant`. The reference page is tenants/api_docs.py.
"""

from __future__ import annotations

from django.core.exceptions import PermissionDenied, ValidationError
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from tenants import services
from tenants.api_auth import KeyPrincipal
from tenants.api_base import (MANAGEMENT_SCOPES, STAFF, TENANT_SLUG, StrictCharField, TenantAPIView, email_of,
                              paginate, validated_input)
from tenants.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Policy,
    Role,
    SystemPromptVersion,
    Tenant,
)
from tenants.selectors import effective_quota_tokens, memberships_for_user, prompt_diff_shown


# ---- tenants ---------------------------------------------------------------------------------------


class TenantOutput(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    status = serializers.CharField()
    tenancy = serializers.CharField()
    created_at = serializers.DateTimeField()
    role = serializers.CharField(allow_null=True, help_text="Your role; null for an API key.")


def _tenant_data(tenant: Tenant, role: str | None) -> dict:
    return {"slug": tenant.slug, "name": tenant.name, "status": tenant.status, "tenancy": tenant.tenancy, "created_at": tenant.created_at, "role": role}


class TenantListApi(APIView):
    """The caller's tenants (an API key: its own). Not tenant-scoped: it lists the caller's memberships."""

    pagination_class = api_settings.DEFAULT_PAGINATION_CLASS

    @extend_schema(operation_id="tenants_list", responses=TenantOutput(many=True))
    def get(self, request):
        """List the tenants you are a member of, with your role in each (paginated). Any signed-in user. An API key
        sees only its own tenant (role null) and needs management:read or management:write, else 403.
        """
        if isinstance(request.user, KeyPrincipal):
            key = request.auth
            if not any(key.has_scope(s) for s in MANAGEMENT_SCOPES):
                raise PermissionDenied(f"This API key lacks the '{ApiKey.Scope.MANAGEMENT_READ}' scope.")
            rows = [_tenant_data(key.tenant, None)]
        else:
            rows = [_tenant_data(m.tenant, m.role) for m in memberships_for_user(request.user)]
        return paginate(self, rows, TenantOutput)


class TenantDetailApi(TenantAPIView):
    @extend_schema_serializer(component_name="TenantUpdateInput")
    class InputSerializer(serializers.Serializer):
        name = StrictCharField(max_length=120)

    @extend_schema(operation_id="tenants_retrieve", parameters=[TENANT_SLUG], responses=TenantOutput)
    def get(self, request, tenant_slug):
        """The tenant's name, status, tenancy and your role. Any member, or an API key with management:read or
        management:write. 404 when you are not a member of the tenant (or the key is another tenant's).
        """
        return Response(_tenant_data(self.ctx.tenant, self.ctx.role))

    @extend_schema(operation_id="tenants_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=TenantOutput)
    def patch(self, request, tenant_slug):
        """Rename the tenant (the display name; the slug never changes). Admins and owners, or an API key with
        management:write. 400 for a missing or invalid name (max 120 characters); 403 below admin or without the
        scope; 404 when the tenant is not yours.
        """
        data = validated_input(self.InputSerializer, request)
        tenant = services.tenant_rename(tenant=self.ctx.tenant, name=data["name"], actor=self.ctx.actor)
        return Response(_tenant_data(tenant, self.ctx.role))


# ---- members ---------------------------------------------------------------------------------------


class MemberOutput(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.CharField(source="user.email")
    username = serializers.CharField(source="user.username")
    role = serializers.CharField()
    created_at = serializers.DateTimeField()


class MemberListApi(TenantAPIView):
    @extend_schema(operation_id="members_list", parameters=[TENANT_SLUG], responses=MemberOutput(many=True))
    def get(self, request, tenant_slug):
        """List the tenant's members with their roles (paginated). Any member, or an API key with management:read or
        management:write. 404 when the tenant is not yours.
        """
        return paginate(self, self.scoped(Membership).select_related("user"), MemberOutput)


class MemberDetailApi(TenantAPIView):
    """Change a member's role, or remove them. Any member may remove themselves (leave)."""

    write_role = Role.VIEWER  # leaving is open to everyone; removing others is checked per request below

    @extend_schema_serializer(component_name="MemberRoleInput")
    class InputSerializer(serializers.Serializer):
        role = StrictCharField()

    def _membership(self, membership_id: int) -> Membership:
        return self.get_scoped_or_404(Membership, pk=membership_id)

    @extend_schema(operation_id="members_retrieve", parameters=[TENANT_SLUG], responses=MemberOutput)
    def get(self, request, tenant_slug, membership_id):
        """One member and their role. Any member, or an API key with management:read or management:write. 404 for a
        membership id that is not this tenant's.
        """
        return Response(MemberOutput(self._membership(membership_id)).data)

    @extend_schema(operation_id="members_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=MemberOutput)
    def patch(self, request, tenant_slug, membership_id):
        """Change a member's role (owner, admin, developer or viewer). Admins and owners, or an API key with
        management:write. Granting or taking away the owner role needs an owner; a key never can. 400 for an unknown
        role or when the tenant would be left without an owner; 403 when under-privileged; 404 for a membership id
        that is not this tenant's.
        """
        membership = self._membership(membership_id)
        self.require_role(Role.ADMIN)
        role = validated_input(self.InputSerializer, request)["role"]
        if Role.OWNER in (role, membership.role) and role != membership.role:
            self.require_role(Role.OWNER)  # only owners grant or take away ownership
        membership = services.membership_change_role(membership=membership, role=role, actor=self.ctx.actor)
        return Response(MemberOutput(membership).data)

    @extend_schema(operation_id="members_destroy", parameters=[TENANT_SLUG], responses={204: None})
    def delete(self, request, tenant_slug, membership_id):
        """Remove a member, or leave the tenant by removing your own membership (any member may leave). Removing
        someone else needs an admin, or an owner when the member is an owner; an API key with management:write may
        remove members who are not owners. 204 on success; 400 when the last owner would go; 403 when
        under-privileged; 404 for a membership id that is not this tenant's.
        """
        membership = self._membership(membership_id)
        leaving = self.ctx.membership is not None and self.ctx.membership.pk == membership.pk
        if not leaving:
            self.require_role(Role.OWNER if membership.role == Role.OWNER else Role.ADMIN)
        services.membership_remove(membership=membership, actor=self.ctx.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---- invitations -----------------------------------------------------------------------------------


class InvitationOutput(serializers.Serializer):
    id = serializers.IntegerField()
    email = serializers.EmailField()
    role = serializers.CharField()
    state = serializers.CharField(help_text="pending, accepted, revoked or expired.")
    invited_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField()

    def get_invited_by(self, obj) -> str | None:
        return email_of(obj.invited_by)


class InvitationCreatedOutput(InvitationOutput):
    accept_url = serializers.CharField(help_text="The link e-mailed to the invitee. Shown once.")


class InvitationListApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema_serializer(component_name="InvitationCreateInput")
    class InputSerializer(serializers.Serializer):
        email = serializers.EmailField(max_length=254)
        role = StrictCharField()

    @extend_schema(operation_id="invitations_list", parameters=[TENANT_SLUG], responses=InvitationOutput(many=True))
    def get(self, request, tenant_slug):
        """List the tenant's invitations with their state: pending, accepted, revoked or expired (paginated). Admins
        and owners, or an API key with management:read or management:write; developers and viewers get 403. 404 when
        the tenant is not yours.
        """
        return paginate(self, self.scoped(Invitation).select_related("invited_by"), InvitationOutput)

    @extend_schema(operation_id="invitations_create", parameters=[TENANT_SLUG], request=InputSerializer, responses={201: InvitationCreatedOutput})
    def post(self, request, tenant_slug):
        """Invite someone by e-mail with a role. The invitee is e-mailed the link; the response carries it once as
        accept_url. Admins and owners, or an API key with management:write. Inviting an owner needs an owner; a key
        never can. 400 for an invalid e-mail, an unknown role or someone already a member; 403 when
        under-privileged.
        """
        data = validated_input(self.InputSerializer, request)
        if data["role"] == Role.OWNER:
            self.require_role(Role.OWNER)
        invitation, token = services.invitation_create(tenant=self.ctx.tenant, email=data["email"], role=data["role"], actor=self.ctx.actor)
        invitation.accept_url = services.invitation_url(token)
        return Response(InvitationCreatedOutput(invitation).data, status=status.HTTP_201_CREATED)


class InvitationDetailApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema(operation_id="invitations_retrieve", parameters=[TENANT_SLUG], responses=InvitationOutput)
    def get(self, request, tenant_slug, invitation_id):
        """One invitation. Admins and owners, or an API key with management:read or management:write; developers and
        viewers get 403. 404 for an invitation id that is not this tenant's.
        """
        return Response(InvitationOutput(self.get_scoped_or_404(Invitation, pk=invitation_id)).data)

    @extend_schema(operation_id="invitations_revoke", parameters=[TENANT_SLUG], responses={204: None})
    def delete(self, request, tenant_slug, invitation_id):
        """Revoke a pending invitation: its link stops working. Admins and owners, or an API key with management:write.
        204 on success; 400 when it is no longer pending; 403 when under-privileged; 404 for an invitation id that
        is not this tenant's.
        """
        services.invitation_revoke(invitation=self.get_scoped_or_404(Invitation, pk=invitation_id), actor=self.ctx.actor)
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationAcceptApi(APIView):
    """Accept an invitation as the signed-in user. User-level: the token itself names the tenant."""

    @extend_schema_serializer(component_name="InvitationAcceptInput")
    class InputSerializer(serializers.Serializer):
        token = StrictCharField(max_length=200)

    @extend_schema_serializer(component_name="InvitationAcceptOutput")
    class OutputSerializer(serializers.Serializer):
        tenant = serializers.CharField(source="tenant.slug")
        role = serializers.CharField()
        membership_id = serializers.IntegerField(source="pk")

    @extend_schema(operation_id="invitations_accept", request=InputSerializer, responses={201: OutputSerializer})
    def post(self, request):
        """Accept an invitation with the token from its link: you join the invitation's tenant with its role. Signed-in
        users only (a session); an API key gets 403. 400 when the token is not valid, the invitation is no longer
        pending, or you are already a member.
        """
        if isinstance(request.user, KeyPrincipal):
            raise PermissionDenied("Accept invitations signed in as yourself, not with an API key.")
        token = validated_input(self.InputSerializer, request)["token"]
        membership = services.invitation_accept(token=token, user=request.user)
        return Response(self.OutputSerializer(membership).data, status=status.HTTP_201_CREATED)


# ---- API keys --------------------------------------------------------------------------------------


class ApiKeyOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The visible start of the key; the secret is never shown again.")
    scopes = serializers.ListField(child=serializers.CharField())
    state = serializers.CharField(help_text="active, expired or revoked.")
    created_by = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)

    def get_created_by(self, obj) -> str | None:
        return email_of(obj.created_by)


class ApiKeyCreatedOutput(ApiKeyOutput):
    secret = serializers.CharField(help_text="The full key: `Authorization: Bearer <secret>`. Shown once, never stored.")


class ApiKeyListApi(TenantAPIView):
    @extend_schema_serializer(component_name="ApiKeyCreateInput")
    class InputSerializer(serializers.Serializer):
        name = StrictCharField(max_length=100)
        scopes = serializers.ListField(child=StrictCharField(), allow_empty=True, max_length=10)
        expires_at = serializers.DateTimeField(required=False, allow_null=True)

    @extend_schema(operation_id="keys_list", parameters=[TENANT_SLUG], responses=ApiKeyOutput(many=True))
    def get(self, request, tenant_slug):
        """List the tenant's API keys with prefix, scopes and state; never the secret (paginated). Any member, or an
        API key with management:read or management:write. 404 when the tenant is not yours.
        """
        return paginate(self, self.scoped(ApiKey).select_related("created_by"), ApiKeyOutput)

    @extend_schema(operation_id="keys_create", parameters=[TENANT_SLUG], request=InputSerializer, responses={201: ApiKeyCreatedOutput})
    def post(self, request, tenant_slug):
        """Create an API key with scopes (inference, finetune, management:read, management:write) and an optional
        expiry. The response carries the full secret, once; it is never stored. Admins and owners, or an API key
        with management:write. 400 for an empty name, no or unknown scopes, or an expiry in the past; 403 when
        under-privileged.
        """
        data = validated_input(self.InputSerializer, request)
        key, secret = services.api_key_create(
            tenant=self.ctx.tenant, name=data["name"], scopes=data["scopes"], expires_at=data.get("expires_at"), actor=self.ctx.actor
        )
        key.secret = secret
        return Response(ApiKeyCreatedOutput(key).data, status=status.HTTP_201_CREATED)


class ApiKeyDetailApi(TenantAPIView):
    @extend_schema(operation_id="keys_retrieve", parameters=[TENANT_SLUG], responses=ApiKeyOutput)
    def get(self, request, tenant_slug, key_id):
        """One API key (never its secret). Any member, or an API key with management:read or management:write. 404 for
        a key id that is not this tenant's.
        """
        return Response(ApiKeyOutput(self.get_scoped_or_404(ApiKey, pk=key_id)).data)

    @extend_schema(operation_id="keys_destroy", parameters=[TENANT_SLUG], responses={200: ApiKeyOutput})  # 200 with the key, not 204
    def delete(self, request, tenant_slug, key_id):
        """Revoke the key, like POST …/revoke/, and return it. Idempotent. Admins and owners, or an API key with
        management:write. 403 when under-privileged; 404 for a key id that is not this tenant's.
        """
        key = services.api_key_revoke(key=self.get_scoped_or_404(ApiKey, pk=key_id), actor=self.ctx.actor)
        return Response(ApiKeyOutput(key).data)


class ApiKeyRevokeApi(TenantAPIView):
    @extend_schema(operation_id="keys_revoke", parameters=[TENANT_SLUG], request=None, responses=ApiKeyOutput)
    def post(self, request, tenant_slug, key_id):
        """Revoke the key and return it; the gateway stops accepting it within about a second. Idempotent. Admins and
        owners, or an API key with management:write. 403 when under-privileged; 404 for a key id that is not this
        tenant's.
        """
        key = services.api_key_revoke(key=self.get_scoped_or_404(ApiKey, pk=key_id), actor=self.ctx.actor)
        return Response(ApiKeyOutput(key).data)


# ---- system prompts --------------------------------------------------------------------------------


class PromptSummaryOutput(serializers.Serializer):
    version = serializers.IntegerField()
    note = serializers.CharField()
    author = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    is_active = serializers.SerializerMethodField()
    chars = serializers.SerializerMethodField(help_text="Length of the text in characters.")

    def get_author(self, obj) -> str | None:
        return email_of(obj.author)

    def get_is_active(self, obj) -> bool:
        return obj.pk == self.context["active_prompt_id"]

    def get_chars(self, obj) -> int:
        return len(obj.text)


class PromptOutput(PromptSummaryOutput):
    text = serializers.CharField()


class PromptListApi(TenantAPIView):
    @extend_schema_serializer(component_name="PromptCreateInput")
    class InputSerializer(serializers.Serializer):
        text = StrictCharField(allow_blank=True, trim_whitespace=False)
        note = StrictCharField(allow_blank=True, required=False, default="")
        draft = serializers.BooleanField(required=False, default=False,
                                         help_text="Save without making it active (activate it later with /activate/). Default false.")

    @extend_schema(operation_id="prompts_list", parameters=[TENANT_SLUG], responses=PromptSummaryOutput(many=True))
    def get(self, request, tenant_slug):
        """List the system prompt's versions, marking the active one (paginated; without the text). Any member, or an
        API key with management:read or management:write. 404 when the tenant is not yours.
        """
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(self.scoped(SystemPromptVersion).select_related("author"), request, view=self)
        context = {"active_prompt_id": self.ctx.tenant.active_prompt_id}
        return paginator.get_paginated_response(PromptSummaryOutput(page, many=True, context=context).data)

    @extend_schema(operation_id="prompts_create", parameters=[TENANT_SLUG], request=InputSerializer, responses={201: PromptOutput})
    def post(self, request, tenant_slug):
        """Save a new version of the system prompt and make it active — or, with `"draft": true`, only save it (the
        live prompt stays; `active` is false in the answer). Admins and owners, or an API key with management:write.
        400 when the text is over the platform's character limit or the note over 200 characters; 403 when
        under-privileged.
        """
        data = validated_input(self.InputSerializer, request)
        version = services.system_prompt_save(tenant=self.ctx.tenant, text=data["text"], note=data["note"], actor=self.ctx.actor,
                                              activate=not data["draft"])
        return Response(PromptOutput(version, context={"active_prompt_id": self.ctx.tenant.active_prompt_id}).data,
                        status=status.HTTP_201_CREATED)


class PromptDetailApi(TenantAPIView):
    @extend_schema(operation_id="prompts_retrieve", parameters=[TENANT_SLUG], responses=PromptOutput)
    def get(self, request, tenant_slug, version):
        """One version of the system prompt, with its text. Any member, or an API key with management:read or
        management:write. 404 for a version number this tenant does not have.
        """
        obj = self.get_scoped_or_404(SystemPromptVersion, version=version)
        return Response(PromptOutput(obj, context={"active_prompt_id": self.ctx.tenant.active_prompt_id}).data)


class PromptActivateApi(TenantAPIView):
    @extend_schema(operation_id="prompts_activate", parameters=[TENANT_SLUG], request=None, responses=PromptOutput)
    def post(self, request, tenant_slug, version):
        """Make an existing version the active system prompt (roll back or forward). Admins and owners, or an API key
        with management:write. 403 when under-privileged; 404 for a version number this tenant does not have.
        """
        obj = self.get_scoped_or_404(SystemPromptVersion, version=version)
        services.system_prompt_activate(tenant=self.ctx.tenant, version=obj, actor=self.ctx.actor)
        return Response(PromptOutput(obj, context={"active_prompt_id": obj.pk}).data)


class PromptDiffApi(TenantAPIView):
    expensive_methods = frozenset({"GET"})  # counts PLATFORM_API_EXPENSIVE_COST against the tenant's API rate

    @extend_schema_serializer(component_name="PromptDiffOutput")
    class OutputSerializer(serializers.Serializer):
        version = serializers.IntegerField()
        against = serializers.IntegerField()
        lines = inline_serializer(
            "PromptDiffLine",
            {"kind": serializers.ChoiceField(choices=[" ", "-", "+"], help_text="' ' same, '-' only in `against`, '+' only in `version`."), "line": serializers.CharField()},
            many=True,
        )
        omitted_lines = serializers.IntegerField(help_text="Lines of the diff past the first 2,000, not sent.")
        added = serializers.IntegerField(help_text="Lines only in `version`, in the whole diff.")
        removed = serializers.IntegerField(help_text="Lines only in `against`, in the whole diff.")

    @extend_schema(
        operation_id="prompts_diff",
        parameters=[TENANT_SLUG, OpenApiParameter("against", int, description="The version to compare with (default: the previous one).")],
        responses=OutputSerializer,
    )
    def get(self, request, tenant_slug, version):
        """Line diff of a version against another one (`against`, by default the previous version). Any member, or an
        API key with management:read or management:write. At most the first 2,000 lines (`omitted_lines` counts the
        rest; `added` and `removed` are the whole diff's); cached by the version pair. Counts as
        PLATFORM_API_EXPENSIVE_COST requests of the tenant's API rate (429 with Retry-After past it). 400 when
        `against` is not a number or names no version; 404 for a version number this tenant does not have.
        """
        new = self.get_scoped_or_404(SystemPromptVersion, version=version)
        raw = request.query_params.get("against", str(version - 1))
        try:
            against = int(raw)
        except ValueError:
            raise ValidationError({"against": "Give a version number, e.g. ?against=3."}) from None
        old = self.scoped(SystemPromptVersion).filter(version=against).first()
        if old is None:
            raise ValidationError({"against": f"There is no version {against} to compare with."})
        diff = prompt_diff_shown(old, new)
        lines = [{"kind": kind, "line": line} for kind, line in diff.lines]
        return Response({"version": new.version, "against": old.version, "lines": lines, "omitted_lines": diff.omitted,
                         "added": diff.added, "removed": diff.removed})


# ---- policy ----------------------------------------------------------------------------------------


class PolicyOutput(serializers.Serializer):
    weight = serializers.IntegerField()
    fair_share = serializers.BooleanField()
    quota_tokens = serializers.IntegerField(help_text="Tokens per window; 0 = unlimited.")
    quota_window = serializers.CharField()
    quota_mode = serializers.CharField()
    requests_per_minute = serializers.IntegerField()
    tokens_per_minute = serializers.IntegerField()
    max_concurrent_requests = serializers.IntegerField()
    effective_quota_tokens = serializers.SerializerMethodField(
        help_text="Tokens per window in force: quota_tokens, or with fair_share R_total · weight / Σ weight. 0 = unlimited."
    )
    updated_at = serializers.DateTimeField()

    def get_effective_quota_tokens(self, obj) -> int:
        return effective_quota_tokens(obj)


class PolicyApi(TenantAPIView):
    """Read by members and keys; changed only by platform staff, who may act on any tenant here."""

    write_role = STAFF
    staff_may_act_on_any_tenant = True

    @extend_schema_serializer(component_name="PolicyInput")
    class InputSerializer(serializers.Serializer):
        weight = serializers.IntegerField(min_value=1, max_value=1000)
        fair_share = serializers.BooleanField()
        quota_tokens = serializers.IntegerField(min_value=0)
        quota_window = serializers.ChoiceField(choices=Policy._meta.get_field("quota_window").choices)
        quota_mode = serializers.ChoiceField(choices=Policy._meta.get_field("quota_mode").choices)
        requests_per_minute = serializers.IntegerField(min_value=0)
        tokens_per_minute = serializers.IntegerField(min_value=0)
        max_concurrent_requests = serializers.IntegerField(min_value=0)

    def _policy(self) -> Policy:
        return self.scoped(Policy).get()

    @extend_schema(operation_id="policy_retrieve", parameters=[TENANT_SLUG], responses=PolicyOutput)
    def get(self, request, tenant_slug):
        """The tenant's scheduling and quota policy (weight, fair share, token quota, rate and concurrency limits) and
        the quota in force. Any member, or an API key with management:read or management:write. Platform staff may
        read any tenant's. 404 when the tenant is not yours.
        """
        return Response(PolicyOutput(self._policy()).data)

    @extend_schema(operation_id="policy_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=PolicyOutput)
    def put(self, request, tenant_slug):
        """Replace the tenant's policy (every field required). Platform staff only, on any tenant: members of any role
        and API keys get 403 (404 first when the tenant is not theirs). 400 for missing or out-of-range fields.
        """
        return self._update(request, partial=False)

    @extend_schema(operation_id="policy_partial_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=PolicyOutput)
    def patch(self, request, tenant_slug):
        """Change some fields of the tenant's policy. Platform staff only, on any tenant: members of any role and API
        keys get 403 (404 first when the tenant is not theirs). 400 for out-of-range fields.
        """
        return self._update(request, partial=True)

    def _update(self, request, *, partial: bool) -> Response:
        data = validated_input(self.InputSerializer, request, partial=partial)
        policy = services.policy_update(tenant=self.ctx.tenant, actor=self.ctx.actor, **data)
        return Response(PolicyOutput(policy).data)


# ---- audit log -------------------------------------------------------------------------------------


class AuditEventOutput(serializers.Serializer):
    id = serializers.IntegerField()
    action = serializers.CharField()
    actor = serializers.CharField(source="actor_label")
    actor_is_staff = serializers.BooleanField()
    target_type = serializers.CharField()
    target_id = serializers.CharField()
    data = serializers.JSONField()
    created_at = serializers.DateTimeField()


class AuditListApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema(
        operation_id="audit_list",
        parameters=[TENANT_SLUG, OpenApiParameter("action", str, description="Only actions starting with this, e.g. `api_key.` or `member.`.")],
        responses=AuditEventOutput(many=True),
    )
    def get(self, request, tenant_slug):
        """The tenant's audit log, newest first (paginated); `action` keeps actions starting with it. Admins and
        owners, or an API key with management:read or management:write; developers and viewers get 403. 404 when the
        tenant is not yours.
        """
        events = self.scoped(AuditEvent).select_related("actor", "actor_key").order_by("-created_at", "-id")
        action = request.query_params.get("action", "").strip()
        if action:
            events = events.filter(action__startswith=action)
        return paginate(self, events, AuditEventOutput)
