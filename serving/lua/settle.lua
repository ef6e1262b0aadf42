-- Settle a reservation exactly once: count the real tokens, refund the rest, free the concurrency slot.
-- KEYS: 1 tpm bucket, 2 in-flight zset, 3 reservations hash, 4 quota hash of the reservation's window
-- ARGV: 1 rid, 2 used tokens, 3 tpm cap in force at admission (for the refund's upper bound)
local rec = redis.call('HGET', KEYS[3], ARGV[1])
if not rec then
  return 0
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local n, _, had_tpm = string.match(rec, '^(%d+)|([^|]+)|(%d)$')
n = tonumber(n)
local used = tonumber(ARGV[2])
local qkey = KEYS[4]
if redis.call('EXISTS', qkey) == 1 then
  redis.call('HINCRBY', qkey, 'reserved', -n)
  redis.call('HINCRBY', qkey, 'used', used)
end
local cap = tonumber(ARGV[3])
if had_tpm == '1' and cap > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens'))
  tokens = math.min(cap, tokens + n - used)
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens))
end
return 1
