"""With Redis, a request's admission takes its scheduler slot in the same script, and its settle releases the slot in
the same script: two round trips per request (issue 13), with the same counts as when they were four to six."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid

import pytest

from serving.admission import RedisAdmission, TenantLimits
from serving.scheduler import FairScheduler, RedisState, ResilientState

_ids = itertools.count(int(uuid.uuid4().int % 10**9) * 1000 + 700)


def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.skip("needs Redis: set REDIS_URL (CI starts one)")
    return url


async def _no_usage(tenant_id, kind, window, *, exclude=()):
    return 0


def _setup():
    url = redis_url()
    adm = RedisAdmission(url, usage_loader=_no_usage)
    sched = FairScheduler(ResilientState(RedisState(url)))
    return url, adm, sched, next(_ids)


async def _admitted(adm, sched, lim, pool, capacity=4, tokens=100, weight=1.0):
    offer = sched.offer(pool_id=pool, capacity=capacity, tenant_id=lim.tenant_id, weight=weight, input_tokens=60,
                        max_output_tokens=40)
    d = await adm.admit(lim, request_id=uuid.uuid4().hex, reserve_tokens=tokens, slot_offer=offer)
    slot = sched.adopt(offer, throttled=d.throttled) if d.slot_taken else None
    keeper = sched.state._keeper()
    while slot is not None and keeper.renewals == 0:
        # The keeper's first renewal starts with the first lease; a slot freed while it is on its way is re-added by it
        # for a moment (then released again): the reads below would see that moment.
        await asyncio.sleep(0.005)
    return d, slot


def test_admission_takes_the_slot_and_the_settle_frees_it_with_the_real_charge():
    url, adm, sched, pool = _setup()
    lim = TenantLimits(tenant_id=next(_ids), tokens_per_minute=10_000)

    async def scenario():
        r = adm._client()
        d, slot = await _admitted(adm, sched, lim, pool)
        assert d.allowed and d.slot_taken and slot is not None
        member = f"{lim.tenant_id}:{slot.slot_id}"
        assert await r.zscore(RedisState.slots_key(pool), member) is not None
        charged = float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id)))
        assert charged == pytest.approx(60 + 2 * slot.predicted_output)  # estimate + 2 · predicted output, weight 1
        assert sched.state._keeper().held == (1, 1)  # renewed while it runs: the slot and the reservation
        op = sched.detach(slot, input_tokens=50, output_tokens=10)
        await adm.settle(d.reservation, used_tokens=60, slot_free=op)
        assert await r.zscore(RedisState.slots_key(pool), member) is None
        assert float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id))) == pytest.approx(50 + 2 * 10)
        assert await adm.snapshot(lim.tenant_id, "month") == {"used": 60, "reserved": 0}
        assert sched.state._keeper().held == (0, 0)
        await sched.release(slot, input_tokens=50, output_tokens=10)  # a second release does nothing
        assert float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id))) == pytest.approx(70)

    asyncio.run(scenario())


def test_a_refused_request_takes_no_slot_and_a_full_pool_leaves_it_to_the_scheduler():
    url, adm, sched, pool = _setup()

    async def scenario():
        r = adm._client()
        rpm = TenantLimits(tenant_id=next(_ids), requests_per_minute=1)
        first, slot = await _admitted(adm, sched, rpm, pool, capacity=1)
        refused, none = await _admitted(adm, sched, rpm, pool, capacity=1)
        assert first.slot_taken and not refused.allowed and not refused.slot_taken and none is None
        assert await r.zcard(RedisState.slots_key(pool)) == 1
        other = TenantLimits(tenant_id=next(_ids))
        admitted, no_slot = await _admitted(adm, sched, other, pool, capacity=1)  # the pool's one slot is taken
        assert admitted.allowed and not admitted.slot_taken and no_slot is None
        assert await r.hget(f"mtl:{{p{pool}}}:vtc", str(other.tenant_id)) is None  # nothing charged
        await adm.settle(first.reservation, used_tokens=1, slot_free=sched.detach(slot, input_tokens=1, output_tokens=0))
        await adm.settle(admitted.reservation, used_tokens=0)
        assert await r.zcard(RedisState.slots_key(pool)) == 0

    asyncio.run(scenario())


def test_a_throttled_tenant_is_charged_at_a_tenth_of_its_weight():
    url, adm, sched, pool = _setup()
    lim = TenantLimits(tenant_id=next(_ids), quota_tokens=10, quota_mode="soft", tokens_per_minute=100_000)

    async def scenario():
        r = adm._client()
        over, slot = await _admitted(adm, sched, lim, pool, tokens=20)  # takes the quota past 100 %
        await adm.settle(over.reservation, used_tokens=20, slot_free=sched.detach(slot, input_tokens=60, output_tokens=20))
        before = float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id)))
        d, slot = await _admitted(adm, sched, lim, pool, tokens=20)
        assert d.throttled and d.slot_taken and slot.weight == pytest.approx(0.1)
        charged = float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id))) - before
        assert charged == pytest.approx((60 + 2 * slot.predicted_output) / 0.1)
        await adm.settle(d.reservation, used_tokens=1, slot_free=sched.detach(slot, input_tokens=1, output_tokens=0, refund=True))
        assert float(await r.hget(f"mtl:{{p{pool}}}:vtc", str(lim.tenant_id))) == pytest.approx(before)

    asyncio.run(scenario())


def test_a_gateway_request_makes_two_redis_round_trips(world, gateway_factory, sim_url, monkeypatch):
    """Admission + slot, then settle + release: counted at the clients (the gateway's pipelined connection and
    redis-py's), for the second request (the first loads the scripts). Background renewals are pipelines, not counted
    here."""
    redis_url()
    import redis.asyncio.client as rc

    from common.redis_clients import PipelinedClient

    from tests.support.gateway import make_base_model, make_key, make_pool, post

    make_pool("shared", make_base_model(), [sim_url])
    _, key = make_key(world.tenant)
    gw = gateway_factory()
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    auth = {"authorization": f"Bearer {key}"}
    assert post(f"{gw.url}/v1/chat/completions", body, auth).status_code == 200
    commands = []
    real = rc.Redis.execute_command

    async def counted(self, *args, **options):
        if not isinstance(self, rc.Pipeline):
            commands.append(args[0])
        return await real(self, *args, **options)

    monkeypatch.setattr(rc.Redis, "execute_command", counted)
    real_pipelined = PipelinedClient.execute_command

    async def counted_pipelined(self, *args):
        commands.append(args[0])
        return await real_pipelined(self, *args)

    monkeypatch.setattr(PipelinedClient, "execute_command", counted_pipelined)
    for stream in (False, True):
        commands.clear()
        r = post(f"{gw.url}/v1/chat/completions", {**body, "stream": stream}, auth)
        assert r.status_code == 200
        time.sleep(0.2)  # anything the request still does after its last byte
        assert commands == ["EVALSHA", "EVALSHA"], commands
