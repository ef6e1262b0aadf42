"""People: every test user has PASSWORD (hashed with MD5 in tests: tests/conftest.py)."""

from __future__ import annotations

from django.contrib.auth import get_user_model

PASSWORD = "correct-horse-battery-9"


def make_user(email: str):
    return get_user_model().objects.create_user(username=email, email=email, password=PASSWORD)
