"""The fault-injection harness (tests/serving/test_faults.py, test_faults_database.py): real gateway processes
on a private redis-server and the test database, clients that count the tokens they receive, and the four
invariants asserted after each fault (see test_faults.py's docstring and docs/limits.md, "Faults")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.db import connections
from django.db.models import Sum

from serving.admission import window_id
from serving.models import Backend, BackendPool, BaseModel, ModelConfig, UsageRecord
from tenants import services
from tenants.models import ApiKey
from tests.support.databases import shared_database_url
from tests.support.users import make_user
from tests.support.redis_server import RedisServer, free_port


ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
MODEL, MODEL_ID = "tiny-chat", "platform/tiny-chat"
CAPACITY = 8  # the pool's scheduler slots
LEASE_S = 10  # serving.leases.LEASE_MS: the bound on how long a dead process's slot may outlive it


@pytest.fixture
def database_url(transactional_db, tmp_path):
    """DATABASE_URL of the test database for the gateway processes (as tests/test_celery_worker.py does it)."""
    yield from shared_database_url(tmp_path, "gateways.sqlite3")


@dataclass
class Result:
    """What one client request saw."""

    tag: str  # its x-request-id: the ledger's request_id starts with it
    tenant: str
    status: int = 0
    tokens: int = 0  # words (= tokens) of content received
    error: dict | None = None  # the JSON error body (or in-stream error event)
    raw_error: bytes = b""  # a body that is not an OpenAI-shaped error
    cut: bool = False  # the stream ended without its end (the gateway died)
    completed: bool = False
    started: float = 0.0  # time.monotonic() when it was sent
    ended: float = 0.0  # and when its answer ended


@dataclass
class Faults:
    """The platform under test: Redis, a backend, gateway processes, tenants."""

    tmp: Path
    db_url: str
    redis: RedisServer
    procs: list = field(default_factory=list)
    gateways: list = field(default_factory=list)
    keys: dict = field(default_factory=dict)  # tenant slug -> API key
    tenants: dict = field(default_factory=dict)  # tenant slug -> Tenant
    pool_id: int = 0
    results: list = field(default_factory=list)
    extra_env: dict = field(default_factory=dict)  # more settings for every process
    _n: int = 0

    def env(self) -> dict:
        var = self.tmp / "var"
        return {
            **os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "DATABASE_URL": self.db_url, "REDIS_URL": self.redis.url,
            "PLATFORM_VAR_DIR": str(var), "PLATFORM_GATEWAY_JOURNAL_DIR": str(self.tmp / "journal"),
            "PLATFORM_LEDGER_SPOOL_DIR": str(self.tmp / "spool"), "CELERY_BROKER_URL": "filesystem://",
            "PLATFORM_GATEWAY_CONFIG_POLL_MS": "200", "PLATFORM_GATEWAY_HEALTH_INTERVAL_MS": "500",
            "PLATFORM_QUEUE_TIMEOUT_S": "20", "DJANGO_DEBUG": "false", "PYTHONUNBUFFERED": "1", **self.extra_env,
        }

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    @staticmethod
    def wait_http(url: str, proc, timeout: float = 60, headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{proc.name} exited"
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} did not answer within {timeout:.0f} s")

    def start_backend(self, tokens_per_s: int) -> str:
        port = free_port()
        proc = self.spawn("backend", [PY, "-m", "devbackend", "--simulate", "--model-id", MODEL_ID, "--port", str(port),
                                      "--sim-tokens-per-second", str(tokens_per_s), "--sim-ttft-ms", "5",
                                      "--max-concurrent-requests", "256", "--max-total-tokens", "4096"])
        url = f"http://127.0.0.1:{port}"
        self.wait_http(url + "/health", proc)
        return url

    def start_gateway(self) -> dict:
        port = free_port()
        n = len(self.gateways)
        proc = self.spawn(f"gateway{n}", [str(Path(PY).with_name("uvicorn")), "portal.asgi:application", "--host", "127.0.0.1",
                                          "--port", str(port), "--workers", "1", "--log-level", "warning"])
        gw = {"url": f"http://127.0.0.1:{port}", "proc": proc, "name": proc.name}
        self.wait_http(gw["url"] + "/metrics", proc)
        for key in self.keys.values():
            self.wait_http(gw["url"] + "/v1/models", proc, headers={"authorization": f"Bearer {key}"})
        self.gateways.append(gw)
        return gw

    def kill(self, gw: dict) -> None:
        os.kill(gw["proc"].pid, signal.SIGKILL)
        gw["proc"].wait(10)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.redis.stop()

    # -- data --

    def create(self, backend_url: str, tenants: dict[str, dict]) -> None:
        base = BaseModel.objects.create(name=MODEL, hf_id=MODEL_ID, context_length=4096)
        pool = BackendPool.objects.create(name="shared", base_model=base, kind=BackendPool.Kind.DEV, capacity=CAPACITY)
        Backend.objects.create(pool=pool, url=backend_url, max_concurrency=64)
        self.pool_id = pool.id
        self.create_tenants(tenants)

    def create_tenants(self, tenants: dict[str, dict]) -> None:
        for slug, policy in tenants.items():
            tenant = services.tenant_create(slug=slug, name=slug, owner=make_user(f"{slug}@faults.test"))
            services.policy_update(tenant=tenant, actor=services.SYSTEM, **policy)
            ModelConfig.all_tenants.update_or_create(tenant=tenant, defaults={"default_model": MODEL})
            _, self.keys[slug] = services.api_key_create(tenant=tenant, name="faults", scopes=[ApiKey.Scope.INFERENCE.value],
                                                         actor=services.SYSTEM)
            self.tenants[slug] = tenant

    # -- clients --

    async def request(self, session, gw: dict, tenant: str, max_tokens: int) -> Result:
        import aiohttp

        self._n += 1
        res = Result(tag=f"flt-{self._n}", tenant=tenant, started=time.monotonic())
        self.results.append(res)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens, "stream": True}
        headers = {"authorization": f"Bearer {self.keys[tenant]}", "x-request-id": res.tag}
        try:
            async with session.post(gw["url"] + "/v1/chat/completions", json=body, headers=headers) as resp:
                res.status = resp.status
                if resp.status != 200:
                    raw = await resp.read()
                    try:
                        res.error = json.loads(raw)
                    except ValueError:
                        res.raw_error = raw
                    return res
                async for line in resp.content:
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        res.completed = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        res.error = event
                        continue
                    for choice in event.get("choices", []):
                        res.tokens += len((choice.get("delta", {}).get("content") or "").split())
                if not res.completed and res.error is None:
                    res.cut = True
        except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
            res.cut = True
        finally:
            res.ended = time.monotonic()
        return res

    async def burst(self, gateways: list[dict], tenants: dict[str, int], *, seconds: float, max_tokens: int, fault=None) -> None:
        """Clients (per tenant: how many) each send request after request, alternating gateways, for `seconds`;
        `fault` (a coroutine function) runs alongside."""
        import aiohttp

        stop_at = time.monotonic() + seconds

        async def client(i: int, tenant: str):
            while time.monotonic() < stop_at:
                res = await self.request(session, gateways[i % len(gateways)], tenant, max_tokens)
                if res.status in (429, 503) and res.error is not None:
                    await asyncio.sleep(0.2)
                i += 1

        timeout = aiohttp.ClientTimeout(total=120, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            clients = [client(i, tenant) for tenant, n in tenants.items() for i in range(n)]
            await asyncio.gather(*clients, *([fault()] if fault else []))

    # -- what the invariants read --

    def ledger(self) -> dict[str, list[UsageRecord]]:
        rows: dict[str, list[UsageRecord]] = {}
        for r in UsageRecord.all_tenants.filter(tenant__in=self.tenants.values()):  # all_tenants: the test's tenants
            rows.setdefault(r.request_id.split("~")[0], []).append(r)
        return rows

    def ledger_tokens(self, slug: str) -> int:
        agg = UsageRecord.objects.for_tenant(self.tenants[slug]).aggregate(i=Sum("input_tokens"), o=Sum("output_tokens"))
        return (agg["i"] or 0) + (agg["o"] or 0)

    def counter(self, slug: str) -> int | None:
        tenant = self.tenants[slug]
        value = self.redis.client().hget(f"mtl:{{t{tenant.id}}}:quota:{window_id(tenant.policy.quota_window)}", "used")
        return None if value is None else int(value)

    def held(self) -> dict[str, int]:
        """Live slots, concurrency entries and reserved tokens in Redis (expired leases released first)."""
        r = self.redis.client()
        now_ms = int(time.time() * 1000)
        out = {"slots": r.zcount(f"mtl:{{p{self.pool_id}}}:slots", now_ms, "+inf"), "inflight": 0, "reserved": 0}
        sweep = r.register_script((ROOT / "serving" / "lua" / "sweep.lua").read_text())
        for tenant in self.tenants.values():
            p = f"mtl:{{t{tenant.id}}}:"
            sweep(keys=[p + "inflight", p + "res"])
            out["inflight"] += r.zcount(p + "inflight", now_ms, "+inf")
            out["reserved"] += int(r.hget(p + f"quota:{window_id(tenant.policy.quota_window)}", "reserved") or 0)
        return out


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def faults(database_url, tmp_path):
    f = Faults(tmp=tmp_path, db_url=database_url, redis=RedisServer().start())
    try:
        yield f
    finally:
        f.stop()
        connections.close_all()


def assert_invariants(f: Faults, *, quiet_within: float = 5.0) -> dict:
    """The four invariants of the module docstring; returns a few figures for the failure messages and the log."""
    # 4. Every error a client got is OpenAI-shaped JSON.
    for res in f.results:
        assert not res.raw_error, f"{res.tag}: a {res.status} that is not JSON: {res.raw_error[:200]!r}"
        if res.error is not None:
            err = res.error.get("error")
            assert isinstance(err, dict) and {"message", "type", "code"} <= set(err), f"{res.tag}: {res.error}"
        assert res.status in (200, 429, 503) or res.cut, f"{res.tag}: status {res.status} ({res.error})"
    # 3. Nothing held once the requests ended (deferred releases done, dead processes' leases expired).
    started = time.monotonic()
    held = wait_until(lambda: (lambda h: h if not any(h.values()) else None)(f.held()), quiet_within + LEASE_S)
    assert held, f"still held in Redis {time.monotonic() - started:.1f} s after the last request ended: {f.held()}"
    released_s = time.monotonic() - started
    # 1. Every token a client received is in the ledger exactly once.
    ledger = wait_until(lambda: (lambda rows: rows if all(
        len(rows.get(r.tag, ())) == 1 for r in f.results if r.tokens or r.status == 200) else None)(f.ledger()), 20)
    rows = f.ledger()
    assert ledger, "requests without their ledger record: " + ", ".join(
        f"{r.tag} ({r.tokens} tokens, {r.status})" for r in f.results if (r.tokens or r.status == 200) and len(rows.get(r.tag, ())) != 1)
    tags = {r.tag for r in f.results}
    assert set(rows) <= tags and all(len(v) == 1 for v in rows.values())
    wrong = [f"{res.tag}: the client received {res.tokens} tokens, the ledger says {row.output_tokens} ({row.status})"
             for res in f.results for row in rows.get(res.tag, ()) if row.output_tokens != res.tokens]
    assert not wrong, "; ".join(wrong)
    # 2. The counters equal the ledger.
    for slug in f.tenants:
        equal = wait_until(lambda: f.counter(slug) == f.ledger_tokens(slug), 15)
        assert equal, f"tenant {slug}: counter {f.counter(slug)} vs ledger {f.ledger_tokens(slug)}"
    return {"released_s": released_s, "requests": len(f.results), "tokens": sum(r.tokens for r in f.results)}


UNLIMITED = {"requests_per_minute": 0, "tokens_per_minute": 0, "max_concurrent_requests": 0}
POLICIES = {  # one tenant on each side of admission's Redis fallback (docs/limits.md, "Redis unavailable")
    "soft": {**UNLIMITED, "quota_tokens": 5_000_000, "quota_mode": "soft"},
    "hard": {**UNLIMITED, "quota_tokens": 5_000_000, "quota_mode": "hard", "max_concurrent_requests": 4},
}
