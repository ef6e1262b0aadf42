"""Benchmark quotas, rate limits and weighted fair scheduling (issue "Quotas, rate limits and weighted fair scheduling").

Real gateway processes (uvicorn), real Redis (skipped with a message if none), the simulated dev backend as the
bottleneck: pool capacity C (BackendPool.capacity) and a token rate so each request takes ~100–200 ms.
Method: /work/shared/reference/fairness.md ("How to measure it"). Service = input + 2 · output tokens
(client-side `usage` of each answer). Three phases (--phases):

share      4 tenants, weights 1:2:3:4, each keeping 3·C requests outstanding (closed loop), with different prompt
           and answer lengths; per window (--window-s): S_i, share error max_i |(S_i/w_i)/mean(S/w) − 1|, Jain's
           index on S_i/w_i; % of windows with error ≤ 5 %. Then the same load with PLATFORM_SCHEDULER=fcfs
           (oldest waiter first, no per-tenant queues): throughput and share of each.
starvation a light tenant at --light-rps (0.2, fixed interval, streamed) beside a heavy one keeping 10·C outstanding;
           the light tenant's p99 TTFT against its p99 TTFT alone (target ratio ≤ 1.5).
overshoot  200 simultaneous requests of a fresh tenant through 1, 2 and 4 gateway processes (clients round-robin),
           with injected backend 503s and streams dropped mid-way, against: a tokens/min limit; a hard window
           quota; a soft window quota; a requests/min limit. Overshoot, admitted counts, Retry-After on every
           429, and after everything settles the Redis quota counter (used/reserved) against the ledger.

    .venv/bin/python bench/fairness.py                                       # full (60-s windows, 300-s phases)
    .venv/bin/python bench/fairness.py --duration-s 10 --window-s 5 --light-rps 2   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as H  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def text_of(chars: int, rng: random.Random) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


class Client:
    """aiohttp client round-robining over gateway processes; every loop bounded in count and time."""

    def __init__(self, gateways: list[str]):
        self.gateways = gateways
        self._rr = 0
        self.session = None

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120))
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    def next_url(self) -> str:
        url = self.gateways[self._rr % len(self.gateways)]
        self._rr += 1
        return url + "/v1/chat/completions"

    async def chat(self, key: str, content: str, max_tokens: int, *, stream: bool = False, drop_after_first: bool = False) -> dict:
        """One request: status, headers, usage, ttft and total (s), error code."""
        payload = {"model": H.MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        t0 = time.perf_counter()
        out = {"status": 0, "headers": {}, "usage": None, "ttft": None, "total": None, "code": "", "t_end": None, "dropped": False}
        try:
            async with self.session.post(self.next_url(), json=payload, headers={"authorization": f"Bearer {key}"}) as resp:
                out["status"] = resp.status
                out["headers"] = {k.lower(): v for k, v in resp.headers.items()}
                if resp.status != 200:
                    data = await resp.json(content_type=None)
                    out["code"] = ((data or {}).get("error") or {}).get("code", "") if isinstance(data, dict) else ""
                elif not stream:
                    data = await resp.json(content_type=None)
                    out["usage"] = data.get("usage")
                else:
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        if out["ttft"] is None and b'"content":"' in line and b'"content":""' not in line:
                            out["ttft"] = time.perf_counter() - t0
                            if drop_after_first:
                                out["dropped"] = True
                                resp.close()  # the client goes away mid-stream
                                break
                        if b'"usage"' in line and b"[DONE]" not in line:
                            try:
                                u = json.loads(line[5:]).get("usage")
                            except ValueError:
                                u = None
                            if u:
                                out["usage"] = u
        except Exception as exc:  # noqa: BLE001 - reported
            out["code"] = type(exc).__name__
        out["total"] = time.perf_counter() - t0
        out["t_end"] = time.monotonic()
        return out


def service(usage: dict | None) -> int:
    if not usage:
        return 0
    return int(usage.get("prompt_tokens", 0)) + 2 * int(usage.get("completion_tokens", 0))


def jain(xs: list[float]) -> float:
    s, s2 = sum(xs), sum(x * x for x in xs)
    return (s * s) / (len(xs) * s2) if s2 else float("nan")


def share_error(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return max(abs(x / mean - 1) for x in xs) if mean else float("nan")


# ---- phase 1: weighted share ---------------------------------------------------------------------------


async def closed_loop_tenants(gateways: list[str], specs: list[dict], duration_s: float, seed: int) -> tuple[list[tuple], float]:
    """Each spec: key, workers, prompt chars (lo, hi), max_tokens (lo, hi). Returns [(tenant index, t_end, service, ok)]."""
    records: list[tuple] = []
    rng = random.Random(seed)
    start = time.monotonic()
    deadline = start + duration_s
    bound = int(duration_s * 2000) + 1000  # hard bound on requests besides the time

    async def worker(client: Client, i: int, spec: dict, wrng: random.Random):
        while time.monotonic() < deadline and len(records) < bound:
            content = text_of(wrng.randint(*spec["prompt_chars"]), wrng)
            r = await client.chat(spec["key"], content, wrng.randint(*spec["max_tokens"]))
            records.append((i, r["t_end"], service(r["usage"]), r["status"] == 200, r["code"], int((r["usage"] or {}).get("completion_tokens", 0))))
            if r["status"] != 200:
                await asyncio.sleep(0.05)

    async with Client(gateways) as client:
        tasks = [worker(client, i, spec, random.Random(rng.random())) for i, spec in enumerate(specs) for _ in range(spec["workers"])]
        await asyncio.gather(*tasks)
    return records, start


def windows_report(records, start: float, weights: list[int], warmup_s: float, window_s: float, duration_s: float) -> dict:
    n = len(weights)
    t0 = start + warmup_s
    nwin = int((duration_s - warmup_s) // window_s)
    per = [[0] * n for _ in range(nwin)]
    ok = errors = out_tokens = 0
    codes = Counter()
    for i, t_end, s, good, code, out in records:
        if not good:
            errors += 1
            codes[code] += 1
        k = int((t_end - t0) // window_s)
        if 0 <= k < nwin:
            per[k][i] += s
            ok += good
            out_tokens += out
    rows = []
    for k in range(nwin):
        norm = [per[k][i] / weights[i] for i in range(n)]
        rows.append({"S": per[k], "error": share_error(norm), "jain": jain(norm)})
    measured = nwin * window_s
    return {"windows": rows, "within5": sum(r["error"] <= 0.05 for r in rows) / max(1, len(rows)),
            "tokens_per_s": sum(sum(w) for w in per) / measured if measured else float("nan"),
            "req_per_s": ok / measured if measured else float("nan"), "out_per_s": out_tokens / measured if measured else float("nan"),
            "errors": errors, "codes": dict(codes)}


def share_specs(tenants, capacity: int) -> list[dict]:
    # Different prompt/answer sizes per tenant, so fairness in tokens differs from fairness in requests.
    shapes = [((600, 1000), (24, 32)), ((100, 300), (8, 16)), ((300, 600), (16, 32)), ((50, 150), (24, 32))]
    return [{"key": t["key"], "workers": 3 * capacity, "prompt_chars": shapes[i % 4][0], "max_tokens": shapes[i % 4][1]} for i, t in enumerate(tenants)]


def phase_share(args, plat) -> str:
    weights = [1, 2, 3, 4]
    tenants = [plat.create_tenant(f"share-w{w}-{int(time.time())}", weight=w) for w in weights]
    results = {}
    for mode in ["vtc"] + (["fcfs"] if not args.no_fcfs else []):
        gws = [plat.start_gateway(env={"PLATFORM_SCHEDULER": mode}, name=f"gw-share-{mode}-{i}") for i in range(args.gateways)]
        for t in tenants:
            plat.wait_key_ready(gws[0].url, t["key"])
        print(f"share [{mode}]: 4 tenants × {3 * args.capacity} outstanding, {args.gateways} gateway(s), {args.duration_s:.0f} s", flush=True)
        records, start = asyncio.run(closed_loop_tenants([g.url for g in gws], share_specs(tenants, args.capacity), args.duration_s, args.seed))
        results[mode] = windows_report(records, start, weights, args.warmup_s, args.window_s, args.duration_s)
        for g in gws:
            g.stop()
        plat.redis_clean()  # counters of this mode must not carry over
        r = results[mode]
        for k, w in enumerate(r["windows"]):
            print(f"  window {k}: S={w['S']} S/w={[round(s / weights[i]) for i, s in enumerate(w['S'])]} error {100 * w['error']:.1f}% Jain {w['jain']:.4f}")
        print(f"  {r['req_per_s']:.1f} req/s, {r['out_per_s']:.0f} output tokens/s, {r['tokens_per_s']:.0f} service tokens/s, errors {r['errors']} {r['codes']}; windows ≤5 %: {100 * r['within5']:.0f}%", flush=True)
    lines = [f"{args.gateways} gateway process(es), pool capacity C={args.capacity}, backend {args.tokens_per_s:.0f} tokens/s + {args.ttft_ms:.0f} ms TTFT; "
             f"4 tenants with weights 1:2:3:4, each keeping 3·C={3 * args.capacity} requests outstanding; windows of {args.window_s:.0f} s "
             f"after {args.warmup_s:.0f} s of warm-up, {args.duration_s:.0f} s per mode. Service S = input + 2·output tokens (client-side usage).", ""]
    rows = []
    for mode, r in results.items():
        for k, w in enumerate(r["windows"]):
            rows.append([mode, k, " / ".join(str(s) for s in w["S"]), " / ".join(str(round(s / weights[i])) for i, s in enumerate(w["S"])),
                         f"{100 * w['error']:.1f} %", f"{w['jain']:.4f}"])
    lines.append(H.md_table(["scheduler", "window", "S_1 / S_2 / S_3 / S_4", "S_i / w_i", "share error", "Jain"], rows))
    lines.append("")
    rows = []
    for mode, r in results.items():
        errs = [w["error"] for w in r["windows"]]
        rows.append([mode, f"{r['req_per_s']:.1f}", f"{r['out_per_s']:.0f}", f"{r['tokens_per_s']:.0f}", f"{100 * r['within5']:.0f} %",
                     f"{100 * max(errs):.1f} %" if errs else "n/a", f"{min(w['jain'] for w in r['windows']):.4f}" if errs else "n/a",
                     f"{r['errors']} {r['codes'] or ''}"])
    lines.append(H.md_table(["scheduler", "req/s", "output tokens/s", "service tokens/s", "windows with error ≤ 5 %", "worst error", "worst Jain", "errors"], rows))
    if "fcfs" in results and results["fcfs"]["out_per_s"]:
        v, f = results["vtc"], results["fcfs"]
        lines += ["", f"Throughput VTC ÷ FCFS: {v['out_per_s'] / f['out_per_s']:.3f} in output tokens/s (what the simulated backend's time is spent on), "
                      f"{v['req_per_s'] / f['req_per_s']:.3f} in requests/s. Service tokens/s differ by the mix each scheduler serves "
                      "(FCFS favours the tenant with the longest prompts), so they are not a throughput measure here."]
    return "\n".join(lines)


# ---- phase 2: starvation -----------------------------------------------------------------------------


async def light_and_heavy(gateways, light_key, heavy_key, heavy_workers: int, rps: float, duration_s: float, seed: int,
                          separate_heavy: bool = True) -> list[dict]:
    rng = random.Random(seed)
    deadline = time.monotonic() + duration_s
    light: list[dict] = []
    heavy_count = Counter()

    async def heavy_worker(client, wrng):
        n = 0
        while time.monotonic() < deadline and n < 100_000:
            n += 1
            r = await client.chat(heavy_key, text_of(wrng.randint(200, 600), wrng), wrng.randint(16, 32))
            heavy_count[r["status"]] += 1
            if r["status"] != 200:
                await asyncio.sleep(0.05)

    async def light_loop(client):
        interval = 1.0 / rps
        tasks = []
        next_t = time.monotonic() + interval / 2
        while next_t < deadline and len(tasks) < 100_000:
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
            tasks.append(asyncio.ensure_future(client.chat(light_key, text_of(200, rng), 16, stream=True)))
            next_t += interval
        light.extend(await asyncio.gather(*tasks))

    async with Client(gateways) as client:
        if separate_heavy and heavy_workers:
            import concurrent.futures
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
                fut = asyncio.wrap_future(ex.submit(_heavy_process, gateways, heavy_key, heavy_workers, duration_s, seed))
                await light_loop(client)
                heavy_count.update(await fut)
        else:
            heavy = [heavy_worker(client, random.Random(rng.random())) for _ in range(heavy_workers)]
            await asyncio.gather(light_loop(client), *heavy)
    return light, dict(heavy_count)


def _heavy_process(gateways, heavy_key, workers, duration_s, seed) -> dict:
    """The heavy tenant's closed loop, in a process of its own."""
    async def run():
        rng = random.Random(seed + 1)
        deadline = time.monotonic() + duration_s
        counts = Counter()

        async def worker(client, wrng):
            n = 0
            while time.monotonic() < deadline and n < 100_000:
                n += 1
                r = await client.chat(heavy_key, text_of(wrng.randint(200, 600), wrng), wrng.randint(16, 32))
                counts[r["status"]] += 1
                if r["status"] != 200:
                    await asyncio.sleep(0.05)

        async with Client(gateways) as client:
            await asyncio.gather(*(worker(client, random.Random(rng.random())) for _ in range(workers)))
        return dict(counts)

    return asyncio.run(run())


def phase_starvation(args, plat) -> str:
    stamp = int(time.time())
    light_t = plat.create_tenant(f"light-{stamp}", weight=1)
    heavy_t = plat.create_tenant(f"heavy-{stamp}", weight=1)
    gws = [plat.start_gateway(name=f"gw-starv-{i}") for i in range(args.gateways)]
    for t in (light_t, heavy_t):
        plat.wait_key_ready(gws[0].url, t["key"])
    urls = [g.url for g in gws]
    dur = args.starvation_s or args.duration_s
    res = {}
    for label, workers in (("alone", 0), ("beside heavy", 10 * args.capacity)):
        print(f"starvation [{label}]: light at {args.light_rps} req/s, heavy {workers} outstanding, {dur:.0f} s", flush=True)
        light, heavy = asyncio.run(light_and_heavy(urls, light_t["key"], heavy_t["key"], workers, args.light_rps, dur, args.seed))
        ttft = [1000 * r["ttft"] for r in light if r["status"] == 200 and r["ttft"] is not None]
        total = [1000 * r["total"] for r in light if r["status"] == 200]
        errs = Counter(r["code"] or r["status"] for r in light if r["status"] != 200 or r["ttft"] is None)
        res[label] = {"n": len(light), "ttft": ttft, "total": total, "errors": dict(errs), "heavy": heavy}
        print(f"  light n={len(light)} TTFT p50 {H.percentile(ttft, 50):.1f} p99 {H.percentile(ttft, 99):.1f} ms; total p99 "
              f"{H.percentile(total, 99):.1f} ms; errors {dict(errs)}; heavy statuses {heavy}", flush=True)
    for g in gws:
        g.stop()
    a, b = res["alone"], res["beside heavy"]
    ratio = H.percentile(b["ttft"], 99) / H.percentile(a["ttft"], 99) if a["ttft"] and b["ttft"] else float("nan")
    lines = [f"{args.gateways} gateway process(es), C={args.capacity}; the light tenant sends {args.light_rps} req/s (fixed interval, streamed, "
             f"16 tokens) for {dur:.0f} s, alone and then beside a heavy tenant keeping 10·C={10 * args.capacity} requests outstanding "
             "(equal weights).", ""]
    rows = []
    for label, r in res.items():
        rows.append([label, r["n"], f"{H.percentile(r['ttft'], 50):.1f}", f"{H.percentile(r['ttft'], 99):.1f}",
                     f"{H.percentile(r['total'], 99):.1f}", r["errors"] or 0, r["heavy"] or "-"])
    lines.append(H.md_table(["light tenant", "requests", "TTFT p50 ms", "TTFT p99 ms", "total p99 ms", "light errors", "heavy statuses"], rows))
    lines += ["", f"p99 TTFT ratio (beside heavy ÷ alone): **{ratio:.2f}** (target ≤ 1.5: {'PASS' if ratio <= 1.5 else 'MISS'})."]
    if len(a["ttft"]) < 100:
        lines.append(f"(p99 of {len(a['ttft'])}/{len(b['ttft'])} samples is close to the maximum; run longer for a stable p99.)")
    return "\n".join(lines)


# ---- phase 3: overshoot ----------------------------------------------------------------------------------

CASES = ("tpm", "quota-hard", "quota-soft", "rpm")


async def burst(urls, key: str, n: int, n_drop: int, content: str, max_tokens: int) -> list[dict]:
    drop = set(list(range(0, n, max(1, n // n_drop)))[:n_drop]) if n_drop else set()
    async with Client(urls) as client:
        calls = [client.chat(key, content, max_tokens, stream=i in drop, drop_after_first=True) for i in range(n)]
        return await asyncio.gather(*calls)


def settle_wait(plat, tenant_id: int, window_kind: str, timeout: float = 20.0) -> tuple[dict, dict]:
    from serving.admission import window_id

    r = plat.redis()
    key = f"mtl:{{t{tenant_id}}}:quota:{window_id(window_kind)}"
    deadline = time.monotonic() + timeout
    while True:
        counter = {k: int(v) for k, v in r.hgetall(key).items() if k in ("used", "reserved")}
        ledger = plat.ledger(tenant_id)
        if (counter.get("reserved", 0) == 0 and counter.get("used", 0) == ledger["tokens"]) or time.monotonic() > deadline:
            return counter, ledger
        time.sleep(0.25)


def phase_overshoot(args, plat, backend) -> str:
    content = "Summarise the plot of a short story about a lighthouse keeper in two sentences."
    max_tokens = args.burst_max_tokens
    gws = [plat.start_gateway(name=f"gw-over-{i}") for i in range(max(args.overshoot_gateways))]
    stamp = int(time.time())
    # The reservation of one request (prompt estimate + max_tokens), read back from the quota header.
    cal = plat.create_tenant(f"cal-{stamp}", quota_tokens=10**9, quota_window="day", quota_mode="soft")
    plat.wait_key_ready(gws[0].url, cal["key"])
    first = asyncio.run(burst([gws[0].url], cal["key"], 1, 0, content, max_tokens))[0]
    reserve = int(first["headers"].get("x-quota-used-tokens", "0"))
    print(f"overshoot: one request reserves {reserve} tokens (prompt estimate + max_tokens {max_tokens})", flush=True)
    rows = []
    for g in args.overshoot_gateways:
        urls = [x.url for x in gws[:g]]
        for case in args.cases:
            policy = {"tpm": {"tokens_per_minute": args.tpm}, "quota-hard": {"quota_tokens": args.quota, "quota_window": "day", "quota_mode": "hard"},
                      "quota-soft": {"quota_tokens": args.quota, "quota_window": "day", "quota_mode": "soft"},
                      "rpm": {"requests_per_minute": args.rpm}}[case]
            t = plat.create_tenant(f"os-{case}-{g}-{stamp}", **policy)
            for u in urls:
                plat.wait_key_ready(u, t["key"])
            H.http_json("POST", backend.url + "/_dev/faults", {"status": 503, "count": args.faults})
            t0 = time.monotonic()
            results = asyncio.run(burst(urls, t["key"], args.burst, args.drops, content, max_tokens))
            span = time.monotonic() - t0
            H.http_json("POST", backend.url + "/_dev/faults/reset", {})
            statuses = Counter(r["status"] for r in results)
            codes = Counter(r["code"] for r in results if r["status"] not in (200,))
            refused = [r for r in results if r["status"] == 429 and r["code"] != "queue_timeout"]
            no_retry_after = sum(1 for r in refused if "retry-after" not in r["headers"])
            admitted = [r for r in results if r["status"] != 0 and (r["status"] != 429 or r["code"] == "queue_timeout")]
            counter, ledger = settle_wait(plat, t["id"], policy.get("quota_window", "month"))  # the policy's window (month by default)
            used, reserved = counter.get("used", 0), counter.get("reserved", 0)
            if case == "tpm":
                allowed = args.tpm * (1 + span / 60)
                over = max(0, ledger["tokens"] - allowed)
                verdict = f"used {ledger['tokens']} ≤ {allowed:.0f} (limit + refill over {span:.1f} s): overshoot {over:.0f}"
                ok = over == 0
            elif case == "quota-hard":
                peak = max((int(r["headers"].get("x-quota-used-tokens", 0)) for r in admitted), default=0)
                over = max(0, ledger["tokens"] - args.quota, peak - args.quota)
                verdict = f"peak used+reserved {peak}, ledger {ledger['tokens']} vs quota {args.quota}: overshoot {over}"
                ok = over == 0
            elif case == "quota-soft":
                unthrottled = [r for r in admitted if r["headers"].get("x-quota-state") != "throttled"]
                throttled = len(admitted) - len(unthrottled)
                peak = max((int(r["headers"].get("x-quota-used-tokens", 0)) for r in unthrottled), default=0)
                over = max(0, peak - args.quota)
                verdict = (f"peak used+reserved before throttling {peak} vs quota {args.quota}: overshoot {over} (bound: one reservation "
                           f"{reserve}, max_tokens {max_tokens}); then {throttled} admitted throttled (≤ PLATFORM_SOFT_THROTTLE_TPM/min)")
                ok = over <= reserve
            else:
                expected = args.rpm + int(args.rpm * span / 60)
                verdict = f"admitted {len(admitted)} of {args.burst}, limit {args.rpm}/min (+{int(args.rpm * span / 60)} refilled over {span:.1f} s)"
                ok = args.rpm <= len(admitted) <= expected
            drift = used - ledger["tokens"]
            row = [g, case, len(admitted), dict(statuses), dict(codes), verdict, "OK" if ok else "**FAIL**",
                   f"{used} / {reserved} / {ledger['tokens']} → drift {drift}" + ("" if drift == 0 and reserved == 0 else " **FAIL**"),
                   "all" if no_retry_after == 0 else f"{no_retry_after} missing", ledger["by_status"]]
            rows.append(row)
            print("  " + " | ".join(str(c) for c in row), flush=True)
    for g_ in gws:
        g_.stop()
    lines = [f"A fresh tenant per row; {args.burst} simultaneous chat requests (max_tokens {max_tokens}, one reservation = {reserve} tokens) "
             f"round-robin over the gateway processes; the backend answers 503 to the first {args.faults} (injected), {args.drops} clients "
             f"stream and disconnect after the first token. Limits: tokens/min {args.tpm}; quota {args.quota} tokens/day (hard, soft); "
             f"requests/min {args.rpm}. Drift: Redis quota counter used / reserved / ledger tokens, after everything settled.", ""]
    lines.append(H.md_table(["gateways", "limit", "admitted", "statuses", "refusal codes", "overshoot", "check", "counter used / reserved / ledger",
                             "429 with Retry-After", "ledger by status"], rows))
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="share,starvation,overshoot")
    ap.add_argument("--duration-s", type=float, default=300.0, help="share: per scheduler mode; starvation: per run unless --starvation-s")
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--warmup-s", type=float, default=None, help="excluded from the windows (default min(10, window))")
    ap.add_argument("--starvation-s", type=float, default=None)
    ap.add_argument("--capacity", type=int, default=8, help="pool capacity C")
    ap.add_argument("--tokens-per-s", type=float, default=200.0, help="simulated backend token rate per request")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--gateways", type=int, default=2, help="gateway processes for share and starvation")
    ap.add_argument("--no-fcfs", action="store_true", help="skip the FCFS baseline (PLATFORM_SCHEDULER=fcfs)")
    ap.add_argument("--light-rps", type=float, default=0.2)
    ap.add_argument("--overshoot-gateways", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES))
    ap.add_argument("--burst", type=int, default=200)
    ap.add_argument("--burst-max-tokens", type=int, default=32)
    ap.add_argument("--faults", type=int, default=20, help="backend 503s injected per burst")
    ap.add_argument("--drops", type=int, default=20, help="streams dropped after the first token per burst")
    ap.add_argument("--tpm", type=int, default=2000)
    ap.add_argument("--quota", type=int, default=1500)
    ap.add_argument("--rpm", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--redis-url", help=f"default $REDIS_URL or {H.DEFAULT_REDIS}")
    ap.add_argument("--database-url")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.warmup_s is None:
        args.warmup_s = min(10.0, args.window_s)
    phases = [p for p in args.phases.split(",") if p]

    redis_url = H.redis_url_from(args.redis_url)
    if not H.redis_reachable(redis_url):
        print(f"SKIPPED: this benchmark needs a real Redis (REDIS_URL / --redis-url; {redis_url or 'unset'} is not reachable).")
        return 0
    meta = f"Date {H.now_utc()}; machine {H.machine()}; commit {H.git_commit()}; Redis {redis_url}; load generator: aiohttp client (per-request accounting)."
    sections = {}
    with H.Platform(redis_url=redis_url, database_url=args.database_url, keep=args.keep) as plat:
        plat.setup_django()
        meta += f" Database: {'SQLite' if plat.database_url.startswith('sqlite') else plat.database_url.split(':', 1)[0]}."
        backend = plat.start_backend(tokens_per_s=args.tokens_per_s, ttft_ms=args.ttft_ms, output_tokens=10_000, max_concurrent=1024)
        plat.create_model_and_pool([backend.url], capacity=args.capacity, max_concurrency=args.capacity)
        if "share" in phases:
            sections["Fair scheduling: weighted share (VTC vs FCFS)"] = phase_share(args, plat)
        if "starvation" in phases:
            sections["Fair scheduling: starvation of a light tenant"] = phase_starvation(args, plat)
        if "overshoot" in phases:
            sections["Quotas and rate limits: overshoot across gateway processes"] = phase_overshoot(args, plat, backend)
    for title, body in sections.items():
        text = meta + "\n\n" + body
        print(f"\n## {title}\n\n{text}")
        if not args.no_docs:
            H.write_section(title, text)
    if sections and not args.no_docs:
        print(f"\nwritten to {H.DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
