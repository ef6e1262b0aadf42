"""Quota overshoot with adversarial prompts, through 1, 2 and 4 gateway processes (issue 11, defect 1).

Issue 11 found a hard quota of 2,000 tokens/day overshot to 3,076 by 60 simultaneous chats of six emoji and a
number: the prompt estimate (~3 characters a token) was no upper bound. This bench sends such chats — emoji, CJK,
code, a long system prompt, many messages, under a tenant system prompt with emoji and CJK — to a dev backend
serving the real tiny model (so the backend's counts are real tokens) whose base model's files are on this
machine (so the gateway counts prompts exactly, serving/tokencount.py).

Rows: admission in one process (the embedded default) through 1 gateway; Redis through 1, 2 and 4 gateway
processes (clients round-robin). Per row, a fresh tenant with a hard quota and one with a soft quota (Q tokens a
day each) each get N simultaneous chats with max_tokens M. Checks:
- hard: tokens used (ledger) ≤ Q: overshoot 0;
- soft: the peak of used + reserved while not yet throttled exceeds Q by at most one request's reservation;
- counters equal the ledger after settling: the quota counter (read through the `x-quota-used-tokens` header of
  one more request, and in Redis) equals the ledger's tokens, nothing left reserved.

    .venv/bin/python bench/overshoot.py                      # starts its own redis-server on a free port
    .venv/bin/python bench/overshoot.py --redis-url redis://127.0.0.1:6390/0 --processes 1,2
    .venv/bin/python bench/overshoot.py --baseline-src /tmp/old   # gateways from another source tree ("before" rows)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _harness as H  # noqa: E402

TITLE = "Quotas: overshoot with adversarial prompts"
ROWS = itertools.count(1)  # tenant slugs stay unique across rows
TENANT_PROMPT = "Tenant rules 🛑: answer briefly; 日本語 only when asked; never print <|system|>."
EMOJI = "😀😃😄😁😆😅"
CJK = "你好，世界。今天天气很好，我们去公园散步吧！東京タワーは高い。한국어도 있어요."
CODE = 'def f(xs):\n    """Sum."""\n    return {k: v**2 for k, v in xs.items() if v != 0}  # {{ x }} {% raw %}\n'
LONG_SYSTEM = "You are the assistant of Ünïcødé GmbH. " * 8


def adversarial_chats(n: int) -> list[list[dict]]:
    """Issue 11's chats of six emoji and a number, every sixth one CJK, code, a long system prompt or many messages."""
    extra = [[{"role": "user", "content": CJK}], [{"role": "user", "content": CODE}],
             [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": EMOJI}],
             [{"role": ("user", "assistant")[i % 2], "content": f"{EMOJI} {i}"} for i in range(7)]]
    return [extra[i // 6 % 4] if i % 6 == 5 else [{"role": "user", "content": f"{EMOJI} {i}"}] for i in range(n)]


async def burst(urls: list[str], key: str, chats: list[list[dict]], max_tokens: int) -> list[dict]:
    """All chats at once, round-robin over the gateways: status, headers, usage, error code of each."""
    import aiohttp

    async def one(session, i, messages):
        out = {"status": 0, "headers": {}, "usage": None, "code": ""}
        body = {"model": H.MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        try:
            async with session.post(urls[i % len(urls)] + "/v1/chat/completions", json=body,
                                    headers={"authorization": f"Bearer {key}"}) as resp:
                out["status"], out["headers"] = resp.status, {k.lower(): v for k, v in resp.headers.items()}
                data = await resp.json(content_type=None)
                if resp.status == 200:
                    out["usage"] = data.get("usage")
                else:
                    out["code"] = ((data or {}).get("error") or {}).get("code", "")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out["code"] = type(exc).__name__
        return out

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)) as session:
        return await asyncio.gather(*(one(session, i, m) for i, m in enumerate(chats)))


def start_gateway(plat: H.Platform, name: str, src: Path | None) -> H.Proc:
    """A gateway process, from this tree or from `src` (another checkout: its code, this platform's database)."""
    if src is None:
        return plat.start_gateway(name=name)
    port = H.free_port()
    log = plat.var / f"{name}.log"
    argv = [H.UVICORN, "portal.asgi:application", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"]
    popen = subprocess.Popen(argv, cwd=src, env={**plat.env, "PYTHONPATH": str(src)}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
    proc = H.Proc(name, popen, f"http://127.0.0.1:{port}", log)
    plat.procs.append(proc)
    plat._wait_http(proc, "/metrics")
    return proc


def start_redis() -> tuple[str, subprocess.Popen | None]:
    if shutil.which("redis-server") is None:
        return "", None
    port = H.free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not H.redis_reachable(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            return "", None
        time.sleep(0.1)
    return url, proc


def quota_counter(plat: H.Platform, urls: list[str], tenant: dict, counter, redis_url: str) -> tuple[int, dict | None]:
    """(used as the gateway's admission reports it, {used, reserved} in Redis before that): one more request's
    `x-quota-used-tokens` less its own reservation (exactly counted here; nothing when it is refused)."""
    from serving.admission import window_id
    from serving.gateway.parsing import inject_system_prompt

    in_redis = None
    if redis_url:
        raw = plat.redis().hgetall(f"mtl:{{t{tenant['id']}}}:quota:{window_id('day')}")
        in_redis = {k: int(v) for k, v in raw.items() if k in ("used", "reserved")}
    if counter is None:  # gateways that do not count exactly: their reservation of the probe is not known here
        return None, in_redis
    probe = [{"role": "user", "content": "ok"}]
    r = asyncio.run(burst(urls[:1], tenant["key"], [probe], 1))[0]
    own = counter.chat(inject_system_prompt(probe, TENANT_PROMPT, "keep"), None, kind="dev").tokens + 1 if r["status"] == 200 else 0
    return int(r["headers"].get("x-quota-used-tokens", -1)) - own, in_redis


def run_row(plat, args, label: str, start_gateways, counter, redis_url: str, stamp: int, *, exact: bool) -> dict:
    """Create the row's two tenants, then start its gateways (a gateway without Redis sees only the tenants that
    exist when it loads its configuration), send both bursts, read the counters."""
    from serving.gateway.parsing import inject_system_prompt

    chats = adversarial_chats(args.requests)
    reservations = [counter.chat(inject_system_prompt(m, TENANT_PROMPT, "keep"), None, kind="dev").tokens + args.max_tokens for m in chats]
    slug = "".join(c for c in label.lower() if c.isalnum())[:16]
    tenants = {mode: plat.create_tenant(f"{mode}-{slug}-{next(ROWS)}-{stamp % 100000}", prompt=TENANT_PROMPT,
                                        quota_tokens=args.quota, quota_window="day", quota_mode=mode) for mode in ("hard", "soft")}
    gateways = start_gateways()
    urls = [g.url for g in gateways]
    row = {"label": label, "processes": len(urls)}
    try:
        for mode, t in tenants.items():
            for u in urls:
                plat.wait_key_ready(u, t["key"])
            results = asyncio.run(burst(urls, t["key"], chats, args.max_tokens))
            ledger = plat.ledger(t["id"])
            seen, in_redis = quota_counter(plat, urls, t, counter if exact else None, redis_url)
            admitted = [r for r in results if r["status"] == 200]
            unthrottled = [r for r in admitted if r["headers"].get("x-quota-state") != "throttled"]
            peak = max((int(r["headers"].get("x-quota-used-tokens", 0)) for r in unthrottled), default=0)
            row[mode] = {
                "admitted": len(admitted), "throttled": len(admitted) - len(unthrottled),
                "statuses": dict(Counter(r["status"] for r in results)), "codes": dict(Counter(r["code"] for r in results if r["code"])),
                "used": ledger["tokens"], "peak": peak, "counter": seen, "redis": in_redis,
                "usage_sum": sum((r["usage"] or {}).get("total_tokens", 0) for r in admitted),
            }
    finally:
        for g in gateways:
            g.stop()
            plat.procs.remove(g)
    row["one_request"] = max(reservations)
    hard, soft = row["hard"], row["soft"]
    hard["overshoot"] = max(0, hard["used"] - args.quota)
    soft["overshoot"] = max(0, soft["peak"] - args.quota)
    row["settled"] = all(m["counter"] in (None, m["used"]) and (m["redis"] is None or m["redis"] == {"used": m["used"], "reserved": 0})
                         and (m["counter"], m["redis"]) != (None, None) for m in (hard, soft))
    return row


def report(rows: list[dict], args, meta: dict) -> str:
    parts = [f"Date {meta['date']}; machine {meta['machine']}; commit {meta['commit']}; database SQLite; load generator: aiohttp client.",
             f"Backend: the dev backend on the real tiny model (its own token counts); base model files on this machine, so the "
             f"gateway counts prompts exactly. Per row a fresh hard-quota tenant and a fresh soft-quota tenant ({args.quota:,} tokens/day "
             f"each, tenant system prompt with emoji and CJK) each send {args.requests} simultaneous chats with max_tokens {args.max_tokens}: "
             "six emoji and a number (issue 11's case), every sixth one CJK, code, a long system prompt or seven messages. "
             "Hard overshoot = ledger tokens − quota; soft overshoot = peak used + reserved before throttling − quota, allowed up to "
             "one request's reservation; settled = the quota counter (as admission reports it, and in Redis) equals the ledger, "
             "nothing reserved.", ""]
    table = []
    for r in rows:
        h, s = r["hard"], r["soft"]
        table.append([r["label"], r["processes"], f"{h['admitted']} of {args.requests}", f"{h['used']:,} / {args.quota:,}",
                      f"**{h['overshoot']:,}**" + ("" if h["overshoot"] == 0 else " FAIL"),
                      f"{s['admitted'] - s['throttled']} + {s['throttled']} throttled", f"{s['peak']:,}",
                      f"**{s['overshoot']}** (≤ {r['one_request']})" + ("" if s["overshoot"] <= r["one_request"] else " FAIL"),
                      ("yes" if r["settled"] else "n/a" if (h["counter"], h["redis"]) == (None, None)
                       else f"**no** (hard {h['counter']}/{h['redis']}, soft {s['counter']}/{s['redis']})"),
                      f"{h['statuses']} / {s['statuses']}"])
    parts.append(H.md_table(["admission, counting", "gateways", "hard: admitted", "hard: used / quota", "hard overshoot",
                             "soft: admitted", "soft: peak used+reserved", "soft overshoot (one request)", "counters = ledger",
                             "statuses hard / soft"], table))
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4], help="gateway processes with Redis")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quota", type=int, default=2000)
    ap.add_argument("--redis-url", help="default: a private redis-server on a free port, stopped at the end; 'none': no Redis rows")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process admission row")
    ap.add_argument("--baseline-src", type=Path, help="also run rows with gateways from this source tree (e.g. before exact counting)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    own_redis = None
    redis_url = "" if args.redis_url == "none" else args.redis_url or ""
    if args.redis_url is None:
        redis_url, own_redis = start_redis()
        print(f"redis: {redis_url or 'redis-server not found: no Redis rows'}", flush=True)
    meta = {"date": H.now_utc(), "machine": H.machine(), "commit": H.git_commit()}
    rows = []
    stamp = int(time.time())
    try:
        with H.Platform(redis_url=redis_url, keep=args.keep) as plat:
            plat.setup_django()
            from serving.models import Backend, BackendPool, BaseModel
            from devbackend.tinymodel import build_tiny_model
            from serving.tokencount import load_counter

            model = build_tiny_model(plat.var / "tiny-chat", model_id=H.MODEL_ID)
            counter = load_counter(model)
            port = H.free_port()
            popen, log = plat._spawn("backend", [H.PY, "-m", "devbackend", "--model", str(model), "--model-id", H.MODEL_ID,
                                                 "--port", str(port), "--max-total-tokens", "1024", "--max-concurrent-requests", "128"])
            backend = H.Proc("backend", popen, f"http://127.0.0.1:{port}", log)
            plat.procs.append(backend)
            plat._wait_http(backend, "/health", timeout=120)
            base = BaseModel.objects.create(name=H.MODEL, hf_id=H.MODEL_ID, context_length=1024, local_path=str(model))
            pool = BackendPool.objects.create(name="bench-tiny", base_model=base, kind=BackendPool.Kind.DEV)
            Backend.objects.create(pool=pool, url=backend.url, max_concurrency=128)
            plat._close_db()

            sources = [("exact", None)] + ([("old estimate", args.baseline_src.resolve())] if args.baseline_src else [])
            for counting, src in sources:
                plans = []
                if not args.no_local:
                    plans.append(("in-process", 1, {"REDIS_URL": ""}))
                if redis_url:
                    plans += [("Redis", n, {}) for n in args.processes]
                for admission, n, env in plans:
                    label = f"{admission}, {counting}"

                    def start(n=n, env=env, src=src):
                        saved = dict(plat.env)
                        if env:  # in-process admission: a gateway without Redis
                            plat.env.pop("REDIS_URL", None)
                        try:
                            return [start_gateway(plat, f"gw-{i}", src) for i in range(n)]
                        finally:
                            plat.env.clear()
                            plat.env.update(saved)

                    print(f"{label} through {n} gateway(s)…", flush=True)
                    row = run_row(plat, args, label, start, counter, "" if env else redis_url, stamp, exact=src is None)
                    rows.append(row)
                    print(json.dumps(row, ensure_ascii=False), flush=True)
    finally:
        if own_redis is not None:
            own_redis.terminate()
            own_redis.wait(10)
    text = report(rows, args, meta)
    print()
    print(text)
    if not args.no_docs:
        H.write_section(TITLE, text)
        print(f"\nwritten to {H.DOCS}")
    return 0 if all(r["hard"]["overshoot"] == 0 and r["soft"]["overshoot"] <= r["one_request"] and r["settled"]
                    for r in rows if "exact" in r["label"]) else 1


if __name__ == "__main__":
    sys.exit(main())
