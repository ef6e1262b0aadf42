"""Benchmark the inference gateway against the same simulated dev backend called directly (issue "Inference gateway").

Everything on: a real API key (auth), admission on Redis (else in-process), routing, a system prompt, the
usage ledger, the fair scheduler. Method: /work/shared/reference/benchmarking.md.

Phases, each run against the backend directly and through the gateway, side by side:
- concurrency 1 (sequential, an aiohttp client alternating direct/gateway): latency p50/p99 non-streamed,
  time to first token (TTFT) and total for 16-token streams; "added" = gateway − direct, per percentile;
- concurrency 32 and 256 (closed loop, wrk + Lua for the POST body, else an aiohttp client): requests/s,
  errors, p50/p99, CPU ms per request of the gateway and of the backend (from /proc/<pid>/stat);
- exact prompt counting (serving/tokencount.py): the model's base model has its tokenizer files here (the tiny
  model's), so every request above is counted exactly. An A/B phase alternates, in the same gateway, that model
  with one whose base model has no files (a bound: a few string lengths, what the old ~3-characters-a-token
  estimate cost) at concurrency 32, and the counting functions alone are timed in this process (µs per request:
  the old estimate, the bound, the exact count).
Pinning (2+ cores): load generator + backend on the first core, the gateway on the second.

    .venv/bin/python bench/gateway.py                                   # full: 15-s phases, repeated twice
    .venv/bin/python bench/gateway.py --duration-s 3 --seq-requests 200 --repeat 1   # smoke
    .venv/bin/python bench/gateway.py --only-counting --ab-rounds 3                   # the counting A/B alone
    add --profile to sample the gateway with py-spy during an extra concurrency-32 phase (--profile-at N: another)

Side by side against another tree (e.g. the previous main: `git archive 6c201e9 | tar -x -C /tmp/base`), in one run:
a second gateway from that tree on the same backend, database and Redis, pinned to the same core; concurrency 1
interleaves direct / baseline / this tree request by request, the closed-loop phases alternate the two gateways
(order swapped each round); each is reported with the ratio this tree ÷ baseline (its own section per admission):

    .venv/bin/python bench/gateway.py --against /tmp/base                     # with Redis ($REDIS_URL or db 13)
    .venv/bin/python bench/gateway.py --against /tmp/base --redis-url none    # the embedded default
    .venv/bin/python bench/gateway.py --against . --baseline-redis-url none   # this tree: what Redis admission costs

Each closed-loop phase of a side-by-side run also reports the CPU per request of the backend, the load generator (this
process, or wrk) and the Redis server (INFO CPU: the whole server, so other clients of it count too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as H  # noqa: E402

TITLE = "Inference gateway: overhead and capacity"
COUNTING_TITLE = "Inference gateway: the cost of exact prompt counting"  # --only-counting
PROMPT = "You are the helpful assistant of Bench Inc. Answer briefly and politely."
USER_TEXT = "Hello! Please tell me something short about the weather today."
PEER = {  # LiteLLM 1.108.7, one worker, same kind of machine (benchmarking.md)
    "added_p50": 18.0, "added_p99": 26.5, "ttft_added_p50": 18.0, "rps32": 55.0, "cpu_ms": 18.5, "cpu_ms_stream": 48.5,
}


def body(model: str, stream: bool, max_tokens: int = 16) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": USER_TEXT}], "max_tokens": max_tokens, "temperature": 0}
    if stream:
        b["stream"] = True
    return b


# ---- concurrency 1 ------------------------------------------------------------------------------------


async def _one(session, url: str, payload: bytes, headers: dict, stream: bool) -> tuple[float, float | None, bool]:
    """(total ms, ttft ms or None, ok)."""
    t0 = time.perf_counter()
    ttft = None
    async with session.post(url, data=payload, headers=headers) as resp:
        ok = resp.status == 200
        if not stream:
            await resp.read()
        else:
            async for line in resp.content:
                if ttft is None and line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
                    ttft = (time.perf_counter() - t0) * 1000
            ok = ok and ttft is not None
    return (time.perf_counter() - t0) * 1000, ttft, ok


async def sequential(targets: dict, n: int, max_s: float, warmup: int) -> dict:
    """Alternate direct and gateway requests one at a time: non-streamed, then streamed."""
    import aiohttp

    out = {name: {"plain": [], "ttft": [], "stream_total": [], "errors": 0} for name in targets}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:
        for stream in (False, True):
            deadline = time.monotonic() + max_s
            for i in range(warmup + n):
                if time.monotonic() > deadline:
                    break
                for name, (url, payload, headers) in targets.items():
                    payload_b = json.dumps({**payload, **({"stream": True} if stream else {})}).encode()
                    total, ttft, ok = await _one(session, url, payload_b, headers, stream)
                    if i < warmup:
                        continue
                    if not ok:
                        out[name]["errors"] += 1
                        continue
                    if stream:
                        out[name]["ttft"].append(ttft)
                        out[name]["stream_total"].append(total)
                    else:
                        out[name]["plain"].append(total)
    return out


# ---- closed loop: wrk, or aiohttp ------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk_script(path: Path, payload: dict, headers: dict) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(payload))}"]
    for k, v in {"content-type": "application/json", **headers}.items():
        lines.append(f'wrk.headers["{k}"] = {json.dumps(v)}')
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, script: Path, conns: int, seconds: float, core) -> dict:
    threads = 1
    argv = H.pin_args(core) + ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
                               "--latency", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    text = proc.stdout
    res = {"raw": text, "requests": 0, "rps": 0.0, "errors": 0, "p50": float("nan"), "p99": float("nan")}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", text):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        res["rps"] = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        res["errors"] += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        res["errors"] += sum(int(x) for x in m.groups())
    for p in ("50", "99"):
        if m := re.search(rf"^\s+{p}(?:\.000)?%\s+(\S+)", text, re.M):
            res[f"p{p}"] = _ms(m.group(1))
    if proc.returncode != 0:
        res["errors"] += 1
        res["raw"] += proc.stderr
    return res


async def _aio_closed_loop(url: str, payload: dict, headers: dict, conns: int, seconds: float, stream: bool) -> dict:
    import aiohttp

    lat, errors = [], Counter()
    data = json.dumps(payload).encode()
    deadline = time.monotonic() + seconds
    max_requests = int(seconds * 20000)  # a hard bound on the loop besides the time

    async def worker(session):
        while time.monotonic() < deadline and len(lat) + sum(errors.values()) < max_requests:
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors[resp.status] += 1
                        continue
            except Exception as exc:  # noqa: BLE001 - counted
                errors[type(exc).__name__] += 1
                continue
            lat.append((time.perf_counter() - t0) * 1000)

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns), timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(worker(session) for _ in range(conns)))
    elapsed = time.monotonic() - t0
    return {"requests": len(lat) + sum(errors.values()), "rps": len(lat) / elapsed, "errors": sum(errors.values()),
            "p50": H.percentile(lat, 50), "p99": H.percentile(lat, 99), "raw": dict(errors)}


def closed_loop(use_wrk: bool, url: str, payload: dict, headers: dict, conns: int, seconds: float, core, tmp: Path) -> dict:
    if use_wrk:
        script = wrk_script(tmp / f"body-{abs(hash((url, json.dumps(payload))))}.lua", payload, headers)
        return run_wrk(url, script, conns, seconds, core)
    if core is not None:
        os.sched_setaffinity(0, {int(core)})
    try:
        return asyncio.run(_aio_closed_loop(url, payload, headers, conns, seconds, payload.get("stream", False)))
    finally:
        os.sched_setaffinity(0, set(H.cores()))


class LoadGeneratorCPU:
    """CPU seconds of the load generator: this process (the aiohttp client runs in it) and its waited-for children (wrk)."""

    @staticmethod
    def cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


class RedisCPU:
    """CPU seconds of the Redis server (INFO CPU: used_cpu_user + used_cpu_sys, every thread). The whole server's: other
    clients of the same server count too (other databases included), so read it on a quiet machine."""

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)

    def cpu(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measured(procs: dict, fn) -> tuple[dict, dict]:
    """Run fn() and return (its result, CPU seconds used meanwhile by each process)."""
    before = {k: p.cpu() for k, p in procs.items()}
    res = fn()
    return res, {k: p.cpu() - before[k] for k, p in procs.items()}


# ---- profiling -------------------------------------------------------------------------------------------


def profile_gateway(pid: int, seconds: float, load, keep: Path | None = None, gil: bool = False) -> str:
    """py-spy (collapsed stacks) over a load phase; top functions by own and inclusive samples. `keep`: where to
    leave the raw stacks (py-spy's collapsed format, for a flame graph or a closer look). `gil`: only the samples of
    the thread holding the GIL (closer to CPU time: a thread waiting for the GIL or for a core another process holds
    is not counted, which on a shared machine is most of the difference)."""
    pyspy = shutil.which("py-spy") or str(Path(H.PY).with_name("py-spy"))
    if not Path(pyspy).exists():
        return "py-spy not installed (.venv/bin/pip install py-spy)"
    out = keep or Path(tempfile.mkstemp(suffix=".txt")[1])
    argv = [pyspy, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-r", "250", "-f", "raw", "-o", str(out), "--nonblocking"]
    proc = subprocess.Popen(argv + (["--gil"] if gil else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    load()
    try:
        _, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "py-spy did not finish"
    if proc.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        return f"py-spy failed: {err.decode(errors='replace')[-500:]}"
    own, incl, total = Counter(), Counter(), 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r" \(/.*?([^/]+/[^/]+\.py):\d+\)", r" (\1)", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    held = "only the thread holding the GIL" if gil else "every thread py-spy finds not idle"
    lines = [f"py-spy: {total} samples over {seconds:.0f} s (250 Hz; {held})", "", "top own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(25)]
    lines += ["", "top inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(40)]
    return "\n".join(lines)



# ---- exact prompt counting: A/B in the gateway, and the counting functions alone ------------------------------

MODEL_NOFILES = "tiny-chat-nofiles"  # the same backend, a base model without tokenizer files here: bound counting
CJK = "你好，世界。今天天气很好，我们去公园散步吧！東京タワーは高い。"
CODE = 'def f(xs):\n    return {k: v**2 for k, v in xs.items() if v != 0}  # 😀\n'


def old_estimate(messages: list[dict], tools) -> int:
    """The gateway's prompt estimate before exact counting (~3 characters a token), for the timing only."""
    est = len(json.dumps(tools)) // 3 if tools else 0
    return sum(len(m["content"] or "") // 3 + len(json.dumps(m.get("tool_calls") or "")) // 3 + 4 for m in messages) + est + 2


def micro_costs(model_path: Path, n: int = 2000) -> list[list]:
    """CPU µs per call of the old estimate, the bound and the exact count, for the bench's request and heavier ones."""
    from serving.tokencount import BOUND, load_counter

    counter = load_counter(model_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    cases = {
        "bench request (system prompt + 1 message)": ([{"role": "system", "content": PROMPT}, {"role": "user", "content": USER_TEXT}], None),
        "1,000 characters of emoji, CJK, code": ([{"role": "system", "content": PROMPT}, {"role": "user", "content": (CJK + CODE) * 9}], None),
        "20 messages + a tool": ([{"role": "system", "content": PROMPT}] + [{"role": ("user", "assistant")[i % 2], "content": USER_TEXT}
                                                                           for i in range(20)], tools),
    }
    rows = []
    for name, (messages, tls) in cases.items():
        timings = {}
        for label, fn in (("old estimate", lambda: old_estimate(messages, tls)), ("bound", lambda: BOUND.chat(messages, tls, kind="dev")),
                          ("exact", lambda: counter.chat(messages, tls, kind="dev"))):
            fn()
            t0 = time.thread_time()  # CPU time of this thread: other work on the machine does not count
            for _ in range(n):
                fn()
            timings[label] = (time.thread_time() - t0) / n * 1e6
        exact = counter.chat(messages, tls, kind="dev").tokens
        rows.append([name, f"{timings['old estimate']:.1f}", f"{timings['bound']:.1f}", f"**{timings['exact']:.1f}**",
                     f"{old_estimate(messages, tls)} / {BOUND.chat(messages, tls, kind='dev').tokens} / {exact}"])
    return rows


def counting_ab(args, gateway, backend, tenant, use_wrk, load_core, tmp) -> list[dict]:
    """Alternate the exactly counted model and the bound-counted one at c=32 (non-streamed), `ab_rounds` times."""
    headers = {"authorization": f"Bearer {tenant['key']}"}
    procs = {"gateway": gateway, "backend": backend}
    out = []
    for i in range(args.ab_rounds):
        for label, model in (("exact", H.MODEL), ("bound", MODEL_NOFILES)) if i % 2 == 0 else (("bound", MODEL_NOFILES), ("exact", H.MODEL)):
            payload = body(model, False)
            url = gateway.url + "/v1/chat/completions"
            closed_loop(use_wrk, url, payload, headers, 32, args.warmup_s, load_core, tmp)
            r, cpu = measured(procs, lambda: closed_loop(use_wrk, url, payload, headers, 32, args.duration_s, load_core, tmp))
            n = max(1, r["requests"])
            out.append({"round": i + 1, "counting": label, "rps": r["rps"], "errors": r["errors"], "cpu_ms": 1000 * cpu["gateway"] / n})
            print(f"  A/B round {i + 1} {label:<5} {r['rps']:6.0f} req/s errors {r['errors']} gateway CPU {out[-1]['cpu_ms']:.3f} ms/req", flush=True)
    return out


def counting_report(ab: list[dict], micro: list[list]) -> str:
    import statistics

    parts = []
    if ab:
        exact = [r["cpu_ms"] for r in ab if r["counting"] == "exact"]
        bound = [r["cpu_ms"] for r in ab if r["counting"] == "bound"]
        rows = [[r["round"], r["counting"], f"{r['rps']:.0f}", r["errors"], f"**{r['cpu_ms']:.3f}**"] for r in ab]
        me, mb = statistics.median(exact), statistics.median(bound)
        parts += ["Exact counting on and off in the same gateway, c=32 non-streamed, alternating (CPU ms per request of the gateway):", "",
                  H.md_table(["round", "prompt counting", "req/s", "errors", "gateway CPU ms/req"], rows), "",
                  f"Median gateway CPU per request: exact **{me:.3f} ms**, bound (≈ the old estimate) {mb:.3f} ms: ratio "
                  f"**{me / mb:.2f}**, +{me - mb:.3f} ms per request.", ""]
    if micro:
        parts += ["The counting alone, in one process (CPU µs per request; tokens: old estimate / bound / exact):", "",
                  H.md_table(["request", "old estimate µs", "bound µs", "exact µs", "tokens"], micro), ""]
    return "\n".join(parts)


# ---- side by side against another tree --------------------------------------------------------------------

AGAINST_TITLE = "Inference gateway side by side: {admission}"


def start_tree_gateway(plat, tree: Path, core, redis_url: str | None = None) -> "H.Proc":
    """A gateway process running another tree's code (its cwd and first on the path), on this platform's database,
    Redis and var dir, with this checkout's virtual environment. `redis_url`: another Redis for it ('' = none: the
    embedded default's in-process admission), e.g. this tree against itself without Redis."""
    port = H.free_port()
    argv = H.pin_args(core) + [H.UVICORN, "portal.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--log-level", "warning"]
    log = plat.var / "gateway-baseline.log"
    env = {**plat.env, "PYTHONPATH": str(tree), **({"REDIS_URL": redis_url} if redis_url is not None else {})}
    popen = subprocess.Popen(argv, cwd=tree, env=env, stdout=open(log, "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    proc = H.Proc("gateway-baseline", popen, f"http://127.0.0.1:{port}", log)
    plat.procs.append(proc)
    plat._wait_http(proc, "/metrics")
    return proc


def side_by_side(args, gateways: dict, backend, tenant, use_wrk, load_core, tmp, redis_url: str = "") -> dict:
    """c=1 interleaved (direct, baseline, this tree), then `against_rounds` rounds of the closed-loop phases, the two
    gateways alternated (order swapped each round). Each phase also measures the CPU per request of the backend, the load
    generator and (with `redis_url`) the Redis server: where the time goes when the gateway's core is not saturated."""
    redis = RedisCPU(redis_url) if redis_url else None
    headers = {"authorization": f"Bearer {tenant['key']}"}
    targets = {"direct": (backend.url + "/v1/chat/completions", body(H.MODEL_ID, False), {})}
    for name, gw in gateways.items():
        targets[name] = (gw.url + "/v1/chat/completions", body(H.MODEL, False), headers)
    out = {"seq": asyncio.run(sequential(targets, args.seq_requests, args.seq_max_s, args.seq_warmup)), "loops": []}
    phases = [(c, "plain") for c in args.concurrency] + [(c, "stream") for c in args.stream_at]
    names = list(gateways)
    for i in range(args.against_rounds):
        for conns, kind in phases:
            for name in (names if i % 2 == 0 else names[::-1]):
                gw = gateways[name]
                payload = {**body(H.MODEL, False), **({"stream": True} if kind == "stream" else {})}
                url = gw.url + "/v1/chat/completions"
                closed_loop(use_wrk, url, payload, headers, conns, args.warmup_s, load_core, tmp)
                meters = {"gw": gw, "backend": backend, "loadgen": LoadGeneratorCPU, **({"redis": redis} if redis else {})}
                r, cpu = measured(meters, lambda: closed_loop(use_wrk, url, payload, headers, conns, args.duration_s, load_core, tmp))
                n = max(1, r["requests"])
                r["cpu_ms"] = 1000 * cpu["gw"] / n
                r.update({f"{k}_cpu_ms": 1000 * v / n for k, v in cpu.items() if k != "gw"})
                r.update(round=i + 1, conns=conns, kind=kind, tree=name)
                r.pop("raw", None)
                out["loops"].append(r)
                others = "".join(f" {k} {r[f'{k}_cpu_ms']:.3f}" for k in ("redis", "loadgen", "backend") if f"{k}_cpu_ms" in r)
                print(f"  round {i + 1} c={conns:<3} {kind:<6} {name:<8} {r['rps']:7.0f} req/s errors {r['errors']} p50 {r['p50']:.2f} "
                      f"p99 {r['p99']:.2f} ms gateway CPU {r['cpu_ms']:.3f} ms/req (others, ms/req:{others})", flush=True)
    return out


def side_by_side_report(res: dict, meta: dict, args) -> str:
    import statistics

    seq = res["seq"]
    d = seq["direct"]
    parts = [f"Date {meta['date']}; machine {meta['machine']}; this tree {meta['commit']} against {meta['against']}; "
             f"admission: {meta['admission']}; database: {meta['database']}; load generator: {meta['loadgen']}; "
             f"pinning: {meta['pinning']} (both gateways on the same core, one loaded at a time).",
             f"Concurrency 1: {args.seq_requests} samples per kind and target after {args.seq_warmup} of warm-up, the three "
             f"targets interleaved request by request. Closed loop: {args.against_rounds} rounds of {args.duration_s:.0f}-s phases "
             f"after {args.warmup_s:.0f} s of warm-up, the two gateways alternated, order swapped each round; medians over the rounds.",
             "", "Concurrency 1, added = gateway − direct (ms):", ""]
    rows = []
    for key, label in (("plain", "non-streamed"), ("ttft", "streamed TTFT"), ("stream_total", "streamed total")):
        for p in (50, 99):
            dp = H.percentile(d[key], p)
            b = H.percentile(seq["baseline"][key], p) - dp
            n = H.percentile(seq["this tree"][key], p) - dp
            rows.append([f"c=1 {label} added p{p}", f"{b:+.2f}", f"**{n:+.2f}**", f"{n - b:+.2f} ms"])
    parts += [H.md_table(["measure", "baseline", "this tree", "difference"], rows), ""]
    rows = []
    for conns, kind in sorted({(r["conns"], r["kind"]) for r in res["loops"]}):
        by = {t: [r for r in res["loops"] if (r["conns"], r["kind"], r["tree"]) == (conns, kind, t)] for t in ("baseline", "this tree")}
        med = {t: {m: statistics.median(r[m] for r in rs) for m in ("cpu_ms", "rps", "p50", "p99")} for t, rs in by.items()}
        errs = {t: sum(r["errors"] for r in rs) for t, rs in by.items()}
        label = f"c={conns} {'non-streamed' if kind == 'plain' else 'streamed (16 tokens)'}"
        per_round = ", ".join(f"{b['cpu_ms']:.2f}/{n['cpu_ms']:.2f}" for b, n in zip(by["baseline"], by["this tree"]))
        rows.append([f"{label}: gateway CPU ms/req", f"{med['baseline']['cpu_ms']:.3f}", f"**{med['this tree']['cpu_ms']:.3f}**",
                     f"**{med['this tree']['cpu_ms'] / med['baseline']['cpu_ms']:.2f}** (rounds: {per_round})"])
        rows.append([f"{label}: req/s", f"{med['baseline']['rps']:.0f}", f"{med['this tree']['rps']:.0f}",
                     f"{med['this tree']['rps'] / med['baseline']['rps']:.2f}"])
        rows.append([f"{label}: p50 / p99 ms", f"{med['baseline']['p50']:.1f} / {med['baseline']['p99']:.1f}",
                     f"{med['this tree']['p50']:.1f} / {med['this tree']['p99']:.1f}",
                     f"{med['this tree']['p50'] / med['baseline']['p50']:.2f} / {med['this tree']['p99'] / med['baseline']['p99']:.2f}"])
        rows.append([f"{label}: errors", str(errs["baseline"]), str(errs["this tree"]), ""])
        for key, what in (("redis_cpu_ms", "Redis CPU ms/req (the whole server)"), ("loadgen_cpu_ms", "load generator CPU ms/req"),
                          ("backend_cpu_ms", "backend CPU ms/req")):
            if all(key in r for rs in by.values() for r in rs):
                b, n = (statistics.median(r[key] for r in by[t]) for t in ("baseline", "this tree"))
                rows.append([f"{label}: {what}", f"{b:.3f}", f"{n:.3f}", f"{n / b:.2f}" if b else ""])
    parts += ["Closed loop (medians over the rounds; ratio = this tree ÷ baseline):", "",
              H.md_table(["measure", "baseline", "this tree", "ratio"], rows)]
    return "\n".join(parts)


# ---- main -------------------------------------------------------------------------------------------


def run_once(args, plat, backend, gateway, tenant, use_wrk, load_core, tmp) -> dict:
    direct_url = backend.url + "/v1/chat/completions"
    gw_url = gateway.url + "/v1/chat/completions"
    gw_headers = {"authorization": f"Bearer {tenant['key']}"}
    targets = {"direct": (direct_url, body(H.MODEL_ID, False), {}), "gateway": (gw_url, body(H.MODEL, False), gw_headers)}
    res = {"seq": asyncio.run(sequential(targets, args.seq_requests, args.seq_max_s, args.seq_warmup))}
    procs = {"gateway": gateway, "backend": backend}
    for conns in args.concurrency:
        for kind in (["plain", "stream"] if conns in args.stream_at else ["plain"]):
            stream = kind == "stream"
            for name, (url, payload, headers) in targets.items():
                payload = {**payload, **({"stream": True} if stream else {})}
                closed_loop(use_wrk, url, payload, headers, conns, args.warmup_s, load_core, tmp)  # warm-up
                r, cpu = measured(procs, lambda: closed_loop(use_wrk, url, payload, headers, conns, args.duration_s, load_core, tmp))
                n = max(1, r["requests"])
                r["cpu_ms"] = {k: 1000 * v / n for k, v in cpu.items()}
                r.pop("raw", None) if r.get("errors", 0) == 0 else None
                res[(conns, kind, name)] = r
                print(f"  c={conns:<3} {kind:<6} {name:<8} {r['rps']:8.0f} req/s  errors {r['errors']}  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  "
                      f"CPU ms/req gateway {r['cpu_ms']['gateway']:.2f} backend {r['cpu_ms']['backend']:.2f}", flush=True)
                if r.get("errors") and r.get("raw"):
                    print("    errors detail:", str(r["raw"])[-600:])
    return res


def _tree_commit(tree: Path) -> str:
    """The commit `git archive` wrote into the tree (a pax header), else the tree's HEAD if it is a checkout, else '?'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return sha if sha and (tree / ".git").exists() else (tree / ".commit").read_text().strip() if (tree / ".commit").exists() else "?"


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


def report(runs: list[dict], args, meta: dict) -> str:
    parts = [f"Date {meta['date']}; machine {meta['machine']}; commit {meta['commit']}; load generator: {meta['loadgen']}; "
             f"admission: {meta['admission']}; database: {meta['database']}; pinning: {meta['pinning']}.",
             f"Settings: simulated dev backend (`--sim-tokens-per-second 0 --sim-ttft-ms 0 --sim-output-tokens 16`), "
             f"chat completions with 16 output tokens, system prompt set, prompts counted exactly (the tiny model's tokenizer and "
             f"chat template), ledger and request journal on (a crash-safe record of each request: one write at admission, delivered tokens in shared memory); concurrency-1 samples {args.seq_requests} per kind "
             f"(warm-up {args.seq_warmup}), closed-loop phases {args.duration_s:.0f} s after {args.warmup_s:.0f} s of warm-up; {len(runs)} run(s).", ""]
    rows = []
    for i, run in enumerate(runs, 1):
        seq = run["seq"]
        d, g = seq["direct"], seq["gateway"]
        for label, key in (("non-streamed latency", "plain"), ("streamed TTFT", "ttft"), ("streamed total", "stream_total")):
            dp50, dp99 = H.percentile(d[key], 50), H.percentile(d[key], 99)
            gp50, gp99 = H.percentile(g[key], 50), H.percentile(g[key], 99)
            peer = {"plain": f"{PEER['added_p50'] / max(gp50 - dp50, 1e-3):.0f}× / {PEER['added_p99'] / max(gp99 - dp99, 1e-3):.0f}×",
                    "ttft": f"{PEER['ttft_added_p50'] / max(gp50 - dp50, 1e-3):.0f}× (p50)"}.get(key, "")
            rows.append([f"run {i}", f"c=1 {label} (n={len(g[key])}, errors {d['errors']}/{g['errors']})",
                         f"{fmt(dp50)} / {fmt(dp99)}", f"{fmt(gp50)} / {fmt(gp99)}", f"**+{fmt(gp50 - dp50)} / +{fmt(gp99 - dp99)}**", peer])
    parts.append("Concurrency 1 (ms, p50 / p99; added = gateway − direct; vs peer = LiteLLM's added ÷ ours):")
    parts.append("")
    parts.append(H.md_table(["run", "measure", "direct", "gateway", "added", "vs peer"], rows))
    parts.append("")
    rows = []
    for i, run in enumerate(runs, 1):
        for conns in args.concurrency:
            for kind in ("plain", "stream"):
                if (conns, kind, "gateway") not in run:
                    continue
                d, g = run[(conns, kind, "direct")], run[(conns, kind, "gateway")]
                peer_cpu = PEER["cpu_ms"] if kind == "plain" else PEER["cpu_ms_stream"]
                vs = f"{peer_cpu / max(g['cpu_ms']['gateway'], 1e-3):.1f}× less CPU"
                if conns == 32 and kind == "plain":
                    vs += f"; {g['rps'] / PEER['rps32']:.1f}× req/s"
                rows.append([f"run {i}", f"c={conns} {'non-streamed' if kind == 'plain' else 'streamed (16 tokens)'}",
                             f"{d['rps']:.0f} / {d['errors']} / {fmt(d['p50'])} / {fmt(d['p99'])}",
                             f"{g['rps']:.0f} / {g['errors']} / {fmt(g['p50'])} / {fmt(g['p99'])}",
                             f"**{g['cpu_ms']['gateway']:.2f}**", f"{d['cpu_ms']['backend']:.2f} / {g['cpu_ms']['backend']:.2f}", vs])
    parts.append("Closed loop (req/s / errors / p50 ms / p99 ms). CPU ms per request from /proc/<pid>/stat; backend CPU: direct / via gateway:")
    parts.append("")
    parts.append(H.md_table(["run", "phase", "direct", "gateway", "gateway CPU ms/req", "backend CPU ms/req", "vs peer"], rows))
    parts.append("")
    # Targets, from the last run.
    last = runs[-1]
    d, g = last["seq"]["direct"], last["seq"]["gateway"]
    a50 = H.percentile(g["plain"], 50) - H.percentile(d["plain"], 50)
    a99 = H.percentile(g["plain"], 99) - H.percentile(d["plain"], 99)
    cpu32 = last.get((32, "plain", "gateway"), {}).get("cpu_ms", {}).get("gateway", float("nan"))
    err256 = last.get((256, "plain", "gateway"), {}).get("errors", None)
    checks = [("added p50 ≤ 2 ms", a50 <= 2, f"{a50:.2f} ms"), ("added p99 ≤ 10 ms", a99 <= 10, f"{a99:.2f} ms"),
              ("gateway CPU ≤ 2 ms per non-streamed request (c=32)", cpu32 <= 2, f"{cpu32:.2f} ms"),
              ("no errors at 256", err256 == 0, "n/a" if err256 is None else str(err256))]
    parts.append("Targets (last run): " + "; ".join(f"{name}: {'PASS' if ok else 'MISS'} ({val})" for name, ok, val in checks) + ".")
    if meta.get("profile"):
        parts += ["", f"Profile of the gateway at concurrency {args.profile_at} (py-spy):", "", "```", meta["profile"], "```"]
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=15.0, help="each closed-loop phase (default 15)")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="warm-up before each closed-loop phase")
    ap.add_argument("--seq-requests", type=int, default=2000, help="concurrency-1 samples per kind and target")
    ap.add_argument("--seq-warmup", type=int, default=100)
    ap.add_argument("--seq-max-s", type=float, default=120.0, help="time bound of each concurrency-1 series")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[32, 256])
    ap.add_argument("--stream-at", type=lambda s: [int(x) for x in s.split(",") if x], default=[32], help="closed-loop stream phases at these concurrencies")
    ap.add_argument("--repeat", type=int, default=2, help="repeat the whole run (report each)")
    ap.add_argument("--redis-url", help=f"default $REDIS_URL or {H.DEFAULT_REDIS}; 'none' = in-process admission")
    ap.add_argument("--database-url", help="default: a fresh SQLite file in a temporary var dir")
    ap.add_argument("--no-wrk", action="store_true", help="use the aiohttp client even if wrk is installed")
    ap.add_argument("--profile", action="store_true", help="py-spy the gateway during an extra closed-loop phase")
    ap.add_argument("--profile-at", type=int, default=32, help="the profiled phase's concurrency (default 32)")
    ap.add_argument("--profile-out", type=Path, help="keep the profile's raw stacks (py-spy's collapsed format) in this file")
    ap.add_argument("--profile-gil", action="store_true", help="profile only the thread holding the GIL (py-spy --gil)")
    ap.add_argument("--ab-rounds", type=int, default=4, help="rounds of the exact-vs-bound counting A/B at c=32 (0: none)")
    ap.add_argument("--only-counting", action="store_true", help="only the counting A/B and the counting timings")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--keep", action="store_true", help="keep the var dir (logs, database)")
    ap.add_argument("--against", type=Path, metavar="TREE", help="side by side against a gateway from another tree (module docstring)")
    ap.add_argument("--against-rounds", type=int, default=3, help="closed-loop rounds of the side-by-side run")
    ap.add_argument("--baseline-redis-url", metavar="URL", help="the baseline gateway's Redis ('none': in-process admission; "
                    "default: this tree's), e.g. `--against . --baseline-redis-url none`: what Redis admission costs this tree")
    args = ap.parse_args()

    redis_url = H.redis_url_from(args.redis_url)
    if redis_url and not H.redis_reachable(redis_url):
        print(f"Redis at {redis_url} unreachable: admission runs in-process (pass --redis-url none to silence)")
        redis_url = ""
    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    cores = H.cores()
    load_core, gw_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    meta = {"date": H.now_utc(), "machine": H.machine(), "commit": H.git_commit(),
            "loadgen": "wrk 1 thread + Lua (closed loop); aiohttp sequential client at c=1" if use_wrk else "aiohttp client (wrk not installed)",
            "admission": f"Redis ({redis_url})" if redis_url else "in-process (no Redis)",
            "pinning": f"load generator + backend on core {load_core}, gateway on core {gw_core}" if gw_core is not None else "none (1 core)"}
    runs = []
    with H.Platform(redis_url=redis_url, database_url=args.database_url, keep=args.keep) as plat:
        plat.setup_django()
        meta["database"] = "SQLite" if plat.database_url.startswith("sqlite") else plat.database_url.split(":", 1)[0]
        backend = plat.start_backend(core=load_core, tokens_per_s=0, ttft_ms=0, output_tokens=16, max_concurrent=4096)
        plat.create_model_and_pool([backend.url], capacity=0, max_concurrency=2048)
        # Exact prompt counting: the base model's tokenizer files are here (the tiny model's); the second base model
        # (same backend) has none, so its prompts are counted by the bound.
        from serving.models import Backend, BackendPool, BaseModel
        from devbackend.tinymodel import build_tiny_model

        model_path = build_tiny_model(plat.var / "tiny-chat", model_id=H.MODEL_ID)
        BaseModel.objects.filter(name=H.MODEL).update(local_path=str(model_path))
        nofiles = BaseModel.objects.create(name=MODEL_NOFILES, hf_id=H.MODEL_ID, context_length=4096)
        Backend.objects.create(pool=BackendPool.objects.create(name="bench-nofiles", base_model=nofiles, kind=BackendPool.Kind.DEV),
                               url=backend.url, max_concurrency=2048)
        plat._close_db()
        meta["counting"] = micro_costs(model_path)
        print(counting_report([], meta["counting"]), flush=True)
        tenant = plat.create_tenant("bench-gw", weight=1, prompt=PROMPT, requests_per_minute=10_000_000, tokens_per_minute=1_000_000_000,
                                    quota_tokens=10**12, quota_window="month", quota_mode="soft")
        gateway = plat.start_gateway(core=gw_core)
        plat.wait_key_ready(gateway.url, tenant["key"])
        if args.against is not None:
            baseline_redis = None if args.baseline_redis_url is None else H.redis_url_from(args.baseline_redis_url)
            baseline = start_tree_gateway(plat, args.against.resolve(), gw_core, baseline_redis)
            plat.wait_key_ready(baseline.url, tenant["key"])
            meta["against"] = f"{args.against} ({_tree_commit(args.against)})"
            if baseline_redis is not None:
                meta["against"] += f", its admission {'Redis (' + baseline_redis + ')' if baseline_redis else 'in-process (no Redis)'}"
            print(f"side by side: baseline {baseline.url} (pid {baseline.pid}, {meta['against']}), this tree {gateway.url} "
                  f"(pid {gateway.pid}); {meta['admission']}; {meta['loadgen']}", flush=True)
            res = side_by_side(args, {"baseline": baseline, "this tree": gateway}, backend, tenant, use_wrk, load_core, tmp, redis_url)
            for gw in (baseline, gateway):
                if not gw.alive():
                    print(f"{gw.name} died:\n" + gw.tail())
            text = side_by_side_report(res, meta, args)
            print()
            print(text)
            if not args.no_docs:
                H.write_section(AGAINST_TITLE.format(admission="Redis admission" if redis_url else "embedded default"), text)
                print(f"\nwritten to {H.DOCS}")
            return 0
        print(f"backend {backend.url} (pid {backend.pid}), gateway {gateway.url} (pid {gateway.pid}); {meta['admission']}; {meta['loadgen']}", flush=True)
        for i in range(0 if args.only_counting else args.repeat):
            print(f"run {i + 1}/{args.repeat}", flush=True)
            run = run_once(args, plat, backend, gateway, tenant, use_wrk, load_core, tmp)
            seq = run["seq"]
            for key, label in (("plain", "non-streamed"), ("ttft", "TTFT"), ("stream_total", "stream total")):
                d, g = seq["direct"][key], seq["gateway"][key]
                print(f"  c=1 {label:<13} direct p50 {H.percentile(d, 50):.2f} p99 {H.percentile(d, 99):.2f} | gateway p50 {H.percentile(g, 50):.2f} "
                      f"p99 {H.percentile(g, 99):.2f} | added p50 {H.percentile(g, 50) - H.percentile(d, 50):+.2f} p99 {H.percentile(g, 99) - H.percentile(d, 99):+.2f} ms"
                      f"  (n={len(g)}, errors {seq['direct']['errors']}/{seq['gateway']['errors']})", flush=True)
            runs.append(run)
        if args.ab_rounds:
            meta["ab"] = counting_ab(args, gateway, backend, tenant, use_wrk, load_core, tmp)
        if args.profile:
            payload = body(H.MODEL, False)
            headers = {"authorization": f"Bearer {tenant['key']}"}
            before = gateway.cpu()
            loaded = {}
            meta["profile"] = profile_gateway(gateway.pid, args.duration_s, lambda: loaded.update(closed_loop(
                use_wrk, gateway.url + "/v1/chat/completions", payload, headers, args.profile_at, args.duration_s, load_core, tmp)),
                keep=args.profile_out, gil=args.profile_gil)
            meta["profile"] += (f"\n\nprofiled phase: {loaded.get('rps', 0):.0f} req/s, errors {loaded.get('errors')}, gateway CPU "
                                f"{1000 * (gateway.cpu() - before) / max(1, loaded.get('requests', 0)):.3f} ms/req (py-spy's sampling included)")
            print(meta["profile"])
        if not gateway.alive():
            print("gateway died:\n" + gateway.tail())
        ledger = plat.ledger(tenant["id"])
        print(f"ledger: {ledger['count']} records, {ledger['tokens']} tokens, by status {ledger['by_status']}")
    counting = counting_report(meta.get("ab", []), meta.get("counting", []))
    text = report(runs, args, meta) + "\n\n" + counting if runs else counting
    print()
    print(text)
    if not args.no_docs:
        H.write_section(TITLE if runs else COUNTING_TITLE, text)
        print(f"\nwritten to {H.DOCS}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
