"""Console pages (owned by the console module).

Every tenant page lives under `t/<slug:tenant_slug>/` and is a `tenants.access.tenant_view`. The few pages
outside a tenant are listed below so the isolation suite can tell them from a forgotten `tenant_slug`.
"""

from django.contrib.auth import views as auth_views
from django.urls import include, path

from billing import control_views as controls
from portal import dashboard, views as shell
from tenants import views as console

# Open to anyone (the invitation page names its tenant only to holders of the secret token).
PUBLIC_URL_NAMES = frozenset(
    {
        "signup",
        "login",
        "logout",
        "password_reset",
        "password_reset_done",
        "password_reset_confirm",
        "password_reset_complete",
        "invitation-accept",
    }
)
# Signed in, but about no tenant in particular.
USER_URL_NAMES = frozenset({"console-home", "tenant-create"})

tenant_patterns = [
    path("", dashboard.dashboard, name="console-dashboard"),
    path("settings/", console.tenant_settings, name="console-settings"),
    path("members/", console.members, name="console-members"),
    path("members/invite/", console.member_invite, name="console-member-invite"),
    path("members/leave/", console.member_leave, name="console-member-leave"),
    path("members/<int:membership_id>/role/", console.member_role, name="console-member-role"),
    path("members/<int:membership_id>/remove/", console.member_remove, name="console-member-remove"),
    path("invitations/<int:invitation_id>/revoke/", console.invitation_revoke, name="console-invitation-revoke"),
    path("keys/", controls.keys, name="console-keys"),
    path("keys/new/", console.key_create, name="console-key-create"),
    path("keys/<int:key_id>/revoke/", console.key_revoke, name="console-key-revoke"),
    path("keys/<int:key_id>/limits/", controls.key_controls, name="console-key-limits"),
    path("keys/<int:key_id>/rotate/", controls.key_rotate, name="console-key-rotate"),
    path("budget/", controls.budget, name="console-budget"),
    path("alerts/", controls.alerts_page, name="console-alerts"),
    path("alerts/secret/", controls.webhook_secret_rotate, name="console-alerts-secret-rotate"),
    path("alerts/deliveries/<int:delivery_id>/resend/", controls.webhook_resend, name="console-webhook-resend"),
    path("prompt/", console.prompt, name="console-prompt"),
    path("prompt/<int:version>/", console.prompt_version, name="console-prompt-version"),
    path("prompt/<int:version>/activate/", console.prompt_activate, name="console-prompt-activate"),
    path("prompt/diff/<int:version>/<int:other_version>/", console.prompt_diff, name="console-prompt-diff"),
    path("limits/", console.limits, name="console-limits"),
    path("audit/", console.audit, name="console-audit"),
    path("billing/", include("billing.console_urls")),
    path("finetune/", include("finetune.console_urls")),
]

urlpatterns = [
    path("", shell.home, name="console-home"),
    path("signup/", shell.signup, name="signup"),
    path("login/", shell.SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password-reset/", shell.PasswordResetView.as_view(), name="password_reset"),
    path("password-reset/sent/", auth_views.PasswordResetDoneView.as_view(template_name="auth/password_reset_done.html"), name="password_reset_done"),
    path("password-reset/<uidb64>/<token>/", shell.PasswordResetConfirmView.as_view(), name="password_reset_confirm"),
    path("password-reset/done/", auth_views.PasswordResetCompleteView.as_view(template_name="auth/password_reset_complete.html"), name="password_reset_complete"),
    path("invitations/<str:token>/", shell.invitation_accept, name="invitation-accept"),
    path("tenants/new/", shell.tenant_create, name="tenant-create"),
    path("t/<slug:tenant_slug>/", include(tenant_patterns)),
    path("", include("serving.console_urls")),
]
