"""Template filters for text people read: `{% load portal_text %}`."""

from __future__ import annotations

from django import template

from common.text import sentence as _sentence

register = template.Library()


@register.filter
def sentence(value) -> str:
    """End the value as a sentence: `{{ tenant.name|sentence }}` gives "Demo Inc." for "Demo Inc." and "Acme." for "Acme"."""
    return _sentence(value)
