-- A process has requests of a tenant waiting: register it in the pool's backlog. If the tenant was not
-- backlogged anywhere, lift its counter to the smallest backlogged one less the cost of its first request,
-- so idle time banks no credit beyond going next once.
-- KEYS: 1 counters hash, 2 waiting hash ("<proc>|<tenant>" -> beat ms)
-- ARGV: 1 proc, 2 tenant, 3 stale ms, 4 cost of the tenant's first request
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[2]
local stale = now - tonumber(ARGV[3])
local waiting = redis.call('HGETALL', KEYS[2])
local floor, already = nil, false
for i = 1, #waiting, 2 do
  local member, beat = waiting[i], tonumber(waiting[i + 1])
  local other = string.match(member, '|(.+)$')
  if beat >= stale then
    if other == me then
      already = true
    else
      local c = tonumber(redis.call('HGET', KEYS[1], other) or '0')
      if floor == nil or c < floor then floor = c end
    end
  end
end
if not already and floor ~= nil then
  floor = floor - tonumber(ARGV[4])
  local c = tonumber(redis.call('HGET', KEYS[1], me) or '0')
  if floor > c then
    redis.call('HSET', KEYS[1], me, tostring(floor))
  end
end
redis.call('HSET', KEYS[2], ARGV[1] .. '|' .. me, now)
redis.call('PEXPIRE', KEYS[2], 3600000)
return 1
