-- Take one of a pool's `capacity` slots for a tenant, unless another process has a tenant waiting that
-- goes first: a smaller virtual counter, or an equal one with fewer requests running (a lifted newcomer
-- beats a busy tenant it ties with). Slots are leases, so a crashed process's slots expire.
-- KEYS: 1 slots zset (member "<tenant>:<id>"), 2 counters hash, 3 waiting hash ("<proc>|<tenant>" -> beat ms)
-- ARGV: 1 slot id, 2 capacity, 3 lease ms, 4 tenant, 5 stale ms, 6 '1' to respect other processes' backlog (VTC), '0' (FCFS),
--       7 express slots: beyond the capacity, for a tenant with no slot held (the caller checks it has no other waiter),
--       8 the request's charge, added to the tenant's counter when the slot is taken (one step, one round trip)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local capacity = tonumber(ARGV[2])
if held >= capacity + tonumber(ARGV[7] or '0') then
  return 0
end
-- Requests running per tenant, counted from the slots only when a decision needs them (a full pool, or a tie with a
-- tenant waiting elsewhere): the common case, a pool with room and no backlog, reads no member (O(1), not O(slots)).
local running = nil
local function running_of(owner)
  if running == nil then
    running = {}
    for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      local o = string.match(m, '^([^:]+):')
      running[o] = (running[o] or 0) + 1
    end
  end
  return running[owner] or 0
end
local me = ARGV[4]
if held >= capacity and running_of(me) > 0 then
  return 0  -- full: an express slot is only for a tenant with nothing running
end
local my_c = tonumber(redis.call('HGET', KEYS[2], me) or '0')
local waiting = (ARGV[6] == '1') and redis.call('HGETALL', KEYS[3]) or {}
local stale = now - tonumber(ARGV[5])
for i = 1, #waiting, 2 do
  local member, beat = waiting[i], tonumber(waiting[i + 1])
  local other = string.match(member, '|(.+)$')
  if beat < stale then
    redis.call('HDEL', KEYS[3], member)
  elseif other ~= me then
    local c = tonumber(redis.call('HGET', KEYS[2], other) or '0')
    if c < my_c - 1e-9 or (math.abs(c - my_c) <= 1e-9 and running_of(other) < running_of(me)) then
      return 0
    end
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), me .. ':' .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
if ARGV[8] and tonumber(ARGV[8]) ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[2], me, ARGV[8])
end
return 1
