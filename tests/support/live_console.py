"""The console and the gateway as one portal.asgi application under uvicorn, on the test database: what a browser
test needs when its pages call the gateway (the live_server fixture serves Django alone)."""

from __future__ import annotations

from contextlib import contextmanager

from tests.support.gateway import GatewayServer


@contextmanager
def console_with_gateway(settings, monkeypatch):
    """Yields the running server (`.url`, and `.gateway`: its GatewayApp, with the suite's short intervals); static
    files are served by Django's ASGI static handler (DEBUG is off in tests, so nothing else serves them)."""
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    from portal import asgi
    from serving.admission import reset_admission
    from serving.budgets import reset_budgets
    from serving.gateway import GatewayApp
    from serving.gateway.settings import GatewaySettings
    from serving.scheduler import reset_scheduler

    reset_admission()  # asyncio state bound to an earlier test's loop
    reset_scheduler()
    reset_budgets()
    gateway = GatewayApp(settings=GatewaySettings(health_interval_s=0.2, health_timeout_s=1.0, config_poll_s=0.1,
                                                  connect_timeout_s=1.0, read_timeout_s=30))
    monkeypatch.setattr(asgi, "gateway", gateway)
    server = GatewayServer(ASGIStaticFilesHandler(asgi.application)).start()
    server.gateway = gateway
    settings.PUBLIC_URL = server.url
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def desktop_page(browser, base_url: str):
    """A page at desktop size on `base_url`, 15-s timeouts."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()
