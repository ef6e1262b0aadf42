"""Settings come from the environment; production passes Django's deployment checks; migrations are complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_ENV = {
    "PLATFORM_ENV": "production",
    "DJANGO_SECRET_KEY": "x7" * 30 + "-production-secret-for-the-check",
    "DJANGO_ALLOWED_HOSTS": "console.example.com",
    "PLATFORM_METRICS_TOKEN": "prometheus-bearer-token",
}


def manage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PLATFORM_ENV"))}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_production_settings_pass_check_deploy_without_warnings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.slow
def test_check_deploy_warns_when_metrics_have_no_token():
    env = {**PRODUCTION_ENV, "PLATFORM_METRICS_TOKEN": ""}
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env)
    assert result.returncode != 0
    assert "serving.W001" in result.stderr + result.stdout and "PLATFORM_METRICS_TOKEN" in result.stderr + result.stdout


def test_production_requires_a_secret_key():
    result = manage("check", env={"PLATFORM_ENV": "production"})
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required in production" in result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG='maybe' is not a boolean"),
        ({"PLATFORM_ENV": "staging"}, "PLATFORM_ENV='staging'"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL='localhost:6379' must start with one of"),
        ({"PLATFORM_INVITATION_TTL_HOURS": "soon"}, "PLATFORM_INVITATION_TTL_HOURS='soon' is not an integer"),
        ({"PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT": "0"}, "PLATFORM_SIGNIN_FAILURES_PER_ACCOUNT=0 is below the minimum of 1"),
    ],
)
def test_bad_environment_values_stop_startup_with_a_clear_message(env, message):
    result = manage("check", env=env)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
def test_migrations_are_complete():
    result = manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_openapi_schema_is_valid_without_warnings():
    result = manage("spectacular", "--validate", "--fail-on-warn", "--file", "/dev/null")
    assert result.returncode == 0, result.stderr


def test_every_openapi_operation_is_described():
    """The reference at /api/docs/ shows each operation's description: a new endpoint needs its own (a handler
    docstring, or extend_schema's description/summary). A class docstring would describe every method alike."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = {(path, method.upper()): op for path, methods in schema["paths"].items() for method, op in methods.items()}
    assert operations
    bare = [f"{method} {path}" for (path, method), op in operations.items() if not (op.get("description", "").strip() or op.get("summary", "").strip())]
    assert not bare, "operations without a description or summary: " + ", ".join(bare)
    for path, methods in schema["paths"].items():
        texts = [op.get("description", "") + op.get("summary", "") for op in methods.values()]
        assert len(set(texts)) == len(texts), f"{path}: its methods share a description (a class docstring?)"


def broker_transport_options(env: dict) -> dict:
    result = manage("shell", "--verbosity", "0", "-c", "import json; from django.conf import settings; "
                    "print(json.dumps(settings.CELERY_BROKER_TRANSPORT_OPTIONS))", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_a_redis_broker_prefixes_its_keys_only_when_asked():
    redis = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_KEY_PREFIX": ""}
    assert broker_transport_options(redis) == {}
    assert broker_transport_options({**redis, "CELERY_BROKER_KEY_PREFIX": "staging:"}) == {"global_keyprefix": "staging:"}


@pytest.mark.slow
def test_a_filesystem_broker_gets_its_folders_even_when_redis_is_configured(tmp_path):
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_URL": "filesystem://", "PLATFORM_VAR_DIR": str(tmp_path)}
    options = broker_transport_options(env)
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "celery" / "queue")


def test_favicon_ico_points_at_the_console_icon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith("console/favicon.svg")


# ---- a development setup is never served to the world ---------------------------------------------


@pytest.mark.slow
def test_the_development_key_with_a_database_on_another_host_refuses_to_start():
    result = manage("check", env={"DATABASE_URL": "postgres://app@db.internal.example:5432/platform"})
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is unset" in result.stderr and "db.internal.example" in result.stderr
    assert manage("check", env={"DATABASE_URL": "postgres://app@db.internal.example:5432/platform",
                                "DJANGO_SECRET_KEY": "k" * 50}).returncode == 0


def _asgi_status(server_host: str) -> tuple[int, bytes]:
    import asyncio

    from portal import asgi

    sent, calls = [], []

    async def receive():
        calls.append(1)
        if len(calls) > 1:
            await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/healthz-not-a-page/", "raw_path": b"/healthz-not-a-page/",
             "query_string": b"", "headers": [(b"host", b"127.0.0.1")], "server": (server_host, 8000),
             "client": ("203.0.113.9", 5555), "scheme": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "root_path": ""}
    asyncio.run(asgi.application(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.django_db
def test_development_mode_answers_loopback_only():
    # With the built-in key anyone forges playground tokens for any tenant; with DEBUG a 500 shows code and settings.
    status, body = _asgi_status("10.1.2.3")
    assert status == 503 and b"answers on loopback only" in body and b"DJANGO_SECRET_KEY" in body
    assert _asgi_status("127.0.0.1")[0] == 404


def test_pages_carry_a_content_security_policy_without_inline_scripts(client):
    response = client.get("/accounts/login/")
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-eval" not in policy
    import re

    templates = (ROOT / "templates").rglob("*.html")
    inline = [str(t) for t in templates if re.search(r"<script(?![^>]*\bsrc=)|\son[a-z]+=\"", t.read_text())]
    assert inline == []  # the policy would block them: behaviour belongs in static/*.js
