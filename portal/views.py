"""The console shell outside any tenant: sign up, home, new tenant, invitation links.

Sign in/out and password reset are Django's own views (wired in portal/console_urls.py); sign-in and the
reset request are throttled by their forms (tenants/throttle.py) and answer 429 while locked out.
"""

from __future__ import annotations

import sys

from django.contrib import messages
from django.contrib.auth import get_user_model, login
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import IntegrityError, InterfaceError, OperationalError, transaction
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views import defaults
from django.urls import reverse, reverse_lazy
from django.views.decorators.http import require_http_methods

from common.text import sentence
from tenants import services, throttle
from tenants.forms import EmailAuthenticationForm, SignupForm, TenantForm, ThrottledPasswordResetForm, apply_service_errors
from tenants.selectors import memberships_for_user

User = get_user_model()


class ThrottledFormMixin:
    """A form refused by a lockout (its `retry_after_s` is set) answers 429 Too Many Requests with Retry-After."""

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if getattr(form, "retry_after_s", None):
            response.status_code = 429
            response["Retry-After"] = str(form.retry_after_s)
        return response


class SignInView(ThrottledFormMixin, auth_views.LoginView):
    template_name = "auth/login.html"
    authentication_form = EmailAuthenticationForm
    redirect_authenticated_user = True


class PasswordResetView(ThrottledFormMixin, auth_views.PasswordResetView):
    form_class = ThrottledPasswordResetForm
    template_name = "auth/password_reset_form.html"
    email_template_name = "auth/password_reset_email.txt"
    subject_template_name = "auth/password_reset_subject.txt"

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """Choosing a new password from the e-mailed link also lifts a sign-in lockout of that account."""

    template_name = "auth/password_reset_confirm.html"
    success_url = reverse_lazy("password_reset_complete")

    def form_valid(self, form):
        response = super().form_valid(form)
        throttle.signin_unlock(form.user.get_username())
        return response


@login_required
def home(request):
    """The user's first tenant (alphabetical), or the 'create your first tenant' page."""
    memberships = memberships_for_user(request.user)
    if memberships:
        return redirect("console-dashboard", tenant_slug=memberships[0].tenant.slug)
    return redirect("tenant-create")


def _pending_invitation(token: str | None):
    invitation = services.invitation_by_token(token) if token else None
    return invitation if invitation is not None and invitation.state == "pending" else None


@require_http_methods(["GET", "POST"])
def signup(request):
    """Create an account and its first tenant (owner), or, from an invitation link, just the account."""
    if request.user.is_authenticated:
        return redirect("console-home")
    token = request.POST.get("invitation") or request.GET.get("invitation")
    invitation = _pending_invitation(token)
    joining = invitation is not None
    initial = {"email": invitation.email} if joining else {}
    form = SignupForm(request.POST or None, joining=joining, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            throttle.signup_requested(request)
            # One transaction: an invalid or taken slug must not leave an account behind.
            with transaction.atomic():
                user = User.objects.create_user(username=data["email"], email=data["email"], password=data["password1"])
                tenant = None if joining else services.tenant_create(slug=data["slug"], name=data["name"], owner=user, self_service=True)
        except throttle.Throttled as exc:
            form.add_error(None, exc.message)
        except ValidationError as exc:
            apply_service_errors(form, exc)
        except IntegrityError:
            form.add_error("email", "An account with this e-mail exists. Sign in instead.")
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            if joining:
                messages.success(request, f"Welcome! Accept the invitation to join {sentence(invitation.tenant.name)}")
                return redirect("invitation-accept", token=token)
            messages.success(request, f"Welcome to {sentence(tenant.name)} You are its owner.")
            return redirect("console-dashboard", tenant_slug=tenant.slug)
    return render(request, "auth/signup.html", {"form": form, "invitation": invitation, "token": token if joining else ""},
                  status=400 if form.is_bound and form.errors else 200)


@login_required
@require_http_methods(["GET", "POST"])
def tenant_create(request):
    form = TenantForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            tenant = services.tenant_create(slug=form.cleaned_data["slug"], name=form.cleaned_data["name"], owner=request.user,
                                            self_service=True)
        except ValidationError as exc:
            apply_service_errors(form, exc)
        else:
            messages.success(request, f"{tenant.name} is ready. You are its owner.")
            return redirect("console-dashboard", tenant_slug=tenant.slug)
    first = not memberships_for_user(request.user)
    return render(request, "auth/tenant_create.html", {"form": form, "first": first}, status=400 if form.is_bound and form.errors else 200)


@require_http_methods(["GET", "POST"])
def invitation_accept(request, token: str):
    """The link from the invitation e-mail. The token is the credential; the page names tenant and role."""
    invitation = services.invitation_by_token(token)
    here = reverse("invitation-accept", kwargs={"token": token})
    context = {"invitation": invitation, "token": token, "here": here, "error": None}
    if invitation is None:
        context["error"] = "This invitation link is not valid. Check that you copied the whole link, or ask for a new invitation."
        return render(request, "auth/invitation.html", context, status=404)
    if invitation.state != "pending":
        context["error"] = f"This invitation is {invitation.state}. Ask an admin of {invitation.tenant.name} for a new one."
        return render(request, "auth/invitation.html", context, status=400)
    if request.method == "POST":
        if not request.user.is_authenticated:
            return redirect(f"{reverse('login')}?next={here}")
        try:
            services.invitation_accept(token=token, user=request.user)
        except ValidationError as exc:
            context["error"] = " ".join(exc.messages)
            return render(request, "auth/invitation.html", context, status=400)
        messages.success(request, f"You joined {invitation.tenant.name} as {invitation.get_role_display().lower()}.")
        return redirect("console-dashboard", tenant_slug=invitation.tenant.slug)
    context["signup_url"] = f"{reverse('signup')}?invitation={token}"
    context["login_url"] = f"{reverse('login')}?next={here}"
    return render(request, "auth/invitation.html", context)


DATABASE_UNAVAILABLE = "The database cannot be reached right now, so this request could not be completed. Retry in a minute."


def server_error(request):
    """handler500 (DEBUG off). A database that cannot be reached (down, restarting, refusing connections) is a 503
    that says so, with Retry-After; any other failure stays a 500. Under /v1/ the answer is JSON in OpenAI's error
    shape, under /api/ the management API's JSON; elsewhere a page rendered without the request (its context
    processors would ask the database again)."""
    unavailable = isinstance(sys.exc_info()[1], (OperationalError, InterfaceError))
    path = request.path
    if path.startswith(("/v1/", "/api/")):
        from common.openai_errors import error_body as openai_error_body

        if unavailable:
            message, code, status = DATABASE_UNAVAILABLE, "database_unavailable", 503
        else:
            message, code, status = ("The server failed on this request. Retry; if it persists, tell the platform team "
                                     "the time of the request.", "internal_error", 500)
        if path.startswith("/v1/"):
            body = openai_error_body(message, status, code)
            if unavailable:
                body["error"]["type"] = "service_unavailable"
        else:
            body = {"detail": message, "code": code}
        response = JsonResponse(body, status=status)
    elif unavailable:
        response = HttpResponse(render_to_string("503.html", {"message": DATABASE_UNAVAILABLE}), status=503)
    else:
        return defaults.server_error(request)
    if unavailable:
        response["Retry-After"] = "60"
    return response
