"""Shared machinery of the serving benchmarks (bench/gateway.py, bench/fairness.py).

- an isolated platform: a fresh var dir + SQLite DB (or DATABASE_URL if given), migrated, with platform data
  created through the Django ORM in *this* process (tenants, keys, policies, base model, pool, backends);
- the simulated dev backend and N real gateway processes
  (`uvicorn portal.asgi:application --workers 1`), each pinned with taskset, with the right environment;
- CPU time of a process from /proc/<pid>/stat; percentiles; the docs/benchmarks.md section writer.

Django is configured at import of `Platform.setup()` time from the environment the Platform builds, so the
benchmark process and the gateways it starts read the same database and the same Redis.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
UVICORN = str(Path(PY).with_name("uvicorn"))
DOCS = ROOT / "docs" / "benchmarks.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
MODEL_ID = "platform/tiny-chat"  # what the simulated backend calls its model
MODEL = "tiny-chat"  # the tenant-visible name


# ---- small helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def percentile(values, p: float) -> float:
    """Nearest-rank-interpolated percentile (p in 0..100) of a list; nan when empty."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of the full line


def http_json(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict | None]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw) if raw else None
        except ValueError:
            return err.code, None


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine() -> str:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc={os.cpu_count()}" + (f", {model}" if model else "")


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_args(core: int | str | None) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def write_section(title: str, body: str, path: Path = DOCS) -> None:
    """Write `## title` + body into docs/benchmarks.md, replacing the previous section of that title.

    A section runs from its `## title` line to its end marker, so other scripts' sections (and their
    `###` sub-headings) before or after it are kept as they are.
    """
    marker = f"<!-- end: {title} -->"
    section = f"## {title}\n\n{body.rstrip()}\n\n{marker}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## " + re.escape(title) + r"\n.*?^" + re.escape(marker) + r"\n?", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ---- processes ------------------------------------------------------------------------------------


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, url: str, log: Path):
        self.name, self.popen, self.url, self.log = name, popen, url, log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Platform:
    """An isolated platform: var dir, database, Redis DB, and the processes started for it."""

    def __init__(self, *, redis_url: str | None = None, database_url: str | None = None, keep: bool = False, extra_env: dict | None = None):
        self.var = Path(tempfile.mkdtemp(prefix="bench-", dir=None))
        self.keep = keep
        self.redis_url = redis_url or ""
        self.database_url = database_url or f"sqlite:///{self.var / 'platform.sqlite3'}"
        self.procs: list[Proc] = []
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "PLATFORM_VAR_DIR": str(self.var),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "PYTHONUNBUFFERED": "1",
            "DJANGO_DEBUG": os.environ.get("DJANGO_DEBUG", "false"),  # production-like: no debug cursor / query log
            **(extra_env or {}),
        }
        if not self.redis_url:
            self.env.pop("REDIS_URL", None)

    # -- database and data --

    def setup_django(self) -> None:
        """Configure Django in this process for the platform's database and Redis, and migrate."""
        for k in ("DJANGO_SETTINGS_MODULE", "PLATFORM_VAR_DIR", "DATABASE_URL"):
            os.environ[k] = self.env[k]
        if self.redis_url:
            os.environ["REDIS_URL"] = self.redis_url
        else:
            os.environ.pop("REDIS_URL", None)
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        if self.redis_url:
            self.redis_clean()

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def redis_clean(self) -> None:
        """Delete the platform's keys (mtl:*) of the benchmark's Redis DB: a fresh DB reuses tenant ids."""
        r = self.redis()
        keys = list(r.scan_iter("mtl:*", count=1000))
        for i in range(0, len(keys), 500):
            r.delete(*keys[i:i + 500])

    def create_model_and_pool(self, backend_urls: list[str], *, capacity: int = 0, max_concurrency: int = 64, name: str = "bench-pool"):
        from serving.models import Backend, BackendPool, BaseModel

        base, _ = BaseModel.objects.get_or_create(name=MODEL, defaults={"hf_id": MODEL_ID, "context_length": 4096})
        pool = BackendPool.objects.create(name=name, base_model=base, kind=BackendPool.Kind.DEV, capacity=capacity)
        for url in backend_urls:
            Backend.objects.create(pool=pool, url=url, max_concurrency=max_concurrency, enabled=True)
        self._close_db()
        return pool

    def create_tenant(self, slug: str, *, weight: int = 1, prompt: str = "", **policy) -> dict:
        """A tenant with an owner, a policy (weight + limits), a model config and an inference key."""
        from django.contrib.auth import get_user_model

        from serving.models import ModelConfig
        from tenants import services
        from tenants.models import ApiKey

        owner = get_user_model().objects.create(username=f"{slug}@bench.invalid", email=f"{slug}@bench.invalid")
        tenant = services.tenant_create(slug=slug, name=slug, owner=owner)
        services.policy_update(tenant=tenant, actor=services.SYSTEM, weight=weight, **policy)
        ModelConfig.all_tenants.update_or_create(tenant=tenant, defaults={"default_model": MODEL})
        if prompt:
            services.system_prompt_save(tenant=tenant, text=prompt, note="bench", actor=services.SYSTEM)
        _, secret = services.api_key_create(tenant=tenant, name="bench", scopes=[ApiKey.Scope.INFERENCE.value], actor=services.SYSTEM)
        self._close_db()
        return {"id": tenant.id, "slug": slug, "key": secret, "weight": weight}

    def set_policy(self, tenant_id: int, **changes) -> None:
        from tenants import services
        from tenants.models import Tenant

        services.policy_update(tenant=Tenant.objects.get(pk=tenant_id), actor=services.SYSTEM, **changes)
        self._close_db()

    def ledger(self, tenant_id: int, since: datetime | None = None) -> dict:
        """Sum of the tenant's ledger (input, output, count, by status)."""
        from django.db.models import Count, Sum

        from serving.models import UsageRecord

        qs = UsageRecord.objects.for_tenant(tenant_id)
        if since is not None:
            qs = qs.filter(created_at__gte=since)
        by = {row["status"]: row for row in qs.values("status").annotate(n=Count("id"), i=Sum("input_tokens"), o=Sum("output_tokens"))}
        total_in = sum(r["i"] or 0 for r in by.values())
        total_out = sum(r["o"] or 0 for r in by.values())
        self._close_db()
        return {"input": total_in, "output": total_out, "tokens": total_in + total_out, "count": sum(r["n"] for r in by.values()),
                "by_status": {k: v["n"] for k, v in by.items()}}

    @staticmethod
    def _close_db() -> None:
        from django.db import connections

        connections.close_all()

    # -- processes --

    def _spawn(self, name: str, argv: list[str], *, core=None, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.var / f"{name}.log"
        popen = subprocess.Popen(pin_args(core) + argv, cwd=ROOT, env={**self.env, **(env or {})}, stdout=open(log, "wb"),
                                 stderr=subprocess.STDOUT, start_new_session=True)
        return popen, log

    def start_backend(self, *, core=None, tokens_per_s: float = 0, ttft_ms: float = 0, output_tokens: int = 16,
                      max_concurrent: int = 1024, extra: list[str] = (), name: str = "backend") -> Proc:
        port = free_port()
        argv = [PY, "-m", "devbackend", "--simulate", "--model-id", MODEL_ID, "--port", str(port),
                "--sim-tokens-per-second", str(tokens_per_s), "--sim-ttft-ms", str(ttft_ms), "--sim-output-tokens", str(output_tokens),
                "--max-concurrent-requests", str(max_concurrent), "--max-total-tokens", "4096", *extra]
        popen, log = self._spawn(name, argv, core=core)
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log)
        self.procs.append(proc)
        self._wait_http(proc, "/health")
        return proc

    def start_gateway(self, *, core=None, env: dict | None = None, name: str = "gateway") -> Proc:
        port = free_port()
        argv = [UVICORN, "portal.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
        popen, log = self._spawn(name, argv, core=core, env=env)
        proc = Proc(name, popen, f"http://127.0.0.1:{port}", log)
        self.procs.append(proc)
        self._wait_http(proc, "/metrics")
        return proc

    def start_worker(self, *, core=None, queues: str = "default,finetune", name: str = "worker", timeout: float = 60.0,
                     concurrency: int = 1, nice: int = 0) -> Proc:
        """A Celery worker as scripts/up.sh starts it (`--pool solo`, or prefork with `concurrency` > 1, at `nice`; the
        filesystem broker under the var dir in the embedded default, Redis when the platform has one), waited for until
        it says it is ready. The validation worker: queues="validation", concurrency=2, nice=10."""
        for folder in ("queue", "processed", "control"):
            (self.var / "celery" / folder).mkdir(parents=True, exist_ok=True)
        celery = str(Path(PY).with_name("celery"))
        pool = ["--pool", "solo"] if concurrency == 1 else ["--concurrency", str(concurrency)]
        argv = [*(["nice", "-n", str(nice)] if nice else []), celery, "-A", "portal", "worker", "-Q", queues, *pool,
                "--loglevel", "INFO", "--hostname", f"{name}@bench"]
        popen, log = self._spawn(name, argv, core=core)
        proc = Proc(name, popen, "", log)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{name} exited:\n{proc.tail()}")
            if " ready." in log.read_text(errors="replace"):
                return proc
            time.sleep(0.2)
        raise RuntimeError(f"{name} was not ready within {timeout:.0f} s:\n{proc.tail()}")

    @staticmethod
    def _wait_http(proc: Proc, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                with urllib.request.urlopen(proc.url + path, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} did not answer {path} within {timeout:.0f} s:\n{proc.tail()}")

    def wait_key_ready(self, gateway_url: str, key: str, timeout: float = 20.0) -> None:
        """Until the gateway's config snapshot knows the key (GET /v1/models: auth only, no admission)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = http_json("GET", gateway_url + "/v1/models", headers={"authorization": f"Bearer {key}"})
            if status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{gateway_url} did not pick up the new key within {timeout:.0f} s")

    def wait_config(self, seconds: float = 1.5) -> None:
        """Let the gateways' config pollers (500 ms) pick up a policy change."""
        time.sleep(seconds)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception:
                pass
        self.procs.clear()
        if not self.keep:
            shutil.rmtree(self.var, ignore_errors=True)

    def __enter__(self) -> "Platform":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_url_from(args_value: str | None) -> str:
    """--redis-url, else $REDIS_URL, else the benchmarks' default DB; '' or 'none' = no Redis."""
    value = args_value if args_value is not None else os.environ.get("REDIS_URL", DEFAULT_REDIS)
    return "" if value in ("", "none") else value


def redis_reachable(url: str) -> bool:
    if not url:
        return False
    try:
        import redis

        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False
