"""DRF authentication by API key: `Authorization: Bearer mtl_…`, refused in the gateway's words."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from tenants.api_refusals import EXPIRED_KEY, INVALID_KEY, MISSING_KEY, Refusal
from tenants.services import api_key_find, api_key_touch


class KeyPrincipal:
    """The request.user of a call made with an API key: authenticated, never staff, tied to one tenant."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    is_active = True

    def __init__(self, key):
        self.key = key
        self.pk = None
        self.email = ""
        self.username = f"key:{key.prefix}"

    def __str__(self) -> str:
        return self.username


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != self.keyword.lower() or not raw.strip():
            raise refused(MISSING_KEY)
        key = api_key_find(raw)
        if key is None or key.state == "revoked":
            raise refused(INVALID_KEY)
        if key.state == "expired":
            raise refused(EXPIRED_KEY)
        api_key_touch(key)
        return KeyPrincipal(key), key

    def authenticate_header(self, request):
        return self.keyword


def refused(refusal: Refusal) -> exceptions.AuthenticationFailed:
    """A 401 in DRF's terms that keeps the shared message and code (finetune/v1_base.py renders it OpenAI's way)."""
    return exceptions.AuthenticationFailed(refusal.message, code=refusal.code)
