"""Playwright fixtures: one headless Debian Chromium per module, a fresh context per test.

Playwright's sync API runs an asyncio event loop in the test thread. Django then refuses ORM calls from that
thread (SynchronousOnlyOperation), including pytest-django's own database flush between tests, although
nothing here is actually async: the loop only drives the browser. DJANGO_ALLOW_ASYNC_UNSAFE lifts that check
for this test process only (it is set before Django handles any request, and never in settings).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    # A browser, a live server and a page per test: seconds each, so none is in the fast lane (-m "not slow").
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the 'playwright' package (pip install -e .[test])")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console(live_server, transactional_db, settings):
    """The live server with e-mail kept in memory and links pointing at it."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.PUBLIC_URL = live_server.url
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # sign-ups stay fast
    return live_server


@pytest.fixture
def page(browser, console):
    context = browser.new_context(base_url=console.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(10_000)
    page = context.new_page()
    yield page
    context.close()
