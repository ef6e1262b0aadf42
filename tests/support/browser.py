"""Browser helpers (Playwright pages; the fixtures are in tests/browser/conftest.py): the Chromium the tests launch,
its flags, signing in."""

from __future__ import annotations

from pathlib import Path

from tests.support.users import PASSWORD

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (apt-get install chromium); Playwright drives it headless
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def sign_in(page, email: str) -> None:
    """Sign in on the login page as a person would (every test user has tests.support.users.PASSWORD)."""
    page.goto("/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
