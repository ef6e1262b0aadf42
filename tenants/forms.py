"""Console forms. They check input shape only; the services decide (and their ValidationErrors land on fields)."""

from __future__ import annotations

import secrets
from datetime import datetime, time, timedelta, timezone as dt_timezone

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.forms import AuthenticationForm, PasswordResetForm
from django.core.exceptions import ValidationError
from django.utils.text import slugify

from tenants import throttle
from tenants.models import ApiKey, Membership, Role, Tenant, slug_validator
from tenants.selectors import role_choices_for

User = get_user_model()


def apply_service_errors(form: forms.Form, exc: ValidationError, aliases: dict[str, str] | None = None) -> None:
    """Put a service's ValidationError on the form: a known field gets its own error, anything else goes on top.

    `aliases` maps a service argument to the form field that feeds it (e.g. expires_at -> expires_on).
    """
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for field, messages in exc.message_dict.items():
        field = (aliases or {}).get(field, field)
        form.add_error(field if field in form.fields else None, messages)


def suggest_slug(name: str) -> str:
    return slugify(name)[:40].strip("-")


def _refused(form: forms.Form, exc: throttle.Throttled) -> ValidationError:
    """A lockout as a form error; the view answers 429 with Retry-After from `form.retry_after_s`."""
    form.retry_after_s = exc.retry_after_s
    return ValidationError(exc.message, code="throttled")


class ThrottledSignInMixin:
    """For a Django authentication form: refuse while locked out (before the password is checked), count failures.

    A right password clears the account's failures. See tenants/throttle.py.
    """

    retry_after_s: int | None = None

    def clean(self):
        username, password = self.cleaned_data.get("username"), self.cleaned_data.get("password")
        if not username or not password:
            return super().clean()  # a field error already; no password is checked
        try:
            throttle.signin_check(self.request, username)
            try:
                cleaned = super().clean()
            except ValidationError:
                if self.get_user() is None:  # the password was wrong (not a later refusal, e.g. "not staff")
                    throttle.signin_failed(self.request, username)
                raise
        except throttle.Throttled as exc:
            raise _refused(self, exc) from None
        throttle.signin_succeeded(username)
        return cleaned


class EmailAuthenticationForm(ThrottledSignInMixin, AuthenticationForm):
    """Sign in by e-mail: usernames are the lower-cased e-mail address."""

    username = forms.EmailField(label="Email", widget=forms.EmailInput(attrs={"autocomplete": "email", "autofocus": True}))

    def clean_username(self):
        return self.cleaned_data["username"].strip().lower()


class StaffAuthenticationForm(ThrottledSignInMixin, AdminAuthenticationForm):
    """Django admin's sign-in, under the same throttle as the console's (portal/urls.py installs it)."""


class ThrottledPasswordResetForm(PasswordResetForm):
    """Django's reset form, limited per e-mail and per client address so it cannot be used to bomb a mailbox."""

    def __init__(self, *args, request=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.request = request
        self.retry_after_s = None

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("email"):
            try:
                throttle.password_reset_requested(self.request, cleaned["email"])
            except throttle.Throttled as exc:
                raise _refused(self, exc) from None
        return cleaned


class TenantNameForm(forms.Form):
    """The organisation's display name: alone, a rename (services.tenant_rename decides); with a slug, a new tenant."""

    name = forms.CharField(  # strips spaces, so only spaces is "required"
        label="Organisation name",
        max_length=Tenant._meta.get_field("name").max_length,
        error_messages={"required": "Enter the organisation's name."},
        widget=forms.TextInput(attrs={"autocomplete": "organization"}),
    )


class TenantForm(TenantNameForm):
    """Organisation name and slug; the slug is suggested from the name when left empty."""

    slug = forms.CharField(
        label="URL name",
        max_length=40,
        required=False,
        help_text="Suggested from the name. Lowercase letters, digits and hyphens; used in console URLs and cannot be changed later.",
        widget=forms.TextInput(attrs={"data-slug-target": "", "autocapitalize": "none", "spellcheck": "false"}),
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["name"].widget.attrs["data-slug-source"] = ""  # console.js suggests the slug from the name

    def clean(self):
        cleaned = super().clean()
        slug = (cleaned.get("slug") or "").strip().lower() or suggest_slug(cleaned.get("name") or "")
        if "name" in cleaned and not self.has_error("slug"):
            try:
                slug_validator(slug)
            except ValidationError as exc:
                self.add_error("slug", exc)
            else:
                if Tenant.objects.filter(slug=slug).exists():
                    self.add_error("slug", f"'{slug}' is taken. Choose another URL name.")
                cleaned["slug"] = slug
        return cleaned


class SignupForm(TenantForm):
    """A new account; with `joining=True` (signing up from an invitation) no organisation is created."""

    field_order = ["email", "name", "slug", "password1", "password2"]

    email = forms.EmailField(label="Email", widget=forms.EmailInput(attrs={"autocomplete": "email"}))
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="At least 10 characters; not a common or all-numeric password.",
    )
    password2 = forms.CharField(label="Password again", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}))

    def __init__(self, *args, joining: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.joining = joining
        if joining:
            del self.fields["name"]
            del self.fields["slug"]

    def clean_email(self):
        email = self.cleaned_data["email"].strip().lower()
        if User.objects.filter(username__iexact=email).exists() or User.objects.filter(email__iexact=email).exists():
            raise ValidationError("An account with this e-mail exists. Sign in instead, or reset your password.")
        return email

    def clean(self):
        cleaned = forms.Form.clean(self) if self.joining else super().clean()
        p1, p2 = cleaned.get("password1"), cleaned.get("password2")
        if p1 and p2 and p1 != p2:
            self.add_error("password2", "The two passwords differ.")
        elif p1 and cleaned.get("email"):
            try:
                password_validation.validate_password(p1, User(username=cleaned["email"], email=cleaned["email"]))
            except ValidationError as exc:
                self.add_error("password1", exc)
        return cleaned


class InviteForm(forms.Form):
    email = forms.EmailField(label="Email", widget=forms.EmailInput(attrs={"autocomplete": "off"}))
    role = forms.ChoiceField(label="Role")

    def __init__(self, *args, granter: Membership, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = [(r, Role(r).label) for r in role_choices_for(granter)]
        self.fields["role"].initial = Role.DEVELOPER


class RoleForm(forms.Form):
    role = forms.ChoiceField(label="Role")

    def __init__(self, *args, granter: Membership, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["role"].choices = [(r, Role(r).label) for r in role_choices_for(granter)]


class ApiKeyForm(forms.Form):
    name = forms.CharField(label="Name", max_length=100, help_text="What uses this key, e.g. 'production' or 'ci'.")
    scopes = forms.MultipleChoiceField(
        label="Scopes", choices=ApiKey.Scope.choices, widget=forms.CheckboxSelectMultiple, initial=[ApiKey.Scope.INFERENCE]
    )
    expires_on = forms.DateField(
        label="Expires on",
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="The key stops working at the end of this day (UTC).",
    )
    # One random value per rendered form: posting the same form twice (a reload of the "key created" page, a
    # double click) creates one key, not two. Optional, so scripted posts without it still work.
    submission = forms.CharField(required=False, max_length=64, widget=forms.HiddenInput)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.is_bound:
            self.initial["submission"] = secrets.token_urlsafe(16)

    def clean_name(self):
        name = self.cleaned_data["name"].strip()
        if not name:
            raise ValidationError("Give the key a name, e.g. 'production' or 'ci'.")
        return name

    @property
    def expires_at(self) -> datetime | None:
        day = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        return datetime.combine(day + timedelta(days=1), time.min, tzinfo=dt_timezone.utc)


class PromptForm(forms.Form):
    text = forms.CharField(
        label="System prompt",
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 14, "spellcheck": "true"}),
    )
    note = forms.CharField(label="Note", required=False, max_length=200, help_text="What changed and why.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        limit = settings.PLATFORM_MAX_PROMPT_CHARS
        self.fields["text"].widget.attrs["data-max-chars"] = limit
        self.fields["text"].help_text = f"Up to {limit:,} characters. Saving creates a draft version; it goes live only when you make it live."

    def clean_text(self):
        # Browsers send CRLF; store LF so character counts and diffs match what the user sees.
        return self.cleaned_data["text"].replace("\r\n", "\n")


class AuditFilterForm(forms.Form):
    action = forms.CharField(label="Action starts with", required=False, max_length=64)
