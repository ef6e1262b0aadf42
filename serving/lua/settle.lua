-- Settle a request exactly once: count its real tokens, refund the rest of its reservation, free its
-- concurrency lease. docs/limits.md ("Faults") explains the cases.
-- KEYS: 1 tpm bucket, 2 in-flight zset, 3 reservations hash, 4 quota hash of the reservation's window,
--       5 that quota's settled-while-unseeded hash, 6 done hash (rids settled without a record: counted once)
-- ARGV: 1 rid, 2 used tokens, 3 tpm cap in force at admission, 4 mode: 'r' this process's reservation,
--       'l' admitted by the per-process fallback (Redis was unreachable), 'n' recovered from a dead process's
--       journal; 5 the reservation's life, 6 when its ledger record was written (epoch ms; 0 = not yet),
--       7 window ttl s
-- Returns 1 settled, 0 already settled, 2 already counted by the ledger seed, 3 counted without a record.
local rid, used, mode = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local qkey, ttl = KEYS[4], tonumber(ARGV[7])
local seeded = redis.call('HGET', qkey, 'seeded') == '1'

local function count()
  if seeded then
    redis.call('HINCRBY', qkey, 'used', used)
  else
    -- The counter is being re-seeded from the ledger: the seed leaves this request out and adds this figure.
    redis.call('HSET', KEYS[5], rid, used)
    redis.call('EXPIRE', KEYS[5], ttl)
    redis.call('HINCRBY', qkey, 'ver', 1)
    redis.call('EXPIRE', qkey, ttl)
  end
end

local rec = redis.call('HGET', KEYS[3], rid)
if rec then
  redis.call('HDEL', KEYS[3], rid)
  redis.call('ZREM', KEYS[2], rid)
  local n, _, had_tpm, state = string.match(rec, '^(%d+)|([^|]+)|(%d)|?(%a?)$')
  n = tonumber(n)
  if state ~= 'x' and seeded then
    redis.call('HINCRBY', qkey, 'reserved', -n)
  end
  count()
  if mode ~= 'r' then
    redis.call('HSET', KEYS[6], rid, 1)
    redis.call('EXPIRE', KEYS[6], 2 * 86400)
  end
  local cap = tonumber(ARGV[3])
  if state ~= 'x' and had_tpm == '1' and cap > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
    local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
    tokens = math.min(cap, tokens + n - used)
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens))
  end
  return 1
end

-- No record: settled before, or never in Redis (fallback), or lost with Redis.
redis.call('ZREM', KEYS[2], rid)
if redis.call('HEXISTS', KEYS[6], rid) == 1 then
  return 0
end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[3], '_life') == ARGV[5] then
  return 0  -- Redis has kept its reservations since this one was made there: it was settled
end
if seeded then
  local committed = tonumber(ARGV[6])
  if committed > 0 and committed <= tonumber(redis.call('HGET', qkey, 'cut') or '0') then
    return 2  -- the counter was seeded from the ledger after this request's record was written there
  end
end
redis.call('HSET', KEYS[6], rid, 1)
redis.call('EXPIRE', KEYS[6], 2 * 86400)
count()
return 3
