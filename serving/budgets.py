"""Money budgets and per-key limits at admission, exact across gateway processes (docs/limits.md, "Money budgets and
per-key limits").

One atomic step per request, beside the tenant's admission (serving.admission), in Redis by one script or, in the
embedded default, the same algorithm under a lock in the process:
- the key's requests/min and tokens/min are token buckets, as the tenant's are;
- a month's counters (calendar month, UTC) hold, in micro-cents (µ¢, billing.spend), the tenant's spend and each
  budgeted key's spend, and each budgeted key's tokens, each as used + reserved;
- admission reserves the request's upper bound: its tokens (prompt + max tokens) and their cost at the model's price
  of the day (prompt at the input price, max tokens at the output price, each capped by the reservation); a request
  that would take a counter past its limit is refused (429 `insufficient_quota`), so a limit is never overshot;
- the settle (once per admitted request) counts the exact cost and tokens and frees the rest.

The month's counters are seeded from the ledger (billing.spend, named by its dotted path: apps are layers and the
gateway does not import billing) the first time they are needed, and again when the set of counters kept changes
(a hard budget or a key's budget switched on or off: its "generation"). Exactness across a seed (docs/limits.md,
"Seeding from the ledger"): a request's cost is in a generation's counters exactly once — from the ledger, from the
*pending* set, or from its settle:
- every settle puts the request in its tenant's month's pending set (request id -> key, tokens, µ¢) until its ledger
  record is in the database (`recorded`, batched off the request path), and a little longer (PENDING_GRACE_MS);
- a seed takes one consistent read of the ledger, then lists the pending set, then asks the same read which of the
  listed requests it holds: the others are added from the pending set, and so is every request settled after the
  listing (by the seed's script, which runs after them);
- a settle counts the request in every seeded generation of the month — where it was reserved, and each other one
  (seeded before this settle, so neither its ledger read nor its pending list held the request) — so a generation in
  use again later (a budget switched off, then on) holds what was spent meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal

from django.db import DatabaseError
from django.utils.module_loading import import_string

from common import redis_clients
from serving.admission import ratelimit_headers, window_bounds, window_id
from serving.leases import keeper_for, raise_if_cancelled, redis_errors

log = logging.getLogger(__name__)

SEED_LOADER = "billing.spend.budget_seed_usage"  # (tenant_id, month, key_ids, pending=) -> (tenant µ¢, {key: (µ¢, tokens)}, held)
SEED_ATTEMPTS = 3
# A request's pending entry is kept this long after its record is in the database. A seed lists the pending set no
# later than this after its ledger read began (else it is redone): an entry gone by then was recorded before that read.
PENDING_GRACE_MS = 30_000
RESERVATION_TTL_MS = 15 * 60 * 1000  # a reservation not settled by then (its process died) is released
MONTH_TTL_S = 35 * 86400
OK, RPM, TPM, TPM_TOO_LARGE, KEY_TOKENS, KEY_MONEY, TENANT_MONEY, NEED_SEED = 0, 2, 3, 4, 10, 11, 12, 9


def request_cost_microcents(input_tokens: int, output_tokens: int, price) -> int:
    """⌈T_in·p_in + T_out·p_out⌉ µ¢ (prices in cents per million tokens = µ¢ per token); 0 for an unpriced model.
    The same rule as billing.spend.request_cost_microcents, so the counters equal the ledger's spend."""
    if price is None:
        return 0
    exact = Decimal(input_tokens) * Decimal(price.input_price) + Decimal(output_tokens) * Decimal(price.output_price)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class BudgetLimits:
    """What a request must fit besides the tenant's limits (0 = none): the tenant's hard money limit and its key's own
    limits. `generation` names which counters are kept (it changes when one is switched on or off)."""

    tenant_id: int
    key_id: int | None = None
    tenant_hard_microcents: int = 0
    key_requests_per_minute: int = 0
    key_tokens_per_minute: int = 0
    key_month_tokens: int = 0
    key_month_microcents: int = 0
    generation: str = "0"
    budgeted_keys: tuple = ()  # ids of the tenant's keys with a monthly budget (seeded together)

    @property
    def counted(self) -> bool:
        """Whether this request's cost and tokens go into the month's counters."""
        return bool(self.tenant_hard_microcents or self.key_month_tokens or self.key_month_microcents)

    @property
    def active(self) -> bool:
        return self.counted or bool(self.key_requests_per_minute or self.key_tokens_per_minute)


def generation_of(*, tenant_hard: bool, budgeted_keys) -> str:
    return hashlib.sha1(repr((tenant_hard, tuple(sorted(budgeted_keys)))).encode()).hexdigest()[:10]


@dataclass
class BudgetReservation:
    tenant_id: int
    key_id: int | None
    request_id: str
    month: str
    generation: str
    tokens: int
    microcents: int
    counted: bool
    key_tpm: int
    admitted_ms: int
    backend: str  # "redis" or "local"
    recorded: bool = False  # its ledger record is in the database (a settle that comes later counts it in its own counters only)


@dataclass
class BudgetDecision:
    allowed: bool
    reservation: BudgetReservation | None = None
    status: int = 200
    error_type: str = ""
    code: str = ""
    message: str = ""
    retry_after: int = 0
    headers: dict | None = None


def _refusal(code: int, limits: BudgetLimits, retry_ms: int, tokens: int,
             levels: tuple[float, float] | None = None) -> BudgetDecision:
    """The refusal for a code. A refusal by the key's requests/min or tokens/min (RPM, TPM, TPM_TOO_LARGE) carries
    OpenAI's x-ratelimit-* of the key's limits, from `levels` (its buckets' requests and tokens left, nothing taken)."""
    retry = max(1, math.ceil(retry_ms / 1000)) if retry_ms else 1
    _, end = window_bounds("month")
    to_month_end = max(1, math.ceil((end - datetime.now(timezone.utc)).total_seconds()))
    if code == RPM:
        e = ("rate_limit_exceeded", "requests_per_minute_exceeded",
             f"Rate limit of this API key reached: {limits.key_requests_per_minute} requests per minute. Retry after {retry} s.")
    elif code == TPM:
        e = ("rate_limit_exceeded", "tokens_per_minute_exceeded",
             f"Rate limit of this API key reached: {limits.key_tokens_per_minute} tokens per minute (this request reserves "
             f"{tokens}: prompt + max_tokens). Retry after {retry} s.")
    elif code == TPM_TOO_LARGE:
        e, retry = ("rate_limit_exceeded", "request_exceeds_tokens_per_minute",
                    f"This request reserves {tokens} tokens (prompt + max_tokens), more than this API key's limit of "
                    f"{limits.key_tokens_per_minute} tokens per minute. Lower max_tokens or shorten the prompt."), 60
    elif code == KEY_TOKENS:
        e, retry = ("insufficient_quota", "insufficient_quota",
                    f"This API key has used its budget of {limits.key_month_tokens:,} tokens for this month (this request "
                    "reserves prompt + max_tokens). It resets at the start of next month; an admin can raise it."), to_month_end
    elif code == KEY_MONEY:
        e, retry = ("insufficient_quota", "insufficient_quota",
                    "This API key has reached its monthly spend budget (a request reserves the cost of prompt + max_tokens). "
                    "It resets at the start of next month; an admin can raise it."), to_month_end
    else:
        e, retry = ("insufficient_quota", "insufficient_quota",
                    "Your organisation has reached its monthly budget (a request reserves the cost of prompt + max_tokens). "
                    "It resets at the start of next month; an admin can raise the budget, within the ceiling the platform "
                    "set."), to_month_end
    headers = {}
    if levels is not None and code in (RPM, TPM, TPM_TOO_LARGE):
        headers = ratelimit_headers(limits.key_requests_per_minute, levels[0], limits.key_tokens_per_minute, levels[1])
    headers["retry-after"] = str(retry)
    return BudgetDecision(False, None, 429, e[0], e[1], e[2], retry, headers)


def _unavailable(message: str, code: str) -> BudgetDecision:
    return BudgetDecision(False, None, 503, "service_unavailable", code, message, 5, {"retry-after": "5"})


async def _seed_usage(limits: BudgetLimits, month: str, pending):
    """(tenant µ¢, {key id: (µ¢, tokens)}, ids held) of the month in the ledger, in one consistent read: `pending()`
    (called on the loader's thread once the read has begun) lists the pending requests, and `ids held` are those of
    them the read holds. Raises DatabaseError when the ledger cannot be read."""
    from asgiref.sync import sync_to_async
    from django.db import connection

    loader = import_string(SEED_LOADER)

    def load():
        try:
            return loader(limits.tenant_id, month, limits.budgeted_keys, pending=pending)
        except DatabaseError:
            connection.close()  # a dropped connection on this worker thread: once more on a new one
        try:
            return loader(limits.tenant_id, month, limits.budgeted_keys, pending=pending)
        except DatabaseError:
            connection.close()
            raise

    return await sync_to_async(load, thread_sensitive=False)()


def _seed_counters(limits: BudgetLimits, tenant_used: int, by_key: dict, listed: dict, held) -> tuple[int, dict]:
    """The seed: the ledger's read plus the listed pending requests it does not hold (listed: rid -> (key, tokens, µ¢))."""
    by_key = {k: list(v) for k, v in by_key.items()}
    for key_id in limits.budgeted_keys:
        by_key.setdefault(key_id, [0, 0])
    for rid, (key_id, tokens, cost) in listed.items():
        if rid in held:
            continue
        tenant_used += cost
        if key_id in by_key:
            by_key[key_id][0] += cost
            by_key[key_id][1] += tokens
    return tenant_used, by_key


def _parse_pending(value: str) -> tuple:
    """A pending entry in Redis: "key,tokens,µ¢,seq" -> (key id or None, tokens, µ¢, seq)."""
    k, n, c, q = value.split(",")[:4]
    return (int(k) if k else None), int(n), int(c), int(q)


# ---- in-process -----------------------------------------------------------------------------------


class LocalBudgets:
    """The same algorithm in one process, under a lock (the embedded default, and the fallback when Redis is away for
    limits that need no shared counter)."""

    backend_name = "local"

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[tuple, tuple[float, int]] = {}
        self._months: dict[tuple, dict] = {}  # (tenant, month, generation) -> counters, reservations, seeded_ms
        self._gens: dict[tuple, set] = {}  # (tenant, month) -> its generations seeded
        # (tenant, month) -> {"seq": n, "e": {rid: [key, tokens, µ¢, seq, recorded ms or None]}}: settled, not yet recorded
        self._pending: dict[tuple, dict] = {}
        self._recorded: collections.deque = collections.deque()  # (recorded ms, (tenant, month), rid), oldest first

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    def _bucket(self, key, cap: int, now: int) -> float:
        tokens, ts = self._buckets.get(key, (float(cap), now))
        return min(float(cap), tokens + max(0, now - ts) * cap / 60000)

    async def admit(self, limits: BudgetLimits, *, request_id: str, tokens: int, microcents: int) -> BudgetDecision:
        month = window_id("month")
        mkey = (limits.tenant_id, month, limits.generation)
        for _ in range(SEED_ATTEMPTS):
            if not limits.counted or mkey in self._months:
                break
            try:
                await self._seed(limits, month, mkey)
            except DatabaseError:
                return _unavailable("The usage ledger cannot be read right now, so budgets cannot be checked. Retry in a few "
                                    "seconds.", "usage_unavailable")
        else:
            if mkey not in self._months:
                return _unavailable("Budgets could not be checked. Retry in a few seconds.", "limits_unavailable")
        with self._lock:
            return self._admit_locked(limits, request_id, tokens, microcents, month, mkey)

    async def _seed(self, limits: BudgetLimits, month: str, mkey: tuple) -> None:
        """Seed the generation's counters: the ledger's read, the pending requests it does not hold, and those settled
        since the listing. Left unseeded (tried again) if the listing came too late after the read began."""
        begun = self._now_ms()
        listing: dict = {}

        def pending():
            with self._lock:
                self._prune(self._now_ms())
                state = self._pending.get((limits.tenant_id, month), {"seq": 0, "e": {}})
                listing.update(at=self._now_ms(), seq=state["seq"], e={rid: tuple(e[:3]) for rid, e in state["e"].items()})
            return list(listing["e"])

        tenant_used, by_key, held = await _seed_usage(limits, month, pending)
        if not listing or listing["at"] - begun > PENDING_GRACE_MS:
            return
        tenant_used, by_key = _seed_counters(limits, tenant_used, by_key, listing["e"], set(held))
        with self._lock:
            if mkey in self._months:
                return
            state = self._pending.get((limits.tenant_id, month), {"seq": 0, "e": {}})
            for k, n, cost, seq, _ in state["e"].values():  # settled since the listing: not in the ledger's read
                if seq > listing["seq"]:
                    tenant_used += cost
                    if k in by_key:
                        by_key[k][0] += cost
                        by_key[k][1] += n
            counters = {"mu": tenant_used, "mr": 0}
            for key_id, (money, toks) in by_key.items():
                counters[f"k{key_id}:mu"], counters[f"k{key_id}:nu"] = money, toks
            self._months[mkey] = {"c": counters, "r": {}, "seeded_ms": self._now_ms()}
            self._gens.setdefault((limits.tenant_id, month), set()).add(limits.generation)

    def _prune(self, now: int) -> None:
        """Forget pending entries recorded more than PENDING_GRACE_MS ago."""
        while self._recorded and self._recorded[0][0] < now - PENDING_GRACE_MS:
            _, pkey, rid = self._recorded.popleft()
            state = self._pending.get(pkey)
            if state is not None:
                state["e"].pop(rid, None)
                if not state["e"]:
                    del self._pending[pkey]

    def _admit_locked(self, limits, rid, n, cost, month, mkey) -> BudgetDecision:
        now = self._now_ms()
        k = limits.key_id
        rpm, tpm = limits.key_requests_per_minute, limits.key_tokens_per_minute
        r = self._bucket((k, "rpm"), rpm, now) if rpm else 0.0
        t = self._bucket((k, "tpm"), tpm, now) if tpm else 0.0
        if rpm and r < 1:
            return _refusal(RPM, limits, math.ceil((1 - r) * 60000 / rpm), n, (r, t))
        if tpm and n > tpm:
            return _refusal(TPM_TOO_LARGE, limits, 60000, n, (r, t))
        if tpm and t < n:
            return _refusal(TPM, limits, math.ceil((n - t) * 60000 / tpm), n, (r, t))
        month_state = self._months.get(mkey) if limits.counted else None
        if month_state is not None:
            self._expire(month_state, now)
            c = month_state["c"]
            if limits.key_month_microcents and c.get(f"k{k}:mu", 0) + c.get(f"k{k}:mr", 0) + cost > limits.key_month_microcents:
                return _refusal(KEY_MONEY, limits, 0, n)
            if limits.key_month_tokens and c.get(f"k{k}:nu", 0) + c.get(f"k{k}:nr", 0) + n > limits.key_month_tokens:
                return _refusal(KEY_TOKENS, limits, 0, n)
            if limits.tenant_hard_microcents and c["mu"] + c["mr"] + cost > limits.tenant_hard_microcents:
                return _refusal(TENANT_MONEY, limits, 0, n)
            c["mr"] += cost
            if k is not None:
                c[f"k{k}:mr"] = c.get(f"k{k}:mr", 0) + cost
                c[f"k{k}:nr"] = c.get(f"k{k}:nr", 0) + n
            month_state["r"][rid] = (k, n, cost, now)
        if rpm:
            self._buckets[(k, "rpm")] = (r - 1, now)
        if tpm:
            self._buckets[(k, "tpm")] = (t - n, now)
        return BudgetDecision(True, BudgetReservation(limits.tenant_id, k, rid, month, limits.generation, n, cost,
                                                      month_state is not None, tpm, now, self.backend_name))

    @staticmethod
    def _expire(month_state: dict, now: int) -> None:
        for rid, (k, n, cost, at) in list(month_state["r"].items()):
            if at < now - RESERVATION_TTL_MS:
                LocalBudgets._release(month_state, rid)

    @staticmethod
    def _release(month_state: dict, rid: str):
        entry = month_state["r"].pop(rid, None)
        if entry is None:
            return None
        k, n, cost, _ = entry
        c = month_state["c"]
        c["mr"] -= cost
        if k is not None:
            c[f"k{k}:mr"] -= cost
            c[f"k{k}:nr"] -= n
        return entry

    async def settle(self, reservation: BudgetReservation | None, *, tokens: int, microcents: int) -> None:
        """Count the request's exact tokens and cost, free the rest of its reservation; once."""
        if reservation is None:
            return
        with self._lock:
            self._settle_locked(reservation, tokens, microcents)

    def _settle_locked(self, res: BudgetReservation, tokens: int, cost: int, *, released: bool = False) -> None:
        pkey = (res.tenant_id, res.month)
        pending = self._pending.get(pkey)
        if pending is not None and res.request_id in pending["e"]:
            return  # settled before
        if res.key_tpm and (res.key_id, "tpm") in self._buckets:
            level, ts = self._buckets[(res.key_id, "tpm")]
            self._buckets[(res.key_id, "tpm")] = (min(float(res.key_tpm), level + res.tokens - tokens), ts)
        own = self._months.get((res.tenant_id, res.month, res.generation))
        found = res.counted and own is not None and self._release(own, res.request_id) is not None
        targets = [own] if found else []
        if not res.recorded and not released:  # its record is not in the ledger yet: no seed so far holds it
            for generation in self._gens.get(pkey, ()):
                month_state = self._months.get((res.tenant_id, res.month, generation))
                if month_state is not None and (month_state is not own or not found):
                    targets.append(month_state)  # every other generation counts it too (own: its reservation is gone)
            if pkey not in self._pending:  # a new month: the tenant's older months' entries can go
                keep = {res.month, window_id("month")}
                for old in [p for p in self._pending if p[0] == res.tenant_id and p[1] not in keep]:
                    del self._pending[old]
            pending = self._pending.setdefault(pkey, {"seq": 0, "e": {}})
            pending["seq"] += 1
            pending["e"][res.request_id] = [res.key_id, tokens, cost, pending["seq"], None]
        for month_state in targets:
            c = month_state["c"]
            c["mu"] += cost
            if res.key_id is not None:
                c[f"k{res.key_id}:mu"] = c.get(f"k{res.key_id}:mu", 0) + cost
                c[f"k{res.key_id}:nu"] = c.get(f"k{res.key_id}:nu", 0) + tokens

    async def release(self, reservation: BudgetReservation | None) -> None:
        """Give a reservation back whole (the tenant's admission refused the request after this one admitted it)."""
        if reservation is None:
            return
        with self._lock:
            if (reservation.key_id, "rpm") in self._buckets:
                level, ts = self._buckets[(reservation.key_id, "rpm")]
                self._buckets[(reservation.key_id, "rpm")] = (level + 1, ts)
            self._settle_locked(reservation, 0, 0, released=True)

    def recorded(self, reservation: BudgetReservation | None):
        """The request's ledger record is in the database: its pending entry goes (after PENDING_GRACE_MS)."""
        if reservation is None:
            return None
        reservation.recorded = True
        with self._lock:
            now = self._now_ms()
            pkey = (reservation.tenant_id, reservation.month)
            entry = self._pending.get(pkey, {"e": {}})["e"].get(reservation.request_id)
            if entry is not None and entry[4] is None:
                entry[4] = now
                self._recorded.append((now, pkey, reservation.request_id))
            self._prune(now)
        return None

    async def snapshot(self, limits: BudgetLimits) -> dict[str, int]:
        """The month's counters of the current generation (console and tests): µ¢ and tokens, used and reserved."""
        state = self._months.get((limits.tenant_id, window_id("month"), limits.generation))
        return dict(state["c"]) if state else {}

    def pending(self, tenant_id: int, month: str | None = None) -> dict[str, tuple]:
        """The month's pending requests (tests): rid -> (key, tokens, µ¢)."""
        with self._lock:
            state = self._pending.get((tenant_id, month or window_id("month")), {"e": {}})
            return {rid: tuple(e[:3]) for rid, e in state["e"].items()}


# ---- Redis, shared by every gateway process ------------------------------------------------------

ADMIT_LUA = """
local hash, cur, rpmk, tpmk, exp = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local rid, gen, kid = ARGV[1], ARGV[2], ARGV[3]
local n, cost, hard = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local krpm, ktpm, ktok, kmoney = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local counted, ttl, res_ttl = ARGV[11] == '1', tonumber(ARGV[12]), tonumber(ARGV[13])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function bucket(k, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', k, 'v', 'ts')
  local level, ts = tonumber(v[1]) or cap, tonumber(v[2]) or now
  return math.min(cap, level + math.max(0, now - ts) * cap / 60000)
end
local r, tk = bucket(rpmk, krpm), bucket(tpmk, ktpm)
-- The key's buckets' levels go back as strings (a Lua number in a reply is cut to an integer).
if krpm > 0 and r < 1 then return {2, math.ceil((1 - r) * 60000 / krpm), tostring(r), tostring(tk)} end
if ktpm > 0 and n > ktpm then return {4, 60000, tostring(r), tostring(tk)} end
if ktpm > 0 and tk < n then return {3, math.ceil((n - tk) * 60000 / ktpm), tostring(r), tostring(tk)} end
if counted then
  if not redis.call('HGET', hash, 'seeded') then return {9, 0} end
  for _, old in ipairs(redis.call('ZRANGEBYSCORE', exp, 0, now - res_ttl)) do
    local e = redis.call('HGET', hash, 'r:' .. old)
    if e then
      local k, rn, rc = string.match(e, '^([^,]*),(%d+),(%d+),')
      redis.call('HINCRBY', hash, 'mr', -tonumber(rc))
      if k ~= '' then redis.call('HINCRBY', hash, 'k' .. k .. ':mr', -tonumber(rc)); redis.call('HINCRBY', hash, 'k' .. k .. ':nr', -tonumber(rn)) end
      redis.call('HDEL', hash, 'r:' .. old)
    end
    redis.call('ZREM', exp, old)
  end
  local function num(f) return tonumber(redis.call('HGET', hash, f) or '0') end
  if kmoney > 0 and num('k' .. kid .. ':mu') + num('k' .. kid .. ':mr') + cost > kmoney then return {11, 0} end
  if ktok > 0 and num('k' .. kid .. ':nu') + num('k' .. kid .. ':nr') + n > ktok then return {10, 0} end
  if hard > 0 and num('mu') + num('mr') + cost > hard then return {12, 0} end
  redis.call('HINCRBY', hash, 'mr', cost)
  if kid ~= '' then redis.call('HINCRBY', hash, 'k' .. kid .. ':mr', cost); redis.call('HINCRBY', hash, 'k' .. kid .. ':nr', n) end
  redis.call('HSET', hash, 'r:' .. rid, kid .. ',' .. n .. ',' .. cost .. ',' .. now)
  redis.call('ZADD', exp, now, rid)
  redis.call('EXPIRE', hash, ttl)
  redis.call('EXPIRE', exp, ttl)
end
if krpm > 0 then redis.call('HSET', rpmk, 'v', r - 1, 'ts', now); redis.call('PEXPIRE', rpmk, 120000) end
if ktpm > 0 then redis.call('HSET', tpmk, 'v', tk - n, 'ts', now); redis.call('PEXPIRE', tpmk, 120000) end
return {0, now}
"""

# The seed's second half: the ledger's read with the listed pending requests it does not hold (ARGV 3, 5 and after),
# plus the requests settled since the listing (pending entries with a sequence number past ARGV[4]).
SEED_LUA = """
local hash, cur, pend, gens = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('HGET', hash, 'seeded') then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local listed, mu, keyed = tonumber(ARGV[4]), tonumber(ARGV[3]), {}
for i = 5, #ARGV, 3 do keyed[ARGV[i]] = {tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])} end
local recs = redis.call('HGETALL', pend)
for i = 1, #recs, 2 do
  if recs[i] ~= '_seq' then
    local k, n, c, q = string.match(recs[i + 1], '^([^,]*),(%d+),(%d+),(%d+)')
    if tonumber(q) > listed then
      mu = mu + tonumber(c)
      if keyed[k] then keyed[k][1] = keyed[k][1] + tonumber(c); keyed[k][2] = keyed[k][2] + tonumber(n) end
    end
  end
end
redis.call('HSET', hash, 'mu', string.format('%.0f', mu), 'mr', 0, 'seeded', now)
for k, v in pairs(keyed) do
  redis.call('HSET', hash, 'k' .. k .. ':mu', string.format('%.0f', v[1]), 'k' .. k .. ':nu', string.format('%.0f', v[2]))
end
redis.call('EXPIRE', hash, tonumber(ARGV[2]))
redis.call('SET', cur, ARGV[1], 'EX', tonumber(ARGV[2]))
redis.call('SADD', gens, ARGV[1])
redis.call('EXPIRE', gens, tonumber(ARGV[2]))
return 1
"""

# The seed's listing, taken once its ledger read has begun: {now ms, sequence number, rid, entry, ...}, after
# forgetting the entries recorded more than ARGV[1] ms ago.
PENDING_LUA = """
local pend, rec = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', rec, 0, now - tonumber(ARGV[1]))
for _, rid in ipairs(old) do redis.call('HDEL', pend, rid) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', rec, 0, now - tonumber(ARGV[1])) end
local out = {tostring(now), redis.call('HGET', pend, '_seq') or '0'}
local recs = redis.call('HGETALL', pend)
for i = 1, #recs, 2 do
  if recs[i] ~= '_seq' then out[#out + 1] = recs[i]; out[#out + 1] = recs[i + 1] end
end
return out
"""

# Requests whose ledger records are in the database (ARGV 3 and after): their pending entries are forgotten once
# recorded ARGV[1] ms ago.
RECORDED_LUA = """
local pend, rec, ttl = KEYS[1], KEYS[2], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 3, #ARGV do
  if redis.call('HEXISTS', pend, ARGV[i]) == 1 then redis.call('ZADD', rec, 'NX', now, ARGV[i]) end
end
local old = redis.call('ZRANGEBYSCORE', rec, 0, now - tonumber(ARGV[1]))
for _, rid in ipairs(old) do redis.call('HDEL', pend, rid) end
if #old > 0 then redis.call('ZREMRANGEBYSCORE', rec, 0, now - tonumber(ARGV[1])) end
redis.call('EXPIRE', rec, ttl)
return #old
"""

SETTLE_LUA = """
local hash, tpmk, pend, gens, prefix = KEYS[1], KEYS[3], KEYS[4], KEYS[5], ARGV[9]
local rid, kid, used_n, used_c = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local res_n, ktpm, admitted, counted = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local recorded, released, ttl = ARGV[10] == '1', ARGV[11] == '1', tonumber(ARGV[12])
if redis.call('HEXISTS', pend, rid) == 1 then return 0 end
if ktpm > 0 and redis.call('EXISTS', tpmk) == 1 then
  local level = tonumber(redis.call('HGET', tpmk, 'v')) or ktpm
  redis.call('HSET', tpmk, 'v', math.min(ktpm, level + res_n - used_n))
end
local function add(h)
  redis.call('HINCRBY', h, 'mu', used_c)
  if kid ~= '' then redis.call('HINCRBY', h, 'k' .. kid .. ':mu', used_c); redis.call('HINCRBY', h, 'k' .. kid .. ':nu', used_n) end
end
local e = counted and redis.call('HGET', hash, 'r:' .. rid)
local found = false
if e then
  local k, rn, rc = string.match(e, '^([^,]*),(%d+),(%d+),')
  redis.call('HINCRBY', hash, 'mr', -tonumber(rc))
  if k ~= '' then redis.call('HINCRBY', hash, 'k' .. k .. ':mr', -tonumber(rc)); redis.call('HINCRBY', hash, 'k' .. k .. ':nr', -tonumber(rn)) end
  redis.call('HDEL', hash, 'r:' .. rid)
  redis.call('ZREM', hash .. ':exp', rid)
  add(hash)
  found = true
end
if recorded or released then return found and 1 or 2 end
-- Every other seeded generation of the month counts it too (each was seeded before this settle, so neither its read
-- nor its pending list held the request); its own too if its reservation is gone (expired, or lost with Redis).
for _, g in ipairs(redis.call('SMEMBERS', gens)) do
  local h = prefix .. g
  if (h ~= hash or not found) and redis.call('HEXISTS', h, 'seeded') == 1 then add(h) end
end
local q = redis.call('HINCRBY', pend, '_seq', 1)
redis.call('HSET', pend, rid, kid .. ',' .. ARGV[3] .. ',' .. ARGV[4] .. ',' .. q)
if q == 1 then redis.call('EXPIRE', pend, ttl) end  -- created now: it goes 35 days after the month's first settle
return found and 1 or 2
"""


class RedisBudgets:
    """The budgets of every gateway process, in Redis (one script per admission and per settle). Redis unreachable:
    requests that need a month's counter are refused (503 `limits_unavailable`, fail closed as hard quotas are); a
    key's requests/min and tokens/min alone fall back to this process's buckets."""

    backend_name = "redis"

    def __init__(self, url: str):
        self.url = url
        self.fallback = LocalBudgets()
        self._clients: dict[int, object] = {}
        self._recorded: dict[int, tuple[list, asyncio.Future]] = {}  # per event loop: the batch of `recorded` waiting
        self._flushes: set = set()  # their tasks, kept alive until done

    def _client(self):
        loop_id = id(asyncio.get_running_loop())
        client = self._clients.get(loop_id)
        if client is None:
            client = redis_clients.async_client(self.url, max_connections=64)
            client._budget_scripts = {name: client.register_script(src) for name, src in
                                      (("admit", ADMIT_LUA), ("seed", SEED_LUA), ("settle", SETTLE_LUA),
                                       ("recorded", RECORDED_LUA))}
            self._clients[loop_id] = client
            keeper_for(self.url).add_pool(client)
        return client

    @staticmethod
    def _keys(tenant_id: int, month: str, generation: str, key_id) -> tuple[str, str, str, str, str]:
        p = f"mtl:{{t{tenant_id}}}:bud:"
        hash_ = f"{p}{month}:{generation}"
        return hash_, f"{p}{month}:cur", f"{p}k{key_id}:rpm", f"{p}k{key_id}:tpm", hash_ + ":exp"

    @staticmethod
    def _pending_keys(tenant_id: int, month: str) -> list[str]:
        """The month's pending set (rid -> "key,tokens,µ¢,seq", and its `_seq`) and when each was recorded (a zset)."""
        p = f"mtl:{{t{tenant_id}}}:bud:{month}:pend"
        return [p, p + ":rec"]

    async def _seed(self, client, limits: BudgetLimits, month: str, keys) -> None:
        """Seed the generation's counters (LocalBudgets._seed, in Redis): the ledger's read, the pending requests it does
        not hold, and those settled since the listing (added by the seed's script). Left unseeded if the listing came
        more than PENDING_GRACE_MS after the read began (the admission seeds again)."""
        pend = self._pending_keys(limits.tenant_id, month)
        begun = await client.time()
        begun_ms = int(begun[0]) * 1000 + int(begun[1]) // 1000
        lister = redis_clients.sync_client(self.url, decode_responses=True)
        listing: dict = {}

        def pending():  # on the loader's thread, inside its read of the ledger
            out = lister.eval(PENDING_LUA, 2, *pend, PENDING_GRACE_MS)
            entries = {}
            for rid, value in zip(out[2::2], out[3::2]):
                k, n, c, _ = _parse_pending(value)
                entries[rid] = (k, n, c)
            listing.update(at=int(out[0]), seq=int(out[1]), e=entries)
            return list(entries)

        tenant_used, by_key, held = await _seed_usage(limits, month, pending)
        if not listing or listing["at"] - begun_ms > PENDING_GRACE_MS:
            return
        tenant_used, by_key = _seed_counters(limits, tenant_used, by_key, listing["e"], set(held))
        seed_args = [limits.generation, MONTH_TTL_S, tenant_used, listing["seq"]]
        for key_id, (money, toks) in by_key.items():
            seed_args += [key_id, money, toks]
        await client._budget_scripts["seed"](keys=[keys[0], keys[1], pend[0], keys[1].rsplit(":", 1)[0] + ":gens"], args=seed_args)

    async def admit(self, limits: BudgetLimits, *, request_id: str, tokens: int, microcents: int) -> BudgetDecision:
        month = window_id("month")
        keys = self._keys(limits.tenant_id, month, limits.generation, limits.key_id)
        args = [request_id, limits.generation, "" if limits.key_id is None else limits.key_id, tokens, microcents,
                limits.tenant_hard_microcents, limits.key_requests_per_minute, limits.key_tokens_per_minute,
                limits.key_month_tokens, limits.key_month_microcents, 1 if limits.counted else 0, MONTH_TTL_S, RESERVATION_TTL_MS]
        keeper = keeper_for(self.url)
        try:
            if not keeper.up:  # marked down by any of the process's Redis users; its probe says when it is back
                raise ConnectionError("Redis is unreachable (probed in the background)")
            client = self._client()
            for _ in range(SEED_ATTEMPTS + 1):
                res = await client._budget_scripts["admit"](keys=list(keys), args=args)
                if res[0] != NEED_SEED:
                    break
                try:
                    await self._seed(client, limits, month, keys)
                except DatabaseError:
                    return _unavailable("The usage ledger cannot be read right now, so budgets cannot be checked. Retry in "
                                        "a few seconds.", "usage_unavailable")
            else:
                return _unavailable("Budgets could not be checked. Retry in a few seconds.", "limits_unavailable")
        except redis_errors() as exc:
            if keeper.up:
                keeper.mark_down(exc)
            raise_if_cancelled()
            if limits.counted:
                return _unavailable("The rate-limit service is unavailable, so requests under a budget are refused. Retry "
                                    "in a few seconds.", "limits_unavailable")
            return await self.fallback.admit(limits, request_id=request_id, tokens=tokens, microcents=microcents)
        levels = (float(res[2]), float(res[3])) if len(res) > 3 else None  # the key's buckets (its rate refusals)
        if res[0] != OK:
            return _refusal(int(res[0]), limits, int(res[1]), tokens, levels)
        return BudgetDecision(True, BudgetReservation(limits.tenant_id, limits.key_id, request_id, month, limits.generation,
                                                      tokens, microcents, limits.counted, limits.key_tokens_per_minute,
                                                      int(res[1]), self.backend_name))

    async def settle(self, reservation: BudgetReservation | None, *, tokens: int, microcents: int, released: bool = False) -> None:
        if reservation is None:
            return
        if reservation.backend == "local":
            return await self.fallback.settle(reservation, tokens=tokens, microcents=microcents)
        r = reservation
        keys = self._keys(r.tenant_id, r.month, r.generation, r.key_id)
        pend = self._pending_keys(r.tenant_id, r.month)[0]
        prefix = keys[0].rsplit(":", 1)[0] + ":"
        gens = prefix + "gens"

        async def settle_in_redis():  # its arguments when it runs: a retried settle may find its record written since
            args = [r.request_id, "" if r.key_id is None else r.key_id, tokens, microcents, r.tokens, r.key_tpm, r.admitted_ms,
                    1 if r.counted else 0, prefix, 1 if r.recorded else 0, 1 if released else 0, MONTH_TTL_S]
            await self._client()._budget_scripts["settle"](keys=[keys[0], keys[1], keys[3], pend, gens], args=args)

        # Now, or queued and retried by the process's Redis keeper until Redis answers (the settle is idempotent: a
        # second run finds its request in the pending set). Never waits for Redis on the request path.
        await keeper_for(self.url).run_or_defer(settle_in_redis, None, what=f"budget settle {reservation.request_id}")

    async def release(self, reservation: BudgetReservation | None) -> None:
        """Give back a reservation whole (the tenant's admission refused the request): nothing was used."""
        if reservation is None:
            return
        if reservation.backend == "local":
            return await self.fallback.release(reservation)
        await self.settle(reservation, tokens=0, microcents=0, released=True)
        if reservation.key_id is not None:
            _, _, rpmk, _, _ = self._keys(reservation.tenant_id, reservation.month, reservation.generation, reservation.key_id)
            try:
                await self._client().hincrbyfloat(rpmk, "v", 1)  # its requests/min token back (capped when read)
            except redis_errors() as exc:
                keeper_for(self.url).mark_down(exc)

    def recorded(self, reservation: BudgetReservation | None):
        """The request's ledger record is in the database: its pending entry goes (after PENDING_GRACE_MS). Batched: one
        round trip for what the event loop's tasks recorded meanwhile, never awaited on the request path. Returns the
        batch's future (done once Redis has it, or has failed to: the entry then stays until the month is over, which
        counts nothing twice)."""
        if reservation is None:
            return None
        if reservation.backend == "local":
            return self.fallback.recorded(reservation)
        reservation.recorded = True
        loop = asyncio.get_running_loop()
        batch = self._recorded.get(id(loop))
        if batch is None:
            batch = self._recorded[id(loop)] = ([], loop.create_future())
            loop.call_soon(self._start_flush, loop)
        batch[0].append((reservation.tenant_id, reservation.month, reservation.request_id))
        return batch[1]

    def _start_flush(self, loop) -> None:
        task = loop.create_task(self._flush_recorded(id(loop)))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush_recorded(self, loop_id: int) -> None:
        items, done = self._recorded.pop(loop_id)
        groups: dict[tuple, list] = {}
        for tenant_id, month, rid in items:
            groups.setdefault((tenant_id, month), []).append(rid)
        try:
            if keeper_for(self.url).up:
                client = self._client()
                pipe = client.pipeline(transaction=False)
                for (tenant_id, month), rids in groups.items():
                    await client._budget_scripts["recorded"](keys=self._pending_keys(tenant_id, month),
                                                             args=[PENDING_GRACE_MS, MONTH_TTL_S, *rids], client=pipe)
                await pipe.execute()
        except redis_errors() as exc:
            log.info("budgets: %d recorded requests not marked in Redis (%s); their pending entries stay for the month",
                     len(items), exc)
        except Exception:
            log.exception("budgets: marking %d recorded requests failed", len(items))
        finally:
            if not done.done():
                done.set_result(None)

    async def pending(self, tenant_id: int, month: str | None = None) -> dict[str, tuple]:
        """The month's pending requests (tests): rid -> (key, tokens, µ¢)."""
        data = await self._client().hgetall(self._pending_keys(tenant_id, month or window_id("month"))[0])
        return {rid: _parse_pending(v)[:3] for rid, v in data.items() if rid != "_seq"}

    async def snapshot(self, limits: BudgetLimits) -> dict[str, int]:
        keys = self._keys(limits.tenant_id, window_id("month"), limits.generation, limits.key_id)
        data = await self._client().hgetall(keys[0])
        return {k: int(v) for k, v in data.items() if not k.startswith("r:") and k != "seeded"}


# ---- the journal: a request of a process that died is settled by the process that recovers it ----------------


def journal_fields(reservation: BudgetReservation | None, price) -> list | None:
    """What the request's journal line keeps of its budget reservation and price (serving/journal.py)."""
    if reservation is None:
        return None
    r = reservation
    prices = [str(price.input_price), str(price.output_price)] if price is not None else None
    return [r.month, r.generation, r.key_id, r.tokens, r.microcents, int(r.counted), r.key_tpm, r.admitted_ms, r.backend, prices]


def _recovered_reservation(fields: list, tenant_id: int, request_id: str) -> BudgetReservation | None:
    month, generation, key_id, tokens, microcents, counted, key_tpm, admitted_ms, backend, _ = fields
    if backend != "redis" or not isinstance(get_budgets(), RedisBudgets):
        return None  # a reservation of the dead process's own counters (the embedded default) died with it
    return BudgetReservation(tenant_id, key_id, request_id, month, generation, tokens, microcents, bool(counted), key_tpm,
                             admitted_ms, backend)


async def settle_recovered(fields: list, *, tenant_id: int, request_id: str, input_tokens: int, output_tokens: int,
                           recorded: bool = False) -> None:
    """Settle a dead process's request from its journal line, with the figures of its ledger record (an interrupted
    request is billed). `recorded`: the dead process had written its record (then the settle counts it in its own
    counters only: a later generation's seed read it from the ledger)."""
    from types import SimpleNamespace

    reservation = _recovered_reservation(fields, tenant_id, request_id)
    if reservation is None:
        return
    reservation.recorded = recorded
    prices = fields[9]
    price = SimpleNamespace(input_price=Decimal(prices[0]), output_price=Decimal(prices[1])) if prices else None
    await get_budgets().settle(reservation, tokens=input_tokens + output_tokens,
                               microcents=request_cost_microcents(input_tokens, output_tokens, price))


async def recorded_recovered(fields: list, *, tenant_id: int, request_id: str) -> None:
    """A dead process's request's record is in the database now: its pending entry goes (RedisBudgets.recorded)."""
    reservation = _recovered_reservation(fields, tenant_id, request_id)
    if reservation is not None:
        done = get_budgets().recorded(reservation)
        if done is not None:
            await done


_budgets = None
_budgets_lock = threading.Lock()


def get_budgets():
    """The process's budgets service: Redis when REDIS_URL is set, else in-process."""
    global _budgets
    if _budgets is None:
        from django.conf import settings

        with _budgets_lock:
            if _budgets is None:
                _budgets = RedisBudgets(settings.REDIS_URL) if settings.REDIS_URL else LocalBudgets()
    return _budgets


def reset_budgets() -> None:
    global _budgets
    _budgets = None
