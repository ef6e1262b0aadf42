"""DRF authentication by API key: `Authorization: Bearer mtl_…`."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from tenants.services import api_key_authenticate, api_key_touch


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
        if scheme != self.keyword or not raw.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        key = api_key_authenticate(raw)
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key. Create a new key in the console.")
        api_key_touch(key)
        return KeyPrincipal(key), key

    def authenticate_header(self, request):
        return self.keyword
