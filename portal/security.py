"""Response headers and start-up rules that keep a development setup from being served to the world."""

from __future__ import annotations

import ipaddress

from django.conf import settings

# No inline or third-party scripts anywhere (the console's behaviour is in static files); inline styles stay
# allowed (charts and gauges size themselves with style attributes). frame-ancestors: no clickjacking.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "frame-ancestors 'none'",
])


class ContentSecurityPolicyMiddleware:
    """Adds the Content-Security-Policy to every Django response that has none."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


def is_loopback(host: str | None) -> bool:
    if not host:
        return True  # a unix socket: only this machine reaches it
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def development_only_reason() -> str:
    """Why this process may answer loopback only ('' when it may serve any address)."""
    if settings.SECRET_KEY == settings.DEVELOPMENT_SECRET_KEY:
        return "the built-in development DJANGO_SECRET_KEY (anyone could forge sessions and playground tokens)"
    if settings.DEBUG:
        return "DEBUG on (error pages would show code and settings)"
    return ""
