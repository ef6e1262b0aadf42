-- Free a slot and correct its tenant's virtual counter (the real prompt and output replace the charge at dispatch),
-- in one step. KEYS: 1 slots zset, 2 counters hash. ARGV: 1 member ("<tenant>:<slot id>"), 2 tenant, 3 correction.
redis.call('ZREM', KEYS[1], ARGV[1])
local correction = tonumber(ARGV[3])
if correction ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3])
end
return 1
