"""The test database as another process (a gateway, a Celery worker) can open it."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.db import DEFAULT_DB_ALIAS, connections


def shared_database_url(tmp_path: Path, filename: str):
    """Yields the DATABASE_URL of this test's database for other processes (a generator for a fixture to
    `yield from`; the test must use `transactional_db`: other processes see committed data only).

    PostgreSQL: the test database pytest-django created from DATABASE_URL. SQLite's test database lives in this
    process's memory, where no other process can open it: it is copied (migrated and empty) to `tmp_path/filename`,
    and this process's default connection points at the file for the test; the rest of the suite keeps the fast
    in-memory database."""
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "sqlite":
        yield urlunsplit(urlsplit(os.environ["DATABASE_URL"])._replace(path=f"/{connection.settings_dict['NAME']}"))
        return
    if not connection.is_in_memory_db():
        yield f"sqlite:///{connection.settings_dict['NAME']}"
        return
    path = tmp_path / filename
    with connection.cursor() as cursor:
        cursor.execute("VACUUM INTO %s", [str(path)])
    file_db = connection.__class__({**connection.settings_dict, "NAME": str(path)}, DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = file_db
    try:
        yield f"sqlite:///{path}"
    finally:
        file_db.close()
        connections[DEFAULT_DB_ALIAS] = connection
