"""Management API under /api/ (owned by the management-API module).

Tenant-scoped routes live under `tenants/<slug:tenant_slug>/` and use `TenantAPIView`. The isolation suite
(tests/test_isolation.py) walks these patterns: a new object kwarg needs an entry in its OBJECT_KWARGS.
"""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from billing import control_api, urls as billing_urls
from finetune import urls as finetune_urls
from serving.api import UsageApi
from tenants import api, api_docs

tenant_patterns = [
    path("billing/", include(billing_urls.api_tenant_patterns)),
    path("", include(finetune_urls.tenant_api_patterns)),
    path("usage/", UsageApi.as_view(), name="api-usage"),
    path("", api.TenantDetailApi.as_view(), name="api-tenant-detail"),
    path("members/", api.MemberListApi.as_view(), name="api-member-list"),
    path("members/<int:membership_id>/", api.MemberDetailApi.as_view(), name="api-member-detail"),
    path("invitations/", api.InvitationListApi.as_view(), name="api-invitation-list"),
    path("invitations/<int:invitation_id>/", api.InvitationDetailApi.as_view(), name="api-invitation-detail"),
    path("keys/", api.ApiKeyListApi.as_view(), name="api-key-list"),
    path("keys/<int:key_id>/", api.ApiKeyDetailApi.as_view(), name="api-key-detail"),
    path("keys/<int:key_id>/revoke/", api.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("keys/<int:key_id>/limits/", control_api.ApiKeyControlsApi.as_view(), name="api-key-limits"),
    path("keys/<int:key_id>/rotate/", control_api.ApiKeyRotateApi.as_view(), name="api-key-rotate"),
    path("budget/", control_api.SpendBudgetApi.as_view(), name="api-budget"),
    path("alerts/", control_api.AlertSettingsApi.as_view(), name="api-alerts"),
    path("alerts/deliveries/", control_api.WebhookDeliveryListApi.as_view(), name="api-alert-delivery-list"),
    path("alerts/deliveries/<int:delivery_id>/resend/", control_api.WebhookResendApi.as_view(), name="api-alert-delivery-resend"),
    path("prompts/", api.PromptListApi.as_view(), name="api-prompt-list"),
    path("prompts/<int:version>/", api.PromptDetailApi.as_view(), name="api-prompt-detail"),
    path("prompts/<int:version>/activate/", api.PromptActivateApi.as_view(), name="api-prompt-activate"),
    path("prompts/<int:version>/diff/", api.PromptDiffApi.as_view(), name="api-prompt-diff"),
    path("policy/", api.PolicyApi.as_view(), name="api-policy"),
    path("audit/", api.AuditListApi.as_view(), name="api-audit-list"),
]

urlpatterns = [
    path("tenants/", api.TenantListApi.as_view(), name="api-tenant-list"),
    path("tenants/<slug:tenant_slug>/", include(tenant_patterns)),
    path("invitations/accept/", api.InvitationAcceptApi.as_view(), name="api-invitation-accept"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", api_docs.api_docs, name="api-docs"),
]
