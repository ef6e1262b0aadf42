-- Extend the in-flight leases of a process's reservations of one tenant, and register again the ones Redis
-- does not hold: lost in a restart (their life is not the current one), or admitted by the per-process
-- fallback while Redis was unreachable (no life). One that was settled is never brought back.
-- KEYS: 1 in-flight zset, 2 reservations hash, 3 done hash
-- ARGV: 1 lease ms, 2 ttl s of a hash created here, then per reservation: rid, tokens, window, had_tpm, life
-- Returns {current life, registered rid, ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local prefix = string.sub(KEYS[2], 1, -4)
local life = redis.call('HGET', KEYS[2], '_life')
if not life then
  life = now .. '-renew'
  redis.call('HSET', KEYS[2], '_life', life)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
end
local out = {life}
for i = 3, #ARGV, 5 do
  local rid, n, w, tp, rl = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local q = prefix .. 'quota:' .. w
  local rec = redis.call('HGET', KEYS[2], rid)
  if rec then
    local rn, rw, rt, rs = string.match(rec, '^(%d+)|([^|]+)|(%d)|?(%a?)$')
    if rs == 'x' then  -- its lease ran out while Redis was away, yet the request still runs
      redis.call('HSET', KEYS[2], rid, rn .. '|' .. rw .. '|' .. rt .. '|l')
      if redis.call('HGET', q, 'seeded') == '1' then redis.call('HINCRBY', q, 'reserved', tonumber(rn)) end
    end
    redis.call('ZADD', KEYS[1], now + lease, rid)
  elseif redis.call('HEXISTS', KEYS[3], rid) == 0 and (rl == '' or rl ~= life) then
    redis.call('HSET', KEYS[2], rid, n .. '|' .. w .. '|' .. tp .. '|l')
    if redis.call('HGET', q, 'seeded') == '1' then redis.call('HINCRBY', q, 'reserved', tonumber(n)) end
    redis.call('ZADD', KEYS[1], now + lease, rid)
    out[#out + 1] = rid
  end
end
redis.call('PEXPIRE', KEYS[1], lease)
return out
