-- Extend the leases of a process's slots of one pool (re-adding any that Redis lost).
-- KEYS: 1 slots zset. ARGV: 1 lease ms, 2.. members ("<tenant>:<slot id>").
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease)
return 1
