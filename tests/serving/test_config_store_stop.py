"""The config store's last write (keys' last use) is made by its own thread, which closes its connection: the gateway
stops the store from an executor thread, which otherwise kept a database connection open for good (one per stopped
gateway: PostgreSQL's 'database is being accessed by other users' when the test database is dropped)."""

from __future__ import annotations

import threading

from django.db import connection

from serving.config import ConfigStore
from tests.support.gateway import make_key


def test_the_last_touches_are_written_by_the_stores_thread_not_by_the_caller_of_stop(transactional_db, world):
    key, _ = make_key(world.tenant)
    store = ConfigStore(poll_interval_s=0.05)
    store.start()
    store.note_key_used(key.pk)
    caller_connected = []

    def stop_as_the_gateway_does():  # asyncio.to_thread(store.stop): a thread of the loop's default executor
        store.stop()
        caller_connected.append(connection.connection is not None)
        connection.close()

    thread = threading.Thread(target=stop_as_the_gateway_does)
    thread.start()
    thread.join(timeout=10)
    assert caller_connected == [False]
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_a_store_never_started_writes_its_touches_on_stop(transactional_db, world):
    key, _ = make_key(world.tenant)
    store = ConfigStore()
    store.refresh(force=True)
    store.note_key_used(key.pk)
    store.stop()
    key.refresh_from_db()
    assert key.last_used_at is not None
