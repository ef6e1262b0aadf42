"""Fault injection on real gateway processes: Redis paused and killed mid-burst, a gateway SIGKILLed mid-stream.

Two gateway processes (`uvicorn portal.asgi:application`, as deployed) share a private redis-server
(tests/support/redis_server.py: nothing kept on disk, so a kill loses every key), the test database and a
journal folder; the simulated dev backend runs as a process of its own. Clients stream chat completions
whose tokens are words, so a client counts exactly the tokens it received.

After each fault the same invariants (docs/limits.md, "Faults") are asserted:
1. every token a client received is in the ledger exactly once (one record per request, its output tokens =
   the tokens that client received, also for streams cut by a crash);
2. the quota counters in Redis equal the ledger;
3. no scheduler slot, concurrency entry or reservation outlives its request by more than a few seconds;
4. every refusal or failure a client got is JSON in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.support.faults import CAPACITY, LEASE_S, POLICIES, assert_invariants, database_url, faults, wait_until  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.mark.parametrize("how", ["paused", "killed"])
def test_redis_paused_or_killed_mid_burst(faults, how):
    """Redis stops answering for 6 s (SIGSTOP), or dies and comes back empty after 3 s, in the middle of a burst."""
    backend = faults.start_backend(tokens_per_s=60)
    faults.create(backend, POLICIES)
    gateways = [faults.start_gateway(), faults.start_gateway()]

    async def fault():
        await asyncio.sleep(2)
        if how == "paused":
            faults.redis.pause()
            await asyncio.sleep(6)
            faults.redis.resume()
        else:
            faults.redis.kill()
            await asyncio.sleep(3)
            faults.redis.start()

    asyncio.run(faults.burst(gateways, {"soft": 8, "hard": 4}, seconds=12, max_tokens=30, fault=fault))
    figures = assert_invariants(faults)
    served = [r for r in faults.results if r.status == 200]
    assert len(served) > 40 and all(r.completed and r.tokens == 30 for r in served), figures
    assert any(r.tenant == "soft" and r.status == 200 for r in served)  # soft tenants were served through it
    for gw in gateways:
        assert gw["proc"].poll() is None, faults.log(gw["name"])
    print(f"Redis {how}: {figures}")


def test_a_gateway_killed_mid_stream_loses_no_billed_token(faults):
    """SIGKILL a gateway with 12 streams running: what they received is billed, and its slots free in seconds."""
    backend = faults.start_backend(tokens_per_s=40)
    faults.create(backend, {"soft": POLICIES["soft"]})
    doomed, survivor = faults.start_gateway(), faults.start_gateway()
    killed_at = {}

    async def scenario():
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            streams = [asyncio.ensure_future(faults.request(session, doomed, "soft", 400)) for _ in range(12)]
            await asyncio.sleep(2.5)
            faults.kill(doomed)
            killed_at["t"] = time.monotonic()
            cut = await asyncio.gather(*streams)
        return cut

    cut = asyncio.run(scenario())
    streaming = [r for r in cut if r.status == 200]
    # The pool's slots (and the express slot) were streaming; the rest waited for one. All were cut.
    assert len(streaming) >= CAPACITY and all(r.cut for r in cut), [(r.tag, r.status, r.tokens, r.cut) for r in cut]
    assert all(0 < r.tokens < 400 for r in streaming) and not any(r.tokens for r in cut if r.status != 200)
    # The survivor recovers the dead process's journal: its slots and concurrency free at once.
    freed = wait_until(lambda: not any(faults.held().values()), LEASE_S + 5, interval=0.1)
    freed_s = time.monotonic() - killed_at["t"]
    assert freed, f"held {freed_s:.1f} s after the kill: {faults.held()}"
    assert freed_s < LEASE_S + 2
    figures = assert_invariants(faults)
    rows = faults.ledger()
    assert all(rows[r.tag][0].status == "interrupted" for r in streaming)
    # The pool is whole again: a full burst on the survivor is served, no queue timeout.
    asyncio.run(faults.burst([survivor], {"soft": CAPACITY}, seconds=2, max_tokens=10))
    assert all(r.status == 200 for r in faults.results[len(cut):])
    assert_invariants(faults)
    print(f"gateway killed: {sum(r.tokens for r in cut)} tokens delivered in {len(streaming)} cut streams, all billed; slots and "
          f"concurrency freed {freed_s:.1f} s after the kill; {figures}")
