-- First half of seeding a quota counter from the ledger: the requests the seed must leave out (still
-- reserved, or settled while the counter was missing: they are counted from Redis, not from the ledger).
-- KEYS: 1 quota hash, 2 its settled-while-unseeded hash, 3 reservations hash. ARGV: 1 window id.
-- Returns {1} already seeded, or {2, version, {rid, ...}}.
if redis.call('HGET', KEYS[1], 'seeded') == '1' then
  return {1}
end
local ids = {}
local recs = redis.call('HGETALL', KEYS[3])
for i = 1, #recs, 2 do
  local f, v = recs[i], recs[i + 1]
  if string.sub(f, 1, 1) ~= '_' then
    local _, w = string.match(v, '^(%d+)|([^|]+)|')
    if w == ARGV[1] then ids[#ids + 1] = f end
  end
end
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  ids[#ids + 1] = f
end
return {2, redis.call('HGET', KEYS[1], 'ver') or '0', ids}
