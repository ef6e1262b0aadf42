"""Fault injection on real gateway processes: the database refuses connections mid-burst.

The platform of tests/serving/test_faults.py (two `uvicorn` gateway processes, a private redis-server, the
simulated dev backend), with the gateways' DATABASE_URL pointing at a TCP proxy of this test's own in front of
PostgreSQL. Mid-burst the proxy stops listening (new connections are refused) and resets every connection it
carries (the gateways' open connections break), for a few seconds; then it listens again. The same four
invariants are asserted once the outage has ended and the gateways' ledger spools have been replayed, and
that the gateways kept serving from their configuration snapshot while the database was away.

SQLite has no connections to refuse or drop (the database is a file every process opens itself), so this
fault needs PostgreSQL: the test is skipped on the embedded default, never in CI (tests/conftest.py). The two
mechanisms it found wanting are also checked alone, on every database: a gateway thread whose connection the
database dropped reads the ledger again on a new one, and a quota counter that cannot be seeded from the
ledger is a 503 in words, not a 500.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import selectors
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.contrib.auth import get_user_model
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections
from django.db.backends.utils import CursorWrapper
from django.test import Client

from portal.views import DATABASE_UNAVAILABLE

from serving.admission import LocalAdmission, RedisAdmission, TenantLimits, ledger_usage, window_id
from serving.config import REDIS_VERSION_KEY
from serving.ledger_spool import spool_summary
from serving.models import UsageRecord
from tenants import services
from tenants.models import ApiKey
from tests.support.redis_server import RedisServer, free_port
from tests.support.faults import POLICIES, Faults, assert_invariants, wait_until

OUTAGE_S = 5.0


class DatabaseProxy:
    """A TCP proxy to the database that the test can switch off and on again.

    `refuse()`: the listening socket is closed, so a new connection is refused (ECONNREFUSED, as from a
    database that is down or restarting), and every connection it carries is reset (RST to both ends: the
    gateway's next query on it fails, PostgreSQL ends the session). `accept()`: it listens again, same port.
    One thread runs it (a selector loop); the test's commands reach it through a queue.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.reset = 0  # connections reset by refuse()
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket] = {}
        self._listener: socket.socket | None = None
        self._commands: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="database-proxy", daemon=True)

    def start(self) -> "DatabaseProxy":
        self._listen()
        self._thread.start()
        return self

    def refuse(self) -> None:
        self._command("refuse")

    def accept(self) -> None:
        self._command("accept")

    def stop(self) -> None:
        self._command("stop")
        self._thread.join(5)

    def _command(self, name: str) -> None:
        done = threading.Event()
        self._commands.put((name, done))
        self._wake_w.send(b"x")
        assert done.wait(5), f"the database proxy did not {name}"

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.setblocking(False)
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "listen")

    def _close(self, sock: socket.socket, *, reset: bool) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        if reset:  # linger 0: close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _drop(self, sock: socket.socket, *, reset: bool = False) -> None:
        peer = self._peers.pop(sock, None)
        self._close(sock, reset=reset)
        if peer is not None:
            self._peers.pop(peer, None)
            self._close(peer, reset=reset)

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select(timeout=1):
                if key.data == "wake":
                    self._wake_r.recv(64)
                    while not self._commands.empty():
                        name, done = self._commands.get()
                        if name in ("refuse", "stop"):
                            if self._listener is not None:
                                self._close(self._listener, reset=False)
                                self._listener = None
                            pairs = len(self._peers) // 2
                            while self._peers:
                                self._drop(next(iter(self._peers)), reset=True)
                            self.reset += pairs if name == "refuse" else 0
                        elif name == "accept" and self._listener is None:
                            self._listen()
                        done.set()
                        if name == "stop":
                            return
                elif key.data == "listen":
                    try:
                        client, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    try:
                        upstream = socket.create_connection(self.upstream, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    for sock in (client, upstream):
                        sock.settimeout(5)  # recv only when readable; sendall may wait for a slow reader
                        self._sel.register(sock, selectors.EVENT_READ, "pipe")
                    self._peers[client], self._peers[upstream] = upstream, client
                else:
                    sock = key.fileobj
                    if sock not in self._peers:
                        continue  # dropped earlier in this round
                    try:
                        data = sock.recv(65536)
                        if data:
                            self._peers[sock].sendall(data)
                            continue
                    except OSError:
                        pass
                    self._drop(sock)


@pytest.fixture
def proxy(transactional_db):
    connection = connections[DEFAULT_DB_ALIAS]
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: set DATABASE_URL (CI does); SQLite has no connections to refuse")
    settings = connection.settings_dict
    p = DatabaseProxy((settings["HOST"] or "127.0.0.1", int(settings["PORT"] or 5432))).start()
    yield p
    p.stop()


@pytest.fixture
def faults(proxy, tmp_path):
    """test_faults.py's platform, its gateways connected to the test database through the proxy."""
    url = urlsplit(os.environ["DATABASE_URL"])
    netloc = url.netloc.rsplit("@", 1)[0] + "@" if "@" in url.netloc else ""
    db_url = urlunsplit(url._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}",
                                     path=f"/{connections[DEFAULT_DB_ALIAS].settings_dict['NAME']}"))
    f = Faults(tmp=tmp_path, db_url=db_url, redis=RedisServer().start(),
               extra_env={"PLATFORM_LEDGER_REPLAY_INTERVAL_S": "1"})
    try:
        yield f
    finally:
        f.stop()
        connections.close_all()


def web_get(gw: dict, path: str, headers: dict) -> tuple[int, dict, bytes]:
    """A console page or management API call to a gateway process (uvicorn serves Django's paths too)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(gw["url"] + path, headers=headers), timeout=15) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def metric(gw: dict, name: str) -> float:
    with urllib.request.urlopen(gw["url"] + "/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} is not in {gw['name']}'s metrics"
    return float(match.group(1))


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_the_database_refusing_connections_mid_burst_loses_no_usage_and_serves_from_the_snapshot(faults, proxy):
    """The database refuses new connections and drops the open ones for 5 s in the middle of a burst."""
    backend = faults.start_backend(tokens_per_s=60)
    faults.create(backend, {**POLICIES, "late": POLICIES["soft"]})
    gateways = [faults.start_gateway(), faults.start_gateway()]
    spool = faults.tmp / "spool"
    outage = {}
    browser = Client()
    browser.force_login(get_user_model().objects.get(email="soft@faults.test"))  # the soft tenant's owner
    key = {"authorization": f"Bearer {faults.keys['soft']}"}
    probes = {"/": {"cookie": f"sessionid={browser.cookies['sessionid'].value}"}, "/api/tenants/": key, "/v1/files": key}

    async def fault():
        while any(faults.counter(slug) is None for slug in POLICIES):  # both tenants' counters seeded (a loaded machine)
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        proxy.refuse()
        outage["start"] = time.monotonic()
        await asyncio.sleep(0.5)
        # A configuration change meanwhile: every gateway tries to reload its snapshot, and cannot.
        faults.redis.client().incr(REDIS_VERSION_KEY)
        await asyncio.sleep(OUTAGE_S - 1)
        outage["spooled"] = spool_summary(spool).records  # what waits for the database, in every gateway's spool
        outage["web"] = {path: await asyncio.to_thread(web_get, gateways[0], path, headers) for path, headers in probes.items()}
        await asyncio.sleep(0.5)
        proxy.accept()
        outage["end"] = time.monotonic()
        outage["reset"] = proxy.reset
        while spool_summary(spool).records and time.monotonic() - outage["end"] < 15:
            await asyncio.sleep(0.1)
        outage["replayed_s"] = time.monotonic() - outage["end"]  # the spools empty again (replayed every second here)

    async def late_tenant():
        """A tenant whose first request of the window comes while the database is away: its quota counter cannot
        be seeded from the ledger until it is back."""
        while "start" not in outage:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        await faults.burst(gateways, {"late": 2}, seconds=6, max_tokens=20)

    async def scenario():
        await asyncio.gather(faults.burst(gateways, {"soft": 6, "hard": 3}, seconds=12, max_tokens=30, fault=fault),
                             late_tenant())

    asyncio.run(scenario())
    assert outage["reset"] > 0, "the proxy carried no connection to reset: the outage dropped nothing"
    # Every gateway's spool is replayed into the database once it is back (replay every second here).
    assert wait_until(lambda: spool_summary(spool).records == 0, 20), f"still spooled: {spool_summary(spool)}"
    figures = assert_invariants(faults)
    during = [r for r in faults.results if outage["start"] <= r.started and r.ended <= outage["end"]]
    served = [r for r in during if r.status == 200 and r.completed]
    assert len(served) > 20 and outage["spooled"] > 0, (len(during), len(served), outage)
    assert all(r in served for r in during if r.tenant != "late"), [(r.tag, r.status, r.error) for r in during if r not in served]
    assert all(r.tokens == (20 if r.tenant == "late" else 30) for r in served)
    # The late tenant was refused in words while its quota could not be checked, and served once it could.
    late = [r for r in faults.results if r.tenant == "late"]
    refused = [r for r in late if r.status == 503]
    assert refused and all(r.error["error"]["code"] == "usage_unavailable" and r.started < outage["end"] for r in refused)
    assert any(r.status == 200 and r.completed for r in late if r.started > outage["end"]), [(r.tag, r.status) for r in late]
    # The console and the management API said what happened: a 503 naming the database, JSON under /api/ and /v1/.
    web = outage["web"]
    for path, (status, headers, body) in web.items():
        assert (status, headers.get("retry-after")) == (503, "60"), (path, status, body[:300])
    assert web["/"][1]["content-type"].startswith("text/html") and b"The database cannot be reached" in web["/"][2]
    assert json.loads(web["/api/tenants/"][2])["code"] == "database_unavailable"
    error = json.loads(web["/v1/files"][2])["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "database_unavailable") and "Retry" in error["message"]
    # After the outage: a configuration change reaches every gateway again (a new tenant's key), and the new
    # tenant's first requests (its counter seeded from the ledger, on the gateways' threads whose connections
    # the outage broke) are served by each gateway.
    before = len(faults.results)
    faults.create_tenants({f"after{i}": POLICIES["soft"] for i in range(3)})
    faults.redis.client().incr(REDIS_VERSION_KEY)
    for gw in gateways:
        for slug in ("after0", "after1", "after2"):
            faults.wait_http(gw["url"] + "/v1/models", gw["proc"], timeout=20,
                             headers={"authorization": f"Bearer {faults.keys[slug]}"})
    asyncio.run(faults.burst(gateways, {"after0": 2, "after1": 2, "after2": 2}, seconds=1, max_tokens=5))
    after = faults.results[before:]
    assert after and all(r.status == 200 and r.completed for r in after), [(r.tag, r.status, r.error) for r in after]
    assert_invariants(faults)
    for gw in gateways:
        assert gw["proc"].poll() is None, faults.log(gw["name"])
        assert metric(gw, "gateway_ledger_unwritten_records") == 0
    print(f"database refused for {OUTAGE_S:.0f} s ({outage['reset']} open connections reset): {len(served)} requests sent and "
          f"answered during the outage were served from the snapshot ({len(during) - len(served)} more were the late tenant's "
          f"503 usage_unavailable), {outage['spooled']} records "
          f"spooled, replayed within {outage['replayed_s']:.1f} s of its end; {figures}")


# ---- the mechanisms alone ------------------------------------------------------------------------------


def test_a_gateway_thread_whose_connection_the_database_dropped_reads_the_ledger_on_a_new_one(world, transactional_db):
    """The gateway reads the ledger (seeding a quota counter) on a worker thread that keeps its connection. A
    connection the database dropped meanwhile (restart, failover, an outage) is replaced, not failed on forever."""
    if connection.vendor == "sqlite":
        pytest.skip("needs PostgreSQL: no server drops an SQLite connection (and Django never closes the in-memory one)")
    UsageRecord.all_tenants.create(tenant=world.tenant, request_id="seeded-1", endpoint="chat", model="tiny-chat",
                                   input_tokens=11, output_tokens=7, status="ok", duration_ms=5)
    worker = ThreadPoolExecutor(max_workers=1)

    def drop_the_connection():
        connection.ensure_connection()
        connection.connection.close()  # what the database's end of a reset connection leaves the thread

    async def scenario():
        asyncio.get_running_loop().set_default_executor(worker)  # ledger_usage's thread (sync_to_async)
        await asyncio.get_running_loop().run_in_executor(worker, drop_the_connection)
        first = await ledger_usage(world.tenant.id, "month", window_id("month"))
        second = await ledger_usage(world.tenant.id, "month", window_id("month"))
        await asyncio.get_running_loop().run_in_executor(worker, lambda: connection.close())
        return first, second

    assert asyncio.run(scenario()) == (18, 18)


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_quota_counter_the_ledger_cannot_seed_is_a_503_in_words_until_the_database_answers(kind, request):
    database = {"down": True}

    async def loader(tenant_id, window_kind, window, *, exclude=()):
        if database["down"]:
            raise OperationalError('connection to server at "10.0.0.5", port 5432 failed: Connection refused')
        return 0

    adm = LocalAdmission(loader) if kind == "local" else RedisAdmission(request.getfixturevalue("redis_url"), usage_loader=loader)
    for mode in ("soft", "hard"):
        lim = TenantLimits(tenant_id=uuid.uuid4().int % 10**9, quota_tokens=1000, quota_mode=mode)
        refused = asyncio.run(adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=10))
        assert (refused.allowed, refused.status, refused.code, refused.retry_after) == (False, 503, "usage_unavailable", 5)
        assert "database is unavailable" in refused.message and "Retry" in refused.message
        database["down"] = False
        admitted = asyncio.run(adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=10))
        assert admitted.allowed
        database["down"] = True


@pytest.mark.parametrize("path", ["/", "/api/tenants/", "/v1/files"])
def test_a_console_or_api_request_while_the_database_cannot_be_reached_is_a_503_that_says_so(client, world, monkeypatch, path):
    client.force_login(world.owner)
    _, key = services.api_key_create(tenant=world.tenant, name="ops", scopes=[ApiKey.Scope.INFERENCE.value], actor=services.SYSTEM)
    client.raise_request_exception = False  # as served: handler500 answers

    def refused(*args, **kwargs):
        raise OperationalError('connection to server at "10.0.0.5", port 5432 failed: Connection refused')

    with monkeypatch.context() as patch:  # undone before the test database's own teardown
        patch.setattr(CursorWrapper, "execute", refused)
        r = client.get(path, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert (r.status_code, r["retry-after"]) == (503, "60")
    if path == "/":
        assert r["content-type"].startswith("text/html")
        assert "The database cannot be reached right now" in r.content.decode() and "Retry in a minute" in r.content.decode()
    elif path.startswith("/api/"):
        assert r.json() == {"detail": DATABASE_UNAVAILABLE, "code": "database_unavailable"}
    else:
        assert r.json() == {"error": {"message": DATABASE_UNAVAILABLE, "type": "service_unavailable", "param": None,
                                      "code": "database_unavailable"}}


def test_any_other_failure_under_v1_stays_a_500_in_openai_shape(client, world, monkeypatch):
    _, key = services.api_key_create(tenant=world.tenant, name="ops", scopes=[ApiKey.Scope.FINETUNE.value], actor=services.SYSTEM)
    client.raise_request_exception = False

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(CursorWrapper, "execute", broken)
        r = client.get("/v1/files", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert r.status_code == 500 and "retry-after" not in r
    assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "internal_error"
