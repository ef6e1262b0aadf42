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


def test_production_settings_pass_check_deploy_without_warnings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


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


def test_migrations_are_complete():
    result = manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


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


def test_a_redis_broker_prefixes_its_keys_only_when_asked():
    redis = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_KEY_PREFIX": ""}
    assert broker_transport_options(redis) == {}
    assert broker_transport_options({**redis, "CELERY_BROKER_KEY_PREFIX": "staging:"}) == {"global_keyprefix": "staging:"}


def test_a_filesystem_broker_gets_its_folders_even_when_redis_is_configured(tmp_path):
    env = {"REDIS_URL": "redis://127.0.0.1:6379/0", "CELERY_BROKER_URL": "filesystem://", "PLATFORM_VAR_DIR": str(tmp_path)}
    options = broker_transport_options(env)
    assert options["data_folder_in"] == options["data_folder_out"] == str(tmp_path / "celery" / "queue")


def test_favicon_ico_points_at_the_console_icon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith("console/favicon.svg")
