"""A real Celery worker for the tests that start one (tests/test_celery_worker.py, tests/test_faults_worker.py): the
test database and a broker of the test's own, given to the worker through its environment, and waits that show the
worker's log when they fail."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

from portal.celery import app
from tests.support.databases import shared_database_url

ROOT = Path(__file__).resolve().parents[2]
# As scripts/up.sh runs them: one worker for `default` and `finetune`, one of its own for `validation` (uploads).
WORKER_QUEUES, VALIDATION_QUEUES = ("default", "finetune"), ("validation",)
QUEUES = WORKER_QUEUES + VALIDATION_QUEUES
WAIT_S = 60  # about 15 s here: the worker's start-up, then a two-step job on the tiny model


@pytest.fixture(autouse=True)
def worker_database_url(transactional_db, tmp_path):
    """DATABASE_URL of the test database for another process. Autouse: it must come before any test data.

    Data must be committed for the worker to see it, hence `transactional_db`.
    """
    yield from shared_database_url(tmp_path, "worker.sqlite3")


@pytest.fixture
def broker_env(tmp_path, monkeypatch):
    """A broker of this test's own for this process's Celery app; returns the worker's environment for it."""
    var_dir = tmp_path / "var"
    if settings.CELERY_BROKER_URL.startswith("filesystem"):
        url, prefix = "filesystem://", ""
        folders = {name: var_dir / "celery" / name for name in ("queue", "processed", "control")}  # as up.sh
        for folder in folders.values():
            folder.mkdir(parents=True)
        options = {"data_folder_in": str(folders["queue"]), "data_folder_out": str(folders["queue"]),
                   "processed_folder": str(folders["processed"]), "control_folder": str(folders["control"]),
                   "store_processed": False}
    else:  # Redis: the suite's database, under a prefix no other test uses
        url, prefix = settings.CELERY_BROKER_URL, f"test-worker-{uuid.uuid4().hex[:12]}:"
        options = {"global_keyprefix": prefix}
    monkeypatch.setitem(app.conf, "broker_url", url)
    monkeypatch.setitem(app.conf, "broker_transport_options", options)
    # The app keeps the connection and producer pools it made on first use: new ones now, the old ones back after.
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    yield {"PLATFORM_VAR_DIR": str(var_dir), "CELERY_BROKER_URL": url, "CELERY_BROKER_KEY_PREFIX": prefix}
    if app._pool is not None:
        app._pool.force_close_all()
    if prefix:
        import redis

        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def waiting_messages() -> dict[str, int]:
    """Messages waiting in each queue of the broker."""
    # Not a passive declare: with a key prefix, kombu's Redis transport looks for an unprefixed queue and fails.
    with app.connection_for_write() as conn:
        return {queue: conn.default_channel.queue_declare(queue=queue).message_count for queue in QUEUES}


@contextmanager
def celery_worker(env: dict, log: Path, queues: tuple[str, ...] = WORKER_QUEUES, name: str = "worker"):
    """`celery -A portal worker -Q <queues> --pool solo -n <name>@%h`, as scripts/up.sh runs it; stopped on the way
    out."""
    command = [sys.executable, "-m", "celery", "-A", "portal", "worker", "-Q", ",".join(queues), "--pool", "solo",
               "-n", f"{name}@%h", "--loglevel", "INFO"]
    with open(log, "wb") as out:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield worker
    finally:
        worker.terminate()  # warm shutdown
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def wait_for(what: str, done, worker: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if worker.poll() is not None:
            pytest.fail(f"The worker exited ({worker.returncode}) before {what}. Its log:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"No {what} after {timeout:.0f} s; messages waiting: {waiting_messages()}. "
                        f"The worker's log:\n{log.read_text()[-6000:]}")
        time.sleep(0.25)
