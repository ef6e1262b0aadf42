"""Management API of the spend controls, under /api/tenants/<tenant_slug>/: a key's limits, usage and rotation, the
monthly budget, and the alert settings with the webhook delivery log. Writes go through tenants.services; every view
is a TenantAPIView (the tenant from the URL; another tenant's object is a 404)."""

from __future__ import annotations

from datetime import timedelta

from drf_spectacular.utils import extend_schema, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.response import Response

from billing import alerts, spend
from serving.views import model_names_for
from tenants import services
from tenants.api import ApiKeyOutput
from tenants.api_base import TENANT_SLUG, TenantAPIView, validated_input
from tenants.models import ApiKey, BudgetMode, Role, WebhookDelivery


class KeyControlsOutput(serializers.Serializer):
    requests_per_minute = serializers.IntegerField(help_text="0 = only the tenant's limit.")
    tokens_per_minute = serializers.IntegerField(help_text="0 = only the tenant's limit.")
    monthly_token_budget = serializers.IntegerField(help_text="Tokens per calendar month (UTC); 0 = none.")
    monthly_budget_cents = serializers.IntegerField(help_text="Cents per calendar month (UTC); 0 = none.")
    allowed_models = serializers.ListField(child=serializers.CharField(), help_text="Empty = every model of the tenant.")
    month_requests = serializers.IntegerField(help_text="This month, from the ledger.")
    month_tokens = serializers.IntegerField(help_text="Input + output tokens this month, every status.")
    month_spend_microcents = serializers.IntegerField(help_text="Spend this month in millionths of a cent (backend errors not billed).")


def _controls(key: ApiKey) -> dict:
    start, end = spend.month_bounds()
    usage = spend.ledger_usage_by_key(tenant=key.tenant, start=start, end=end).get(key.pk, spend.Usage())
    return {name: getattr(key, name) for name in services.KEY_CONTROL_FIELDS} | {
        "month_requests": usage.requests, "month_tokens": usage.tokens, "month_spend_microcents": usage.microcents}


class ApiKeyControlsApi(TenantAPIView):
    @extend_schema_serializer(component_name="KeyLimitsInput")
    class InputSerializer(serializers.Serializer):
        requests_per_minute = serializers.IntegerField(min_value=0)
        tokens_per_minute = serializers.IntegerField(min_value=0)
        monthly_token_budget = serializers.IntegerField(min_value=0)
        monthly_budget_cents = serializers.IntegerField(min_value=0)
        allowed_models = serializers.ListField(child=serializers.CharField(max_length=200), max_length=100)

    @extend_schema(operation_id="key_limits_retrieve", parameters=[TENANT_SLUG], responses=KeyControlsOutput)
    def get(self, request, tenant_slug, key_id):
        """A key's own limits and its usage and spend this month. Any member, or a management key. 404 for another
        tenant's key."""
        return Response(KeyControlsOutput(_controls(self.get_scoped_or_404(ApiKey, pk=key_id))).data)

    @extend_schema(operation_id="key_limits_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=KeyControlsOutput)
    def patch(self, request, tenant_slug, key_id):
        """Change some of a key's limits (0 or [] = none of its own). Allowed models must be the tenant's. Admins and
        owners, or a management:write key; 400 for a bad value, 403 when under-privileged."""
        key = self.get_scoped_or_404(ApiKey, pk=key_id)
        data = validated_input(self.InputSerializer, request, partial=True)
        key = services.api_key_controls_update(key=key, actor=self.ctx.actor, tenant_models=model_names_for(self.ctx.tenant), **data)
        return Response(KeyControlsOutput(_controls(key)).data)


class RotatedKeyOutput(ApiKeyOutput):
    secret = serializers.CharField(help_text="The new full key, shown once.")
    previous_valid_until = serializers.DateTimeField(allow_null=True, help_text="Until when the old secret is accepted.")


class ApiKeyRotateApi(TenantAPIView):
    @extend_schema_serializer(component_name="KeyRotateInput")
    class InputSerializer(serializers.Serializer):
        grace_seconds = serializers.IntegerField(min_value=0, max_value=30 * 86400, help_text="How long the old secret stays valid.")

    @extend_schema(operation_id="keys_rotate", parameters=[TENANT_SLUG], request=InputSerializer, responses=RotatedKeyOutput)
    def post(self, request, tenant_slug, key_id):
        """Give the key a new secret; the old one is accepted for `grace_seconds` (0–30 days), then refused. Admins and
        owners, or a management:write key. 400 for a revoked or expired key."""
        self.require_role(Role.ADMIN)
        key = self.get_scoped_or_404(ApiKey, pk=key_id)
        data = validated_input(self.InputSerializer, request)
        key, secret = services.api_key_rotate(key=key, grace=timedelta(seconds=data["grace_seconds"]), actor=self.ctx.actor)
        key.secret = secret
        return Response(RotatedKeyOutput(key).data)


class BudgetOutput(serializers.Serializer):
    monthly_cents = serializers.IntegerField(source="budget_cents", help_text="The tenant's own budget; 0 = none.")
    mode = serializers.CharField(help_text="soft (alerts only) or hard (refused past it).")
    ceiling_cents = serializers.IntegerField(help_text="Set by platform staff: a hard limit, and the most monthly_cents may be; 0 = none.")
    hard_limit_cents = serializers.IntegerField(source="hard_cents", help_text="Requests are refused past this spend; 0 = never.")
    spent_microcents = serializers.IntegerField(read_only=True, help_text="This month so far, in millionths of a cent.")


class SpendBudgetApi(TenantAPIView):
    @extend_schema_serializer(component_name="BudgetInput")
    class InputSerializer(serializers.Serializer):
        monthly_cents = serializers.IntegerField(min_value=0)
        mode = serializers.ChoiceField(choices=BudgetMode.choices)

    def _out(self) -> dict:
        state = spend.budget_in_force(tenant=self.ctx.tenant)
        return BudgetOutput({"budget_cents": state.budget_cents, "mode": state.mode, "ceiling_cents": state.ceiling_cents,
                             "hard_cents": state.hard_cents,
                             "spent_microcents": spend.tenant_month_usage(tenant=self.ctx.tenant).microcents}).data

    @extend_schema(operation_id="budget_retrieve", parameters=[TENANT_SLUG], responses=BudgetOutput)
    def get(self, request, tenant_slug):
        """The monthly money budget, the staff ceiling, the hard limit in force and this month's spend. Any member."""
        return Response(self._out())

    @extend_schema(operation_id="budget_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=BudgetOutput)
    def put(self, request, tenant_slug):
        """Set the monthly budget (cents, 0 = none) and its mode, within the staff ceiling (400 above it). Admins and
        owners, or a management:write key."""
        data = validated_input(self.InputSerializer, request)
        services.spend_budget_set(tenant=self.ctx.tenant, monthly_cents=data["monthly_cents"], mode=data["mode"], actor=self.ctx.actor)
        return Response(self._out())


class AlertSettingsOutput(serializers.Serializer):
    thresholds = serializers.ListField(child=serializers.IntegerField())
    recipient_ids = serializers.SerializerMethodField(help_text="Membership ids e-mailed.")
    webhook_url = serializers.CharField()
    webhook_secret = serializers.CharField(help_text="Signs deliveries: v1=HMAC-SHA256(secret, timestamp + '.' + body).")

    def get_recipient_ids(self, obj) -> list[int]:
        return sorted(obj.recipients.values_list("pk", flat=True))


class AlertSettingsApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema_serializer(component_name="AlertSettingsInput")
    class InputSerializer(serializers.Serializer):
        thresholds = serializers.ListField(child=serializers.IntegerField(), max_length=10)
        recipient_ids = serializers.ListField(child=serializers.IntegerField(), max_length=200)
        webhook_url = serializers.CharField(max_length=500, allow_blank=True)

    @extend_schema(operation_id="alerts_retrieve", parameters=[TENANT_SLUG], responses=AlertSettingsOutput)
    def get(self, request, tenant_slug):
        """Alert thresholds, e-mail recipients and webhook. Admins and owners, or a management key."""
        return Response(AlertSettingsOutput(services.alert_settings_get(tenant=self.ctx.tenant)).data)

    @extend_schema(operation_id="alerts_update", parameters=[TENANT_SLUG], request=InputSerializer, responses=AlertSettingsOutput)
    def patch(self, request, tenant_slug):
        """Change some alert settings. Admins and owners, or a management:write key; 400 for a bad value."""
        data = validated_input(self.InputSerializer, request, partial=True)
        config = services.alert_settings_update(tenant=self.ctx.tenant, actor=self.ctx.actor, **data)
        return Response(AlertSettingsOutput(config).data)


class DeliveryOutput(serializers.Serializer):
    id = serializers.IntegerField()
    alert_id = serializers.IntegerField(source="event_id", allow_null=True)
    url = serializers.CharField()
    status = serializers.CharField()
    attempts = serializers.IntegerField()
    response_status = serializers.IntegerField(allow_null=True)
    last_error = serializers.CharField()
    created_at = serializers.DateTimeField()
    delivered_at = serializers.DateTimeField(allow_null=True)
    resend_of = serializers.IntegerField(source="resend_of_id", allow_null=True)


class WebhookDeliveryListApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema(operation_id="alert_deliveries_list", parameters=[TENANT_SLUG], responses=DeliveryOutput(many=True))
    def get(self, request, tenant_slug):
        """The webhook delivery log, newest first (paginated). Admins and owners, or a management key."""
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(self.scoped(WebhookDelivery).order_by("-created_at", "-id"), request, view=self)
        return paginator.get_paginated_response(DeliveryOutput(page, many=True).data)


class WebhookResendApi(TenantAPIView):
    read_role = Role.ADMIN

    @extend_schema(operation_id="alert_deliveries_resend", parameters=[TENANT_SLUG], request=None, responses={202: DeliveryOutput})
    def post(self, request, tenant_slug, delivery_id):
        """Send a delivery's body again, as a new delivery (202). Admins and owners, or a management:write key."""
        again = alerts.webhook_resend(delivery=self.get_scoped_or_404(WebhookDelivery, pk=delivery_id))
        return Response(DeliveryOutput(again).data, status=status.HTTP_202_ACCEPTED)
