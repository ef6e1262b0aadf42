"""Deployment checks of the serving side (`manage.py check --deploy`)."""

from __future__ import annotations

from django.conf import settings
from django.core import checks


@checks.register(checks.Tags.security, deploy=True)
def metrics_token(app_configs, **kwargs) -> list[checks.CheckMessage]:
    """/metrics without a token trusts loopback callers, which behind a same-host reverse proxy is everyone."""
    if settings.PLATFORM_METRICS_TOKEN:
        return []
    return [checks.Warning(
        "/metrics answers loopback callers without a token; behind a reverse proxy on the same host every client "
        "looks like loopback and could read per-tenant request and token counts.",
        hint="Set PLATFORM_METRICS_TOKEN and give it to Prometheus as its bearer token.",
        id="serving.W001",
    )]
