"""The suite's own machinery, where it differs from the libraries': the thread gateway's prompt stop
(tests/support/gateway.py) and PostgreSQL test databases dropped WITH (FORCE) (tests/conftest.py)."""

from __future__ import annotations

import socket
import uuid

import pytest

from tests.support.gateway import GatewayServer


class _LifespanApp:
    """A minimal ASGI app that records its lifespan shutdown and answers 204."""

    def __init__(self):
        self.shut_down = False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    self.shut_down = True
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def test_a_stopped_gateway_server_ran_its_apps_shutdown_and_its_thread_ended():
    app = _LifespanApp()
    server = GatewayServer(app).start()
    server.stop()
    assert app.shut_down and not server.thread.is_alive()


def test_a_gateway_server_with_a_connection_open_stops_the_way_uvicorn_does():
    app = _LifespanApp()
    server = GatewayServer(app).start()
    host, port = server.url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # keep-alive: the connection stays open after the answer
    assert client.recv(1024).startswith(b"HTTP/1.1 204")
    try:
        server.stop()
        assert app.shut_down and not server.thread.is_alive()
    finally:
        client.close()


def test_a_stopped_gateway_server_can_be_stopped_again():
    server = GatewayServer(_LifespanApp()).start()
    server.stop()
    server.stop()  # its loop is closed: nothing to wake, no error
    assert not server.thread.is_alive()


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_postgresql_test_database_is_dropped_although_a_connection_is_left_on_it():
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL (CI starts one)")
    import psycopg

    name = f"test_harness_{uuid.uuid4().hex[:12]}"
    creation = connection.creation
    with creation._nodb_cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    params = {**connection.get_connection_params(), "dbname": name}
    params.pop("cursor_factory", None)
    params.pop("context", None)
    leftover = psycopg.connect(**params)
    try:
        creation._destroy_test_db(name, verbosity=0)
        with creation._nodb_cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [name])
            assert cursor.fetchone()[0] == 0
    finally:
        leftover.close()


def test_a_transactional_tests_flush_keeps_content_types_and_permissions_and_empties_the_rest(transactional_db):
    from django.contrib.auth.models import Permission, User
    from django.contrib.contenttypes.models import ContentType
    from django.core.management import call_command

    content_types = set(ContentType.objects.values_list("pk", "app_label", "model"))
    permissions = set(Permission.objects.values_list("pk", "codename"))
    User.objects.create(username="left-behind")
    Permission.objects.filter(codename="view_user").delete()  # one a test deleted

    call_command("flush", verbosity=0, interactive=False)  # as a transactional test's teardown runs it

    assert not User.objects.exists()
    assert set(ContentType.objects.values_list("pk", "app_label", "model")) == content_types
    assert {codename for _, codename in permissions} == set(Permission.objects.values_list("codename", flat=True))
