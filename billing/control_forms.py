"""Console forms of the spend controls: the monthly budget, a key's limits, a key's rotation, the alert settings.
They check input shape only; tenants.services decides (its ValidationErrors land on the fields)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django import forms

from tenants.models import BudgetMode

GRACE_CHOICES = [("0", "None: refuse the old secret at once"), ("3600", "1 hour"), ("86400", "24 hours"),
                 ("604800", "7 days"), ("2592000", "30 days")]


def money_field(label: str, help_text: str) -> forms.DecimalField:
    return forms.DecimalField(label=label, min_value=Decimal(0), max_digits=14, decimal_places=2, required=False, help_text=help_text)


def to_cents(value: Decimal | None) -> int:
    return int((value or Decimal(0)) * 100)


class BudgetForm(forms.Form):
    monthly = money_field("Monthly budget", "In your billing currency, per calendar month (UTC). Empty or 0: no budget.")
    mode = forms.ChoiceField(label="When it is reached", choices=BudgetMode.choices, widget=forms.RadioSelect)


class KeyControlsForm(forms.Form):
    requests_per_minute = forms.IntegerField(label="Requests per minute", min_value=0, required=False, help_text="Empty or 0: only the tenant's limit.")
    tokens_per_minute = forms.IntegerField(label="Tokens per minute", min_value=0, required=False, help_text="Empty or 0: only the tenant's limit.")
    monthly_token_budget = forms.IntegerField(label="Tokens per month", min_value=0, required=False, help_text="Empty or 0: no budget of the key's own.")
    monthly_budget = money_field("Spend per month", "In your billing currency. Empty or 0: no budget of the key's own.")
    allowed_models = forms.MultipleChoiceField(label="Models this key may call", required=False, widget=forms.CheckboxSelectMultiple,
                                               help_text="None ticked: every model of the tenant.")

    def __init__(self, *args, models: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["allowed_models"].choices = [(m, m) for m in models]

    def changes(self) -> dict:
        data = self.cleaned_data
        return {
            "requests_per_minute": data["requests_per_minute"] or 0,
            "tokens_per_minute": data["tokens_per_minute"] or 0,
            "monthly_token_budget": data["monthly_token_budget"] or 0,
            "monthly_budget_cents": to_cents(data["monthly_budget"]),
            "allowed_models": list(data["allowed_models"]),
        }


class KeyRotateForm(forms.Form):
    grace = forms.ChoiceField(label="Keep the old secret working for", choices=GRACE_CHOICES, initial="86400",
                              help_text="Time to deploy the new secret; then requests with the old one are refused.")

    @property
    def grace_period(self) -> timedelta:
        return timedelta(seconds=int(self.cleaned_data["grace"]))


class AlertSettingsForm(forms.Form):
    thresholds = forms.CharField(label="Thresholds (%)", max_length=60, help_text="Comma-separated percentages of each budget and quota, e.g. 50, 80, 100.")
    recipients = forms.MultipleChoiceField(label="E-mail these members", required=False, widget=forms.CheckboxSelectMultiple)
    webhook_url = forms.CharField(label="Webhook URL", max_length=500, required=False,
                                  help_text="Optional: an https:// endpoint of yours, sent each alert signed (see the docs). Public addresses only.")

    def __init__(self, *args, members, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["recipients"].choices = [(str(m.pk), f"{m.user.email} ({m.role})") for m in members]

    def clean_thresholds(self):
        try:
            return [int(part) for part in self.cleaned_data["thresholds"].replace(" ", "").split(",") if part]
        except ValueError:
            raise forms.ValidationError("Use whole percentages separated by commas, e.g. 50, 80, 100.") from None
