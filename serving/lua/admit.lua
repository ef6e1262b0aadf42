-- Admission of one request: concurrency, requests/min, tokens/min and the window quota, atomically.
-- Mirrors serving.admission.LocalAdmission._admit_locked; keep the two in step.
-- KEYS: 1 rpm bucket, 2 tpm bucket, 3 quota hash (window), 4 in-flight zset (rid -> lease expiry ms),
--       5 reservations hash (rid -> "tokens|window|had_tpm|state", state l = live, x = lease expired; `_life`),
--       6 the quota's settled-while-unseeded hash (rid -> tokens)
-- ARGV: 1 rid, 2 tokens, 3 rpm, 4 tpm, 5 quota, 6 hard(0/1), 7 max_conc, 8 throttle_tpm, 9 window_ttl_s, 10 lease_ms, 11 window_id
-- Returns {status, retry_ms, rpm left, tpm left, used + reserved, throttled, warn, tpm in force, life, rpm wait ms}; {9} = seed
-- the quota first. Every request counts one against requests/min, admitted or refused, except one refused because
-- requests/min is exhausted (docs/limits.md). rpm wait ms: when the bucket is empty after this request, the ms until
-- it holds one again (serving/gateway/refusals.py), else 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, n = ARGV[1], tonumber(ARGV[2])
local rpm, tpm, quota = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local hard, max_conc, throttle_tpm = ARGV[6] == '1', tonumber(ARGV[7]), tonumber(ARGV[8])
local window_ttl = tonumber(ARGV[9])
local prefix = string.sub(KEYS[5], 1, -4)  -- 'mtl:{t42}:' of 'mtl:{t42}:res'

-- The reservations' life: a new value means Redis lost the reservations made before (restart, flush).
local life = redis.call('HGET', KEYS[5], '_life')
if not life then
  life = now .. '-' .. rid
  redis.call('HSET', KEYS[5], '_life', life)
end

-- Leases that ran out (their process stopped renewing: it died, or Redis was away longer than a lease):
-- the reservation is released now; its usage is settled later, from that process's journal.
-- (Same as sweep.lua.)
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, r in ipairs(expired) do
  local rec = redis.call('HGET', KEYS[5], r)
  if rec then
    local rn, rw, rt, rs = string.match(rec, '^(%d+)|([^|]+)|(%d)|?(%a?)$')
    if rn and rs ~= 'x' then
      redis.call('HSET', KEYS[5], r, rn .. '|' .. rw .. '|' .. rt .. '|x')
      local q = prefix .. 'quota:' .. rw
      if redis.call('HGET', q, 'seeded') == '1' then
        redis.call('HINCRBY', q, 'reserved', -tonumber(rn))
      end
    end
  end
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
end

if redis.call('HGET', KEYS[3], 'seeded') ~= '1' then
  if quota > 0 then
    return {9}  -- the counter is missing (new window, or Redis lost it): seeded from the ledger first
  end
  -- No quota: the counter only informs; it starts from what was settled while it was missing.
  local add = 0
  local pre = redis.call('HVALS', KEYS[6])
  for _, v in ipairs(pre) do add = add + tonumber(v) end
  redis.call('HINCRBY', KEYS[3], 'used', add)
  redis.call('HSET', KEYS[3], 'seeded', 1, 'cut', now)
  redis.call('DEL', KEYS[6])
end
local used = tonumber(redis.call('HGET', KEYS[3], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[3], 'reserved') or '0')
local throttled = (not hard) and quota > 0 and used + reserved >= quota
local eff_tpm = tpm
if throttled then
  eff_tpm = throttle_tpm
end

local function bucket(key, cap)
  if cap <= 0 then return 0 end
  local tokens = tonumber(redis.call('HGET', key, 'tokens') or cap)
  local ts = tonumber(redis.call('HGET', key, 'ts') or now)
  if ts > now then ts = now end
  tokens = math.min(cap, tokens + (now - ts) * cap / 60000)
  return tokens
end
local r_tokens = bucket(KEYS[1], rpm)
local t_tokens = bucket(KEYS[2], eff_tpm)

local inflight = redis.call('ZCARD', KEYS[4])

local status, retry = 0, 0
if max_conc > 0 and inflight >= max_conc then
  status, retry = 1, 1000
elseif rpm > 0 and r_tokens < 1 then
  status, retry = 2, math.ceil((1 - r_tokens) * 60000 / rpm)
elseif eff_tpm > 0 and n > eff_tpm then
  status, retry = 4, 60000
elseif eff_tpm > 0 and t_tokens < n then
  status, retry = 3, math.ceil((n - t_tokens) * 60000 / eff_tpm)
elseif hard and quota > 0 and used + reserved + n > quota then
  if used + n <= quota then
    status, retry = 6, 1000  -- only in-flight reservations are in the way: they settle within seconds
  else
    status, retry = 5, 0
  end
end

local warn = 0
if rpm > 0 and status ~= 2 and r_tokens >= 1 then
  r_tokens = r_tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(r_tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if status == 0 then
  if eff_tpm > 0 then
    t_tokens = t_tokens - n
    redis.call('HSET', KEYS[2], 'tokens', tostring(t_tokens), 'ts', now)
    redis.call('PEXPIRE', KEYS[2], 120000)
  end
  reserved = reserved + n
  redis.call('HSET', KEYS[3], 'reserved', reserved)
  redis.call('EXPIRE', KEYS[3], window_ttl)
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[10]), rid)
  redis.call('PEXPIRE', KEYS[4], tonumber(ARGV[10]))
  redis.call('HSET', KEYS[5], rid, n .. '|' .. ARGV[11] .. '|' .. (eff_tpm > 0 and 1 or 0) .. '|l')
  redis.call('EXPIRE', KEYS[5], window_ttl)
  if quota > 0 and used + reserved >= quota * 0.8 and redis.call('HSETNX', KEYS[3], 'warned', 1) == 1 then
    warn = 1
  end
  inflight = inflight + 1
end
local rpm_wait = 0
if rpm > 0 and r_tokens < 1 then
  rpm_wait = math.ceil((1 - r_tokens) * 60000 / rpm)
end
return {status, retry, math.floor(r_tokens), math.floor(t_tokens), used + reserved, throttled and 1 or 0, warn, eff_tpm, life,
        rpm_wait}
