-- Release the reservations whose lease ran out (their process stopped renewing), as admit.lua does first.
-- KEYS: 1 in-flight zset, 2 reservations hash. Returns how many were released.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = string.sub(KEYS[2], 1, -4)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local released = 0
for _, r in ipairs(expired) do
  local rec = redis.call('HGET', KEYS[2], r)
  if rec then
    local rn, rw, rt, rs = string.match(rec, '^(%d+)|([^|]+)|(%d)|?(%a?)$')
    if rn and rs ~= 'x' then
      redis.call('HSET', KEYS[2], r, rn .. '|' .. rw .. '|' .. rt .. '|x')
      local q = prefix .. 'quota:' .. rw
      if redis.call('HGET', q, 'seeded') == '1' then
        redis.call('HINCRBY', q, 'reserved', -tonumber(rn))
      end
      released = released + 1
    end
  end
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
return released
