"""People: every test user has PASSWORD (hashed with MD5 in tests: tests/conftest.py); World, what the `world` fixture
(tests/conftest.py) gives: a tenant with one member of each role, and an outsider."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model

PASSWORD = "correct-horse-battery-9"


def make_user(email: str):
    return get_user_model().objects.create_user(username=email, email=email, password=PASSWORD)


@dataclass
class World:
    tenant: object
    owner: object
    admin: object
    developer: object
    viewer: object
    other_tenant: object
    outsider: object  # owner of other_tenant; no membership in `tenant`

    def user(self, role: str):
        return getattr(self, role)
