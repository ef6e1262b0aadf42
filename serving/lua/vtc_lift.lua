-- Lift a returning tenant's counter to the minimum of the backlogged ones: idle time banks no credit.
-- KEYS: 1 counters hash.  ARGV: 1 tenant, 2 floor
local c = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local floor = tonumber(ARGV[2])
if floor > c then
  redis.call('HSET', KEYS[1], ARGV[1], tostring(floor))
  return tostring(floor)
end
return tostring(c)
