"""Noisy neighbour (issue 12): while one tenant does the worst the API allows, another tenant's p99 latency stays
within 1.5× of its solo figure.

The platform as the embedded default deploys it (scripts/up.sh): one uvicorn process serving console + API +
gateway (`portal.asgi:application`), the Celery worker (`--pool solo`, filesystem broker; Redis with
--redis-url) and the validation worker (`-Q validation --concurrency 2`, nice 10), SQLite (or --database-url), the simulated dev backend. Two tenants set up through services:

- Q (quiet): a steady open-loop load, in this process: short chat completions (non-streamed: latency; streamed:
  time to first token), GET /v1/models (the gateway) and GET of its console dashboard (Django, signed in).
- N (noisy), in a process of its own, concurrently, within its own limits (attacks, --attacks):
  patterns  its output guard holds the worst custom redaction pattern the console accepts (--pattern) and it
            asks for long answers, streamed and not, that all go through the guard;
  uploads   uploads valid JSONL training files of --upload-mb (prompt/completion lines, ~37 bytes each: ~10^6
            lines at 35 MB), --upload-concurrency at a time (validated in the request or on the worker: the
            table says which, from the upload's answer);
  diff      GETs the line diff of two system prompt versions of PLATFORM_MAX_PROMPT_CHARS each, shaped for
            difflib's worst case (2-character lines, each repeated just under its junk threshold);
  huge      max-context chats: big tool definitions (as many as fit half the context), then 200 messages
            filling the rest up to max_tokens, sized by the gateway's own exact counting;
  oversize  1 MB chat bodies (the gateway's body limit; 128 big tools, 2,000 messages): parsed and counted
            exactly, then refused (400 context_length_exceeded);
  slow      streams with long answers read slowly (a 4 KiB receive buffer, 512 bytes every 0.2 s).

Phases, back to back: solo, one per attack, all together, solo again (the two solos pooled are the baseline).
Each phase: N starts, Q measures for --phase-s, N stops, then the platform is let settle (its CPU quiet) before the
next. Reported per Q measure: p50 / p99 and p99 ÷ solo p99 (target ≤ 1.5).

    .venv/bin/python bench/noisy_neighbour.py                       # all attacks, ~4-5 minutes on 2 cores
    .venv/bin/python bench/noisy_neighbour.py --attacks uploads --phase-s 15
    .venv/bin/python bench/noisy_neighbour.py --only-all            # solo vs all together
    .venv/bin/python bench/noisy_neighbour.py --redis-url redis://127.0.0.1:6379/6
    add --profile PHASE (e.g. patterns) to sample the platform process with py-spy during that phase
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as H  # noqa: E402

TITLE = "Noisy neighbour"
ATTACKS = ("chats", "patterns", "uploads", "diff", "huge", "oversize", "slow")
MEASURES = (("chat", "chat p50 / p99 ms"), ("ttft", "stream TTFT p50 / p99 ms"), ("models", "/v1/models p50 / p99 ms"),
            ("page", "dashboard p50 / p99 ms"), ("file", "Q's file validated p50 / p99 ms"))
Q_FILE = b"".join(b'{"prompt":"question %d","completion":"answer %d"}\n' % (i, i) for i in range(20))  # Q's small training file
TARGET = 1.5
Q_PROMPT = "You are the helpful assistant of Quiet Ltd. Answer briefly."
N_PROMPT = "You are the assistant of Noisy Corp."
Q_TEXT = "Hello! Please tell me something short about the weather today."
# The worst custom patterns found, worst first; N saves the first one the console accepts at this commit. Nested
# counted repetitions make RE2 programs that its DFA cannot run in its memory budget, so it simulates the NFA: RE2
# refuses {1,40} nested in {1,40}; the guard (since 36f7abc) more than 500 instructions a pattern.
WORST_PATTERNS = (r"(?:(?:\S+\s?){1,30}){1,30}#",  # 15,303 RE2 instructions
                  r"(?:(?:\S+\s){0,5}\S+){1,6}#",  # 557
                  r"(?:(?:\S+\s?){1,5}){1,5}#",  # 428
                  r"(?:\S+\s?)+#")  # 21: the classic catastrophic pattern of backtracking engines


# ---- setup ------------------------------------------------------------------------------------------


def diff_prompts(chars: int, width: int = 2) -> tuple[str, str]:
    """Two versions of `chars` characters that make difflib's SequenceMatcher work hard on lines: `width`-character
    lines, each repeated just under the autojunk threshold (1 % of the lines), in two orders. Width 2: 100 distinct
    lines in 6,666 (5 s a diff before 228e91e); width 19: 1,000 lines, the most the bounded diff still matches."""
    n = chars // (width + 1)
    k = 100 if width == 2 else max(2, n // 10)
    old = "\n".join(f"{i % k:0{width}d}" for i in range(n))[:chars]
    new = "\n".join(f"{(i * 7) % k:0{width}d}" for i in range(n))[:chars]
    return old, new


def upload_file(path: Path, mb: float) -> tuple[Path, int]:
    """A valid prompt/completion JSONL file of about `mb` MB; distinct lines (no duplicates to report)."""
    line = b'{"prompt":"q%08d","completion":"a."}\n'
    lines = int(mb * 1_000_000) // len(line % 0)
    with open(path, "wb") as f:
        for start in range(0, lines, 100_000):
            f.write(b"".join(line % i for i in range(start, min(lines, start + 100_000))))
    return path, lines


def setup_tenants(plat, args) -> dict:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from serving.guard import custom_pattern_error
    from serving.models import ModelConfig

    try:
        from serving.guard import patterns_total_error
    except ImportError:  # before 36f7abc
        def patterns_total_error(patterns):
            return None
    from tenants import services
    from tenants.models import ApiKey, Tenant

    from tenants.models import PlatformSettings

    generous = dict(requests_per_minute=100_000, tokens_per_minute=100_000_000, quota_tokens=0)
    if args.noisy_plan == "self-service":  # the plan a new self-service tenant starts on (PlatformSettings.new_tenant_*)
        ps = PlatformSettings.load()
        plan = dict(requests_per_minute=ps.new_tenant_requests_per_minute, tokens_per_minute=ps.new_tenant_tokens_per_minute,
                    quota_tokens=ps.new_tenant_quota_tokens, quota_window=ps.new_tenant_quota_window,
                    quota_mode=ps.new_tenant_quota_mode, max_concurrent_requests=ps.new_tenant_max_concurrent_requests)
    else:
        plan = dict(generous, max_concurrent_requests=args.noisy_concurrency)
    q = plat.create_tenant("quiet", prompt=Q_PROMPT, **generous)
    n = plat.create_tenant("noisy", prompt=N_PROMPT, **plan)
    plain = plat.create_tenant("plain", prompt=N_PROMPT, **plan)  # N's chats without a guard (the control)
    tenant_n = Tenant.objects.get(pk=n["id"])
    # N: two long versions of its prompt to diff, then a short active one (its chats must fit the context).
    versions = []
    for width in (2, 19):
        old, new = diff_prompts(settings.PLATFORM_MAX_PROMPT_CHARS, width)
        v_old = services.system_prompt_save(tenant=tenant_n, text=old, note=f"long A, {width}-character lines", actor=services.SYSTEM)
        v_new = services.system_prompt_save(tenant=tenant_n, text=new, note=f"long B, {width}-character lines", actor=services.SYSTEM)
        versions.append((v_new.version, v_old.version))
    services.system_prompt_save(tenant=tenant_n, text=N_PROMPT, note="short", actor=services.SYSTEM)
    _, n_key = services.api_key_create(tenant=tenant_n, name="noisy-all", actor=services.SYSTEM,
                                       scopes=[s.value for s in (ApiKey.Scope.INFERENCE, ApiKey.Scope.FINETUNE,
                                                                 ApiKey.Scope.MANAGEMENT_READ, ApiKey.Scope.MANAGEMENT_WRITE)])
    # N's output guard: the built-in detectors and the worst pattern, as the console form would accept them.
    candidates = [args.pattern] if args.pattern else WORST_PATTERNS
    refused = {}
    for pattern in candidates:
        patterns = [pattern] + [pattern[:-1] + c for c in "@~%&=!;"][: max(0, args.patterns - 1)]
        errors = [e for e in map(custom_pattern_error, patterns) if e] or ([patterns_total_error(patterns)] if patterns_total_error(patterns) else [])
        if not errors:
            break
        refused[pattern] = errors[0]
    else:
        raise SystemExit(f"the console refuses every candidate pattern: {refused}")
    cfg = ModelConfig.all_tenants.get(tenant_id=n["id"])
    cfg.redact_emails = cfg.redact_phone_numbers = cfg.redact_card_numbers = True
    cfg.redact_patterns = patterns if "patterns" in args.attacks else []
    cfg.save()
    # Q's owner signed in to the console: a session cookie for its dashboard.
    owner = get_user_model().objects.get(username="quiet@bench.invalid")
    client = Client()
    client.force_login(owner)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    _, q_files_key = services.api_key_create(tenant=Tenant.objects.get(pk=q["id"]), name="quiet-files", actor=services.SYSTEM,
                                             scopes=[ApiKey.Scope.FINETUNE.value])
    plat._close_db()
    return {"q": q, "q_files_key": q_files_key, "n": n, "plan": plan, "plain": plain, "refused_patterns": refused, "n_key": n_key, "q_cookie": cookie, "diff_versions": versions,
            "patterns": patterns, "prompt_chars": settings.PLATFORM_MAX_PROMPT_CHARS}


# ---- the quiet tenant ----------------------------------------------------------------------------------


async def quiet_load(base: str, key: str, cookie: str, slug: str, rates: dict, duration_s: float, files_key: str = "",
                     file_grace_s: float = 10.0) -> list[dict]:
    """Open loop: each kind at its own fixed interval for `duration_s`; every request its own task. A file ("file")
    is measured from its upload until its validation has finished (polled every 0.25 s, for at most the phase plus
    `file_grace_s`: a file still validating then counts as an error, "pending")."""
    import aiohttp

    records: list[dict] = []
    auth = {"authorization": f"Bearer {key}"}
    file_deadline = time.monotonic() + duration_s + file_grace_s
    chat = {"model": H.MODEL, "messages": [{"role": "user", "content": Q_TEXT}], "max_tokens": 16, "temperature": 0}
    bodies = {"chat": json.dumps(chat).encode(), "ttft": json.dumps({**chat, "stream": True}).encode()}

    async def one(session, kind: str):
        t0 = time.perf_counter()
        rec = {"kind": kind, "status": 0, "ms": None, "ttft": None, "error": ""}
        try:
            if kind in ("chat", "ttft"):
                async with session.post(base + "/v1/chat/completions", data=bodies[kind],
                                        headers={**auth, "content-type": "application/json"}) as resp:
                    rec["status"] = resp.status
                    if kind == "chat":
                        await resp.read()
                    else:
                        async for line in resp.content:
                            if rec["ttft"] is None and line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
                                rec["ttft"] = (time.perf_counter() - t0) * 1000
            elif kind == "file":
                fauth = {"authorization": f"Bearer {files_key}"}
                form = aiohttp.FormData()
                form.add_field("purpose", "fine-tune")
                form.add_field("file", Q_FILE, filename="quiet.jsonl", content_type="application/jsonl")
                async with session.post(base + "/v1/files", data=form, headers=fauth) as resp:
                    rec["status"] = resp.status
                    answer = await resp.json(content_type=None)
                while rec["status"] == 200 and answer.get("status") == "uploaded":
                    if time.monotonic() > file_deadline:
                        rec["error"] = "pending"
                        break
                    await asyncio.sleep(0.25)
                    async with session.get(f"{base}/v1/files/{answer['id']}", headers=fauth) as resp:
                        rec["status"] = resp.status
                        answer = await resp.json(content_type=None)
                if rec["status"] == 200 and not rec["error"] and answer.get("status") != "processed":
                    rec["error"] = f"file {answer.get('status')}"
            elif kind == "models":
                async with session.get(base + "/v1/models", headers=auth) as resp:
                    rec["status"] = resp.status
                    await resp.read()
            else:
                async with session.get(f"{base}/t/{slug}/", headers={"cookie": cookie}, allow_redirects=False) as resp:
                    rec["status"] = resp.status
                    await resp.read()
        except Exception as exc:  # noqa: BLE001 - reported
            rec["error"] = type(exc).__name__
        rec["ms"] = (time.perf_counter() - t0) * 1000
        if kind == "ttft" and rec["ttft"] is None and rec["status"] == 200:
            rec["error"] = "no content"
        records.append(rec)

    async def kind_loop(session, kind: str, rate: float, offset: float):
        interval = 1.0 / rate
        start = time.monotonic() + offset * interval
        tasks, k = [], 0
        while len(tasks) < 100_000:
            at = start + k * interval
            if at - start >= duration_s - offset * interval:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.ensure_future(one(session, kind)))
            k += 1
        await asyncio.gather(*tasks)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(kind_loop(session, kind, rate, i / len(rates)) for i, (kind, rate) in enumerate(rates.items()) if rate > 0))
    return records


def summarize(records: list[dict]) -> dict:
    out = {}
    for kind, _ in MEASURES:
        rs = [r for r in records if r["kind"] == kind]
        ok = [r for r in rs if r["status"] == 200 and not r["error"]]
        values = [r["ttft"] if kind == "ttft" else r["ms"] for r in ok]
        errors = Counter(r["error"] or r["status"] for r in rs if r not in ok)
        out[kind] = {"n": len(rs), "values": values, "p50": H.percentile(values, 50), "p99": H.percentile(values, 99),
                     "errors": dict(errors)}
    return out


# ---- the noisy tenant (its own process) ----------------------------------------------------------------


def _huge_chat(n_tools: int, n_messages: int, chars: int, max_tokens: int = 64) -> dict:
    """A chat of `n_messages` messages of `chars` characters in all, declaring `n_tools` big functions."""
    filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore "
    per = max(1, chars // max(1, n_messages - 1))
    text = (filler * (per // len(filler) + 1))[:per]
    msgs = [{"role": ("user", "assistant")[i % 2], "content": text} for i in range(n_messages - 1)]
    msgs.append({"role": "user", "content": "Summarise all of the above."})
    tools = [{"type": "function", "function": {
        "name": f"tool_{i}", "description": filler * 3,
        "parameters": {"type": "object", "properties": {f"field_{j}": {"type": "string", "description": filler[:60]} for j in range(8)}}}}
        for i in range(n_tools)]
    body = {"model": H.MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
    if tools:
        body["tools"] = tools
    return body


class Noisy:
    def __init__(self, cfg: dict, attacks: list[str], t_start: float, t_end: float):
        self.cfg, self.attacks, self.t_start, self.t_end = cfg, attacks, t_start, t_end
        self.stats: dict[str, Counter] = {a: Counter() for a in attacks}
        self.auth = {"authorization": f"Bearer {cfg['n_key']}"}
        self.plain_auth = {"authorization": f"Bearer {cfg['plain_key']}"}

    def running(self) -> bool:
        return time.time() < self.t_end

    def note(self, attack: str, status, seconds: float, extra: str = "") -> None:
        s = self.stats[attack]
        s["requests"] += 1
        s[f"status {status}"] += 1
        s["seconds"] += seconds
        if extra:
            s[extra] += 1

    async def run(self) -> dict:
        import aiohttp

        await asyncio.sleep(max(0.0, self.t_start - time.time()))
        timeout = aiohttp.ClientTimeout(total=self.cfg["drain_s"] + (self.t_end - time.time()))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            self.session = session
            jobs = []
            for a in self.attacks:
                jobs += [getattr(self, a)(i) for i in range(self.cfg["concurrency"][a])]
            tasks = [asyncio.ensure_future(j) for j in jobs]
            await asyncio.sleep(max(0.0, self.t_end - time.time()))
            done, pending = await asyncio.wait(tasks, timeout=self.cfg["drain_s"])  # let requests in flight finish
            for t in pending:
                t.cancel()
            for a in self.attacks:
                self.stats[a]["cut at the end"] += 0
            if pending:
                self.stats[self.attacks[0]]["tasks cut after the drain"] += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
        return {a: dict(c) for a, c in self.stats.items()}

    async def _post_json(self, attack: str, path: str, body: bytes, stream: bool = False) -> None:
        t0 = time.perf_counter()
        status, extra = 0, ""
        try:
            auth = self.plain_auth if attack == "chats" else self.auth
            async with self.session.post(self.cfg["base"] + path, data=body, headers={**auth, "content-type": "application/json"}) as resp:
                status = resp.status
                if stream and status == 200:
                    async for _ in resp.content.iter_chunked(65536):
                        pass
                else:
                    data = await resp.read()
                    if status != 200:
                        try:
                            extra = "code " + str((json.loads(data).get("error") or {}).get("code"))
                        except ValueError:
                            pass
        except Exception as exc:  # noqa: BLE001 - counted
            extra = type(exc).__name__
        self.note(attack, status, time.perf_counter() - t0, extra)
        if status != 200:
            await asyncio.sleep(0.02)  # refused (a limit): try again at once, as a hostile client would

    async def patterns(self, i: int, attack: str = "patterns") -> None:
        base = {"model": H.MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
                "max_tokens": self.cfg["guard_max_tokens"], "temperature": 0}
        body = json.dumps({**base, "stream": i % 2 == 0}).encode()
        while self.running():
            await self._post_json(attack, "/v1/chat/completions", body, stream=i % 2 == 0)

    async def chats(self, i: int) -> None:
        """The control: the same chats from a tenant without a guard (what N's load costs without its patterns)."""
        await self.patterns(i, "chats")

    async def uploads(self, i: int) -> None:
        import aiohttp

        data = Path(self.cfg["upload_path"]).read_bytes()
        while self.running():
            form = aiohttp.FormData()
            form.add_field("purpose", "fine-tune")
            form.add_field("file", data, filename=f"train-{i}.jsonl", content_type="application/jsonl")
            t0 = time.perf_counter()
            status, extra = 0, ""
            try:
                async with self.session.post(self.cfg["base"] + "/v1/files", data=form, headers=self.auth) as resp:
                    status = resp.status
                    answer = await resp.json(content_type=None)
                    extra = f"file {answer.get('status')}" if status == 200 else f"code {(answer.get('error') or {}).get('code')}"
            except Exception as exc:  # noqa: BLE001 - counted
                extra = type(exc).__name__
            self.note("uploads", status, time.perf_counter() - t0, extra)
            if status != 200:
                await asyncio.sleep(0.5)

    async def diff(self, i: int) -> None:
        k = i
        while self.running():
            new, old = self.cfg["diff_versions"][k % len(self.cfg["diff_versions"])]
            k += 1
            url = f"{self.cfg['base']}/api/tenants/{self.cfg['n_slug']}/prompts/{new}/diff/?against={old}"
            t0 = time.perf_counter()
            status, extra = 0, ""
            try:
                async with self.session.get(url, headers=self.auth) as resp:
                    status = resp.status
                    data = await resp.read()
                    if status == 200:
                        extra = f"{len(json.loads(data)['lines'])} lines"
            except Exception as exc:  # noqa: BLE001 - counted
                extra = type(exc).__name__
            self.note("diff", status, time.perf_counter() - t0, extra)
            if status != 200:
                await asyncio.sleep(0.5)

    async def huge(self, i: int, attack: str = "huge") -> None:
        body = self.cfg["huge_bodies"][attack]
        while self.running():
            await self._post_json(attack, "/v1/chat/completions", body, stream=False)

    async def oversize(self, i: int) -> None:
        await self.huge(i, "oversize")

    async def slow(self, i: int) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(self.cfg["base"])
        body = json.dumps({"model": H.MODEL, "messages": [{"role": "user", "content": "Write a long story."}],
                           "max_tokens": self.cfg["slow_max_tokens"], "stream": True, "temperature": 0}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {u.hostname}:{u.port}\r\nauthorization: Bearer {self.cfg['n_key']}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        while self.running():
            t0 = time.perf_counter()
            got, status = 0, 0
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.setblocking(False)
            try:
                await loop.sock_connect(s, (u.hostname, u.port))
                reader, writer = await asyncio.open_connection(sock=s, limit=4096)
                writer.write(head + body)
                await writer.drain()
                while True:
                    chunk = await reader.read(512)
                    if not chunk:
                        break
                    if not got and chunk.startswith(b"HTTP/1.1 "):
                        status = int(chunk[9:12])
                    got += len(chunk)
                    await asyncio.sleep(0.2)
                    if not self.running() and time.time() > self.t_end + 1:
                        break  # the phase is over: go away mid-stream
                writer.close()
            except Exception:  # noqa: BLE001 - counted below
                s.close()
            self.note("slow", status, time.perf_counter() - t0)
            self.stats["slow"]["bytes read"] += got


def noisy_process(cfg: dict, attacks: list[str], t_start: float, t_end: float) -> dict:
    return asyncio.run(Noisy(cfg, attacks, t_start, t_end).run())


def prepare_huge(base: str, key: str, max_body: int = 1_000_000) -> list[dict]:
    """The largest valid chat, sized by the gateway's own answers (exact counting): as many big tools as fit half the
    context, then 200 messages filling the rest; and a body of `max_body` bytes (refused after parsing and counting)."""
    auth = {"authorization": f"Bearer {key}"}

    refusals = Counter()

    def admitted(body: dict) -> bool:
        status, data = H.http_json("POST", base + "/v1/chat/completions", body, headers=auth, timeout=60)
        if status != 200:
            refusals[((data or {}).get("error") or {}).get("code") or status] += 1
        return status == 200

    def largest(make, lo: int, hi: int) -> int:  # the largest x in [lo, hi] with make(x) admitted (lo - 1: none)
        best = lo - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            if admitted(make(mid)):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    tools = largest(lambda t: _huge_chat(t, 2, 10), 0, 128) // 2
    chars = largest(lambda c: _huge_chat(tools, 200, c * 100), 1, 400) * 100
    print(f"sizing the max-context chat: {tools} tools, {chars:,} characters of messages; refusals while sizing {dict(refusals)}", flush=True)
    best = _huge_chat(tools, 200, chars)
    raw_best = json.dumps(best).encode()
    big = _huge_chat(128, 2000, max_body)
    raw = json.dumps(big).encode()
    raw_big = json.dumps(_huge_chat(128, 2000, max_body - (len(raw) - max_body) - 2000)).encode()
    return {"huge": raw_best, "oversize": raw_big,
            "labels": {"huge": f"max-context chats ({len(best['messages'])} messages, {tools} big tools, {len(raw_best):,} bytes, max_tokens 64)",
                       "oversize": f"{len(raw_big):,}-byte chats (128 big tools, 2,000 messages; refused: over the context)"}}


# ---- running the phases ---------------------------------------------------------------------------------


def purge_queue(plat) -> int:
    """Drop N's validation backlog: the tasks waiting in the Celery queues and, since a tenant's uploads wait their turn
    in the database (one validation per tenant at a time), its files still waiting; how many files and messages."""
    import re

    celery = str(Path(H.PY).with_name("celery"))
    done = subprocess.run([celery, "-A", "portal", "purge", "-f", "-Q", "default,finetune,validation"], cwd=H.ROOT,
                          env=plat.env, capture_output=True, text=True, timeout=120)
    m = re.search(r"Purged (\d+) message", done.stdout + done.stderr)
    purged = int(m.group(1)) if m else 0
    try:
        from finetune.models import TrainingFile
    except ImportError:
        return purged
    waiting = TrainingFile.all_tenants.filter(tenant__slug="noisy", status=TrainingFile.Status.UPLOADED)
    if hasattr(TrainingFile, "validation_queued_at"):  # files in their turn of validation are counted by the purge
        waiting = waiting.filter(validation_queued_at__isnull=True)
    purged += waiting.delete()[0]
    plat._close_db()
    return purged


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (a prefork worker's pool processes)."""
    total = H.cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            total += _tree_cpu(int(child))
        except OSError:
            pass
    return total


def cpu_of(procs: dict) -> dict:
    out = {}
    for k, p in procs.items():
        try:
            out[k] = _tree_cpu(p.pid)
        except OSError:
            out[k] = float("nan")
    return out


def settle(procs: dict, max_s: float, quiet_share: float = 0.1) -> float:
    """Wait until the platform's processes use under `quiet_share` of a core over half a second; seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        before = cpu_of(procs)
        time.sleep(0.5)
        after = cpu_of(procs)
        if sum(after[k] - before[k] for k in procs) < quiet_share * 0.5:
            break
    return time.monotonic() - t0


def run_phase(name: str, attacks: list[str], args, env: dict, procs: dict, profile: bool) -> dict:
    lead = 1.0 if attacks else 0.0
    ctx = multiprocessing.get_context("spawn")
    res: dict = {"name": name, "attacks": attacks}
    before = cpu_of(procs)
    t_phase = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        fut = None
        if attacks:
            t_start = time.time() + 1.5  # the child's start-up (imports) happens before
            fut = ex.submit(noisy_process, env["noisy_cfg"], attacks, t_start, t_start + lead + args.phase_s)
            time.sleep(max(0.0, t_start - time.time()) + lead)
        def quiet():
            return asyncio.run(quiet_load(env["base"], env["q_key"], env["q_cookie"], "quiet", env["rates"], args.phase_s, env["q_files_key"]))

        if profile and args.dump_stacks:  # what the platform's threads are doing, every 2 s of the phase
            res["dumps"] = []

            def quiet_with_dumps():
                import threading

                stop = threading.Event()

                def dumper():
                    pyspy = shutil.which("py-spy") or str(Path(H.PY).with_name("py-spy"))
                    while not stop.wait(2.0):
                        out = subprocess.run([pyspy, "dump", "-p", str(procs["platform"].pid)], capture_output=True, text=True, timeout=30)
                        res["dumps"].append(out.stdout)

                t = threading.Thread(target=dumper, daemon=True)
                t.start()
                try:
                    return quiet()
                finally:
                    stop.set()
                    t.join(35)

            records = quiet_with_dumps()
        elif profile:  # bench/gateway.py's py-spy sampling and summary, over Q's measured time
            from bench.gateway import profile_gateway

            box = {}
            res["profile"] = profile_gateway(procs["platform"].pid, args.phase_s, lambda: box.setdefault("records", quiet()))
            records = box["records"]
        else:
            records = quiet()
        res["noisy"] = fut.result(timeout=args.drain_s + 120) if fut else {}
    if "uploads" in attacks and env.get("purge"):
        res["purged"] = env["purge"]()  # N's validation backlog, so that the next phase starts clean
    res["phase_s"] = time.monotonic() - t_phase
    after = cpu_of(procs)
    res["cpu"] = {k: after[k] - before[k] for k in procs}
    res["settle_s"] = settle(procs, args.settle_s)
    res["q"] = summarize(records)
    return res


# ---- report ----------------------------------------------------------------------------------------------


def fmt_ms(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def noisy_summary(noisy: dict) -> str:
    parts = []
    for attack, c in noisy.items():
        n = c.get("requests", 0)
        statuses = ", ".join(f"{k[7:]}×{v}" for k, v in sorted(c.items()) if k.startswith("status "))
        mean = c.get("seconds", 0) / n if n else 0
        extras = ", ".join(f"{k} ×{v}" for k, v in c.items() if not k.startswith(("status ", "requests", "seconds", "bytes read")) and v)
        if "bytes read" in c:
            extras += (", " if extras else "") + f"{c['bytes read'] / 1e6:.1f} MB read"
        parts.append(f"{attack}: {n} req ({statuses}), mean {mean:.1f} s" + (f"; {extras}" if extras else ""))
    return "; ".join(parts) or "—"


def report(phases: list[dict], args, meta: dict) -> tuple[str, list[str]]:
    solos = [p for p in phases if not p["attacks"]]
    base = summarize([])  # placeholder shape
    for kind, _ in MEASURES:
        values = [v for p in solos for v in p["q"][kind]["values"]]
        base[kind] = {"values": values, "p50": H.percentile(values, 50), "p99": H.percentile(values, 99)}
    rows, verdicts = [], []
    for p in phases:
        cells, worst = [], (0.0, "")
        for kind, label in MEASURES:
            m = p["q"][kind]
            ratio = m["p99"] / base[kind]["p99"] if base[kind]["p99"] == base[kind]["p99"] and base[kind]["p99"] > 0 else float("nan")
            err = sum(m["errors"].values())
            cell = f"{fmt_ms(m['p50'])} / {fmt_ms(m['p99'])}"
            if p["attacks"]:
                cell += f" (**{ratio:.2f}×**)" if ratio == ratio else " (n/a)"
                if ratio == ratio and ratio > worst[0]:
                    worst = (ratio, label.split(" p50")[0])
            if err:
                cell += f", {err} errors {m['errors']}"
                worst = (float("inf"), f"{label.split(' p50')[0]} errors")
            cells.append(cell)
        if not p["attacks"]:
            verdict = "baseline"
        elif worst[0] <= TARGET:
            verdict = f"PASS (worst {worst[1]} {worst[0]:.2f}×)"
        else:
            verdict = f"**MISS** ({worst[1]} {worst[0]:.2f}×)" if worst[0] != float("inf") else f"**MISS** ({worst[1]})"
        verdicts.append(f"{p['name']}: {verdict}")
        n = p["q"]["chat"]["n"]
        cpu = p["cpu"]
        rows.append([p["name"], *cells, f"{1000 * cpu['platform'] / p['phase_s']:.0f} / {1000 * cpu.get('worker', 0) / p['phase_s']:.0f} / {1000 * cpu.get('validator', 0) / p['phase_s']:.0f}",
                     noisy_summary(p.get("noisy", {})) + (f"; **{p['purged']} validations still waiting** at the end (purged)" if p.get("purged") else ""),
                     verdict])
    pooled = " · ".join(f"{label.split(' p50')[0]} {fmt_ms(base[k]['p50'])} / {fmt_ms(base[k]['p99'])} (n={len(base[k]['values'])})"
                        for k, label in MEASURES)
    header = ["phase", *[label for _, label in MEASURES], "platform / worker / validation CPU ms/s", "what N did", "verdict (p99 ≤ 1.5× solo)"]
    lines = [meta["setting"], "", f"Solo baseline (both solo phases pooled), p50 / p99 ms: {pooled}.", "",
             "Q's measures per phase: p50 / p99 ms (p99 ÷ solo p99). CPU: of the uvicorn process, the Celery worker "
             "and the validation worker (its processes together) during the phase, ms per second (1000 = one core).", "",
             H.md_table(header, rows)]
    return "\n".join(lines), verdicts


# ---- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {','.join(ATTACKS)}")
    ap.add_argument("--only-all", action="store_true", help="phases: solo, all together, solo (no row per attack)")
    ap.add_argument("--phase-s", type=float, default=18.0, help="Q's measured time per phase (default 18)")
    ap.add_argument("--solo-every", type=int, default=4, help="a solo phase after every this many attack phases (0: none)")
    ap.add_argument("--drain-s", type=float, default=30.0, help="after a phase, how long N's requests in flight may finish")
    ap.add_argument("--settle-s", type=float, default=30.0, help="after a phase, the most to wait for the platform's CPU to go quiet")
    ap.add_argument("--q-chat-rps", type=float, default=10.0)
    ap.add_argument("--q-stream-rps", type=float, default=10.0)
    ap.add_argument("--q-models-rps", type=float, default=5.0)
    ap.add_argument("--q-page-rps", type=float, default=2.0)
    ap.add_argument("--q-file-rps", type=float, default=0.25, help="Q's small training-file uploads per second (validation latency)")
    ap.add_argument("--tokens-per-s", type=float, default=2000.0, help="simulated backend: tokens per second per request")
    ap.add_argument("--ttft-ms", type=float, default=2.0, help="simulated backend: time to first token")
    ap.add_argument("--pattern", default="", help="N's custom redaction pattern (default: the worst of WORST_PATTERNS the console accepts)")
    ap.add_argument("--patterns", type=int, default=1, help="how many variants of it N saves (1-8)")
    ap.add_argument("--guard-max-tokens", type=int, default=256, help="max_tokens of N's guarded chats")
    ap.add_argument("--slow-max-tokens", type=int, default=2000)
    ap.add_argument("--upload-mb", type=float, default=30.0)
    ap.add_argument("--upload-concurrency", type=int, default=2)
    ap.add_argument("--noisy-plan", choices=("self-service", "generous"), default="self-service",
                    help="N's limits: the plan a self-service tenant starts on (default), or generous (no quota, 100,000 "
                         "requests and 100 M tokens a minute, --noisy-concurrency at a time)")
    ap.add_argument("--noisy-concurrency", type=int, default=16, help="N's max_concurrent_requests with --noisy-plan generous")
    ap.add_argument("--redis-url", default="none", help="default none (the embedded default: in-process admission, "
                                                        "filesystem broker); e.g. redis://127.0.0.1:6379/6")
    ap.add_argument("--database-url", help="default: a fresh SQLite file (the embedded default)")
    ap.add_argument("--no-worker", action="store_true", help="do not start the Celery worker")
    ap.add_argument("--no-pin", action="store_true", help="do not pin (default: load generators + backend on the first core, "
                                                           "the platform process on the second)")
    ap.add_argument("--profile", default="", help="py-spy the platform process during this phase (e.g. patterns, all)")
    ap.add_argument("--dump-stacks", action="store_true", help="with --profile: py-spy dump the platform every 2 s instead")
    ap.add_argument("--platform-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for the platform's processes (repeatable), e.g. a setting to compare")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--docs", type=Path, default=H.DOCS, help="the benchmarks file to write (default docs/benchmarks.md here)")
    ap.add_argument("--commit-label", default="", help="what was measured, when not this checkout's HEAD (e.g. a git archive of it)")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    args.attacks = [a for a in args.attacks.split(",") if a]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; choose from {ATTACKS}")

    redis_url = H.redis_url_from(args.redis_url)
    if redis_url and not H.redis_reachable(redis_url):
        print(f"Redis at {redis_url} unreachable")
        return 1
    cores = H.cores()
    load_core, plat_core = (cores[0], cores[1]) if len(cores) >= 2 and not args.no_pin else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})  # this process (Q's client) and its children (N's client)
    load_before = os.getloadavg()
    started = H.now_utc()
    t_run = time.monotonic()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"noisy-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    phases: list[dict] = []
    extra_env = dict(kv.split("=", 1) for kv in args.platform_env)
    with H.Platform(redis_url=redis_url, database_url=args.database_url, keep=args.keep, extra_env=extra_env) as plat:
        plat.setup_django()
        database = "SQLite" if plat.database_url.startswith("sqlite") else plat.database_url.split(":", 1)[0]
        backend = plat.start_backend(core=load_core, tokens_per_s=args.tokens_per_s, ttft_ms=args.ttft_ms, output_tokens=0, max_concurrent=4096)
        plat.create_model_and_pool([backend.url], capacity=0, max_concurrency=256)
        from serving.models import BaseModel
        from devbackend.tinymodel import build_tiny_model

        model_path = build_tiny_model(plat.var / "tiny-chat", model_id=H.MODEL_ID)  # exact prompt counting, as deployed
        BaseModel.objects.filter(name=H.MODEL).update(local_path=str(model_path))
        plat._close_db()
        ten = setup_tenants(plat, args)
        platform = plat.start_gateway(core=plat_core, name="platform")
        worker = None if args.no_worker else plat.start_worker()
        # The validation worker as scripts/up.sh starts it (its own queue, 2 processes, nice 10).
        validator = None if args.no_worker else plat.start_worker(queues="validation", name="validator", concurrency=2, nice=10)
        procs = {"platform": platform, **({"worker": worker, "validator": validator} if worker else {}), "backend": backend}
        plat.wait_key_ready(platform.url, ten["q"]["key"])
        plat.wait_key_ready(platform.url, ten["n_key"])
        plat.wait_key_ready(platform.url, ten["plain"]["key"])
        path, lines = upload_file(tmp / "train.jsonl", args.upload_mb) if "uploads" in args.attacks else (None, 0)
        huge = prepare_huge(platform.url, ten["n_key"]) if {"huge", "oversize"} & set(args.attacks) else {"labels": {}}
        print(f"platform {platform.url} (pid {platform.pid}), worker pid {worker.pid if worker else '-'}, backend pid {backend.pid}; "
              f"upload {args.upload_mb:.0f} MB / {lines:,} lines; {huge['labels']}", flush=True)
        env = {"base": platform.url, "q_key": ten["q"]["key"], "q_cookie": ten["q_cookie"],
               "rates": {"chat": args.q_chat_rps, "ttft": args.q_stream_rps, "models": args.q_models_rps, "page": args.q_page_rps,
                         "file": args.q_file_rps},
               "q_files_key": ten["q_files_key"], "purge": (lambda: purge_queue(plat)) if worker else None,
               "noisy_cfg": {"base": platform.url, "n_key": ten["n_key"], "plain_key": ten["plain"]["key"], "n_slug": "noisy", "drain_s": args.drain_s,
                             "diff_versions": ten["diff_versions"], "upload_path": str(path) if path else "", "huge_bodies": huge,
                             "guard_max_tokens": args.guard_max_tokens, "slow_max_tokens": args.slow_max_tokens,
                             "concurrency": {"chats": 4, "patterns": 4, "uploads": args.upload_concurrency, "diff": 2, "huge": 4, "oversize": 4, "slow": 8}}}
        # Warm-up: every Q request kind, so the first phase does not pay for imports and connections.
        asyncio.run(quiet_load(env["base"], env["q_key"], env["q_cookie"], "quiet", env["rates"], 4.0, env["q_files_key"]))
        plan = [("solo", [])]
        if not args.only_all:
            for k, a in enumerate(args.attacks):
                if k and args.solo_every and k % args.solo_every == 0:
                    plan.append((f"solo ({len([p for p in plan if not p[1]]) + 1})", []))
                plan.append((a, [a]))
        if len(args.attacks) > 1 or args.only_all:
            plan.append(("all together", list(args.attacks)))
        plan.append(("solo again", []))
        for name, attacks in plan:
            print(f"phase {name}: N {'+'.join(attacks) or 'idle'}, {args.phase_s:.0f} s", flush=True)
            p = run_phase(name, attacks, args, env, procs, profile=bool(args.profile) and args.profile in (name, name.split()[0], "+".join(attacks)))
            phases.append(p)
            q = p["q"]
            print("  Q " + "; ".join(f"{k} n={q[k]['n']} p50 {fmt_ms(q[k]['p50'])} p99 {fmt_ms(q[k]['p99'])} ms" + (f" errors {q[k]['errors']}" if q[k]["errors"] else "")
                                     for k, _ in MEASURES), flush=True)
            print(f"  platform CPU {p['cpu']['platform']:.1f} s, worker {p['cpu'].get('worker', 0):.1f} s, validation worker "
                  f"{p['cpu'].get('validator', 0):.1f} s over {p['phase_s']:.0f} s; "
                  f"settled in {p['settle_s']:.1f} s; N: {noisy_summary(p.get('noisy', {}))}"
                  + (f"; N's validation tasks still queued at the end (purged): {p['purged']}" if "purged" in p else ""), flush=True)
            if p.get("profile"):
                print(p["profile"], flush=True)
            for d in p.get("dumps", []):
                print(d, flush=True)
            for proc in procs.values():
                if not proc.alive():
                    print(f"{proc.name} died:\n{proc.tail()}")
                    return 1
        validation = "in the upload request" if any("file processed" in k or "file error" in k for p in phases for k in p.get("noisy", {}).get("uploads", {})) \
            else ("on the worker (the upload answered status uploaded)" if any("file uploaded" in k for p in phases for k in p.get("noisy", {}).get("uploads", {})) else "n/a")
    load_after = os.getloadavg()
    pin = f"Q's and N's clients and the backend on core {load_core}, the platform process on core {plat_core}, the worker unpinned" \
        if load_core is not None else "none"
    pl = ten["plan"]
    plan_text = (f"{args.noisy_plan} plan: {pl['requests_per_minute']:,} requests and {pl['tokens_per_minute']:,} tokens a minute, "
                 f"{pl['max_concurrent_requests'] or 'unlimited'} at a time, quota "
                 + (f"{pl['quota_tokens']:,} tokens a {pl.get('quota_window', 'month')} ({pl.get('quota_mode', 'soft')})" if pl["quota_tokens"] else "none"))
    refused = "; ".join(f"`{p}` ({e.split(' (')[0]})" for p, e in ten["refused_patterns"].items())
    meta = {"setting": (
        f"Date {started}; machine {H.machine()}; commit {args.commit_label or H.git_commit() + ' (' + finetune_state() + ')'}; database {database}; "
        f"{'Redis ' + redis_url if redis_url else 'no Redis (in-process admission, filesystem Celery broker)'}; one uvicorn process "
        f"(portal.asgi:application){' + the Celery worker (--pool solo) + the validation worker (-Q validation --concurrency 2, nice 10)' if not args.no_worker else ''}; simulated dev backend "
        f"({args.tokens_per_s:.0f} tokens/s per request, TTFT {args.ttft_ms:.0f} ms); prompts counted exactly (the tiny model's tokenizer); "
        f"pinning: {pin};{' platform environment ' + ', '.join(args.platform_env) + ';' if args.platform_env else ''} load average before / after {load_before[0]:.1f} / {load_after[0]:.1f} (other sessions' tests were running on "
        f"the same 2 cores); run time {time.monotonic() - t_run:.0f} s.\n"
        f"Q: open loop, chat (16 tokens) {args.q_chat_rps:g}/s, streamed chat {args.q_stream_rps:g}/s, GET /v1/models {args.q_models_rps:g}/s, "
        f"GET of its console dashboard {args.q_page_rps:g}/s, a 20-line training file {args.q_file_rps:g}/s (measured until validated); "
        f"{args.phase_s:.0f} s per phase. "
        f"N ({plan_text}): chats = 4 chats of max_tokens {args.guard_max_tokens} (half streamed) at a "
        f"time, from a tenant without a guard (the control for patterns); patterns = the same from N, whose guard holds "
        f"{len(ten['patterns'])} × `{ten['patterns'][0]}` + e-mail/phone/card"
        + (f" (the worst the console accepts here; refused: {refused})" if refused else " (accepted by the console)") + "; uploads = "
        f"{args.upload_concurrency} × a valid {args.upload_mb:.0f} MB JSONL file ({lines:,} lines) at a time, validated {validation}; "
        f"diff = 2 at a time of the line diff of two {ten['prompt_chars']:,}-character prompt versions (2- and 19-character lines repeated "
        f"just under difflib's junk threshold, alternately); huge = 4 at a time of "
        f"{huge['labels'].get('huge', '—')}; oversize = 4 at a time of {huge['labels'].get('oversize', '—')}; slow = 8 streams of max_tokens {args.slow_max_tokens} read 512 bytes every 0.2 s.")}
    text, verdicts = report(phases, args, meta)
    profiles = [f"Profile of the platform process during \"{p['name']}\":\n\n```\n{p['profile']}\n```" for p in phases if p.get("profile")]
    print()
    print(text)
    print()
    print("\n".join(verdicts))
    for pr in profiles:
        print(pr)
    if not args.no_docs:
        H.write_section(TITLE, text + "\n\n" + HOWTO, path=args.docs)
        print(f"\nwritten to {args.docs}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def finetune_state() -> str:
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "finetune"], cwd=H.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        last = subprocess.run(["git", "log", "-1", "--format=%h", "--", "finetune"], cwd=H.ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "finetune/: unknown"
    return f"finetune/ as of {last}" + (", with uncommitted changes in it" if dirty else "")


HOWTO = """How to run it: `.venv/bin/python bench/noisy_neighbour.py` (all attacks, one row each, then all together; about 4-5
minutes on 2 cores). `--attacks uploads,diff` picks attacks, `--only-all` gives solo against all together only,
`--phase-s` sets the measured time per phase, `--redis-url redis://127.0.0.1:6379/6` runs with Redis (admission and
broker), `--database-url postgres://…/EMPTY_DB` on PostgreSQL (an empty database: the tenants are created fresh),
`--noisy-plan generous` lifts N's limits (default: the self-service plan), `--profile patterns` samples the platform
process with py-spy during that phase (`.venv/bin/pip install py-spy`; `--dump-stacks`: its threads every 2 s). It
prints the table and rewrites this section."""


if __name__ == "__main__":
    sys.exit(main())
