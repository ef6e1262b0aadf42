from __future__ import annotations

from django import forms

from serving.guard import MAX_PATTERNS, custom_pattern_error, patterns_total_error
from serving.models import ModelConfig


class LinesField(forms.CharField):
    """One entry per line in a textarea; a list in the model."""

    widget = forms.Textarea(attrs={"rows": 3})

    def prepare_value(self, value):
        return "\n".join(value) if isinstance(value, list) else value

    def to_python(self, value):
        return [line.strip() for line in (value or "").splitlines() if line.strip()]


class ModelConfigForm(forms.ModelForm):
    redact_patterns = LinesField(required=False, help_text="One regular expression per line (RE2 syntax: no lookarounds or backreferences); matches are replaced by [REDACTED].")
    blocked_terms = LinesField(required=False, help_text="One term per line; replaced by [BLOCKED] (case-insensitive).")

    class Meta:
        model = ModelConfig
        labels = {"auto_deploy_finetuned": "Deploy fine-tuned models when their job succeeds"}
        fields = [
            "default_model",
            "default_max_tokens",
            "max_max_tokens",
            "default_temperature",
            "max_temperature",
            "system_message_rule",
            "auto_deploy_finetuned",
            "redact_emails",
            "redact_phone_numbers",
            "redact_card_numbers",
            "redact_patterns",
            "blocked_terms",
        ]

    def __init__(self, *args, model_choices: list[str], **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["default_model"] = forms.ChoiceField(
            choices=[("", "— none —")] + [(m, m) for m in model_choices],
            required=False,
            help_text="Used when a request names no model, or 'default'.",
        )

    def clean_redact_patterns(self):
        patterns = self.cleaned_data["redact_patterns"]
        if len(patterns) > MAX_PATTERNS:
            raise forms.ValidationError(f"{len(patterns)} patterns; the limit is {MAX_PATTERNS}.")
        for p in patterns:
            error = custom_pattern_error(p)
            if error:
                raise forms.ValidationError(f"{p!r} cannot be used: {error}.")
        error = patterns_total_error(patterns)
        if error:
            raise forms.ValidationError(f"These patterns cannot be used: {error}.")
        return patterns

    def clean(self):
        data = super().clean()
        if data.get("default_max_tokens") and data.get("max_max_tokens") and data["default_max_tokens"] > data["max_max_tokens"]:
            self.add_error("default_max_tokens", "The default cannot exceed the maximum.")
        if data.get("default_temperature") is not None and data.get("max_temperature") is not None and data["default_temperature"] > data["max_temperature"]:
            self.add_error("default_temperature", "The default cannot exceed the maximum.")
        return data
