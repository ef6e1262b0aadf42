"""Management API of the serving app: the tenant's usage (the console's Usage page as JSON)."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from serving import selectors
from tenants.api_base import TENANT_SLUG, TenantAPIView

class UsageRow(serializers.Serializer):
    day = serializers.DateField()
    model = serializers.CharField()
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class UsageApi(TenantAPIView):
    @extend_schema(
        operation_id="usage_retrieve",
        parameters=[TENANT_SLUG, OpenApiParameter("days", int, description="How many UTC days back, today included (1–366, default 30).")],
        responses=inline_serializer(
            "Usage",
            {
                "days": serializers.IntegerField(),
                "rows": UsageRow(many=True),
                "quota": inline_serializer(
                    "QuotaStatus",
                    {
                        "state": serializers.CharField(),
                        "used_tokens": serializers.IntegerField(),
                        "quota_tokens": serializers.IntegerField(),
                        "utilization_percent": serializers.FloatField(allow_null=True),
                        "window_start": serializers.DateTimeField(),
                        "window_end": serializers.DateTimeField(),
                    },
                ),
            },
        ),
    )
    def get(self, request, tenant_slug):
        """Tokens and requests per UTC day and model over the last `days` days, and the state of the current quota
        window (unlimited, ok, warning, throttled or exhausted). Any member, or an API key with management:read or
        management:write. 400 when `days` is not a whole number from 1 to 366; 404 when the tenant is not yours.
        """
        raw = request.query_params.get("days", "30")
        if not raw.isdigit() or not 1 <= int(raw) <= 366:
            raise serializers.ValidationError({"days": "Use a whole number of days from 1 to 366."})
        days = int(raw)
        quota = selectors.quota_status(self.ctx.tenant)
        return Response(
            {
                "days": days,
                "rows": selectors.usage_by_day_and_model(self.ctx.tenant, days=days),
                "quota": {
                    "state": quota["state"],
                    "used_tokens": quota["used"],
                    "quota_tokens": quota["quota"],
                    "utilization_percent": round(quota["percent"], 2) if quota["percent"] is not None else None,
                    "window_start": quota["window_start"],
                    "window_end": quota["window_end"],
                },
            }
        )
