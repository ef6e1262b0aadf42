-- Second half of seeding: used = the ledger's sum (without the requests seed_begin listed) + what those
-- settled; reserved = the live reservations of the window. Refused (0) if a settle came in meanwhile.
-- KEYS: 1 quota hash, 2 its settled-while-unseeded hash, 3 reservations hash
-- ARGV: 1 window id, 2 version from seed_begin, 3 ledger sum, 4 window ttl s
if redis.call('HGET', KEYS[1], 'seeded') == '1' then
  return 1
end
if (redis.call('HGET', KEYS[1], 'ver') or '0') ~= ARGV[2] then
  return 0
end
local used = tonumber(ARGV[3])
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  used = used + tonumber(v)
end
local reserved = 0
local recs = redis.call('HGETALL', KEYS[3])
for i = 1, #recs, 2 do
  if string.sub(recs[i], 1, 1) ~= '_' then
    local n, w, _, s = string.match(recs[i + 1], '^(%d+)|([^|]+)|(%d)|?(%a?)$')
    if w == ARGV[1] and s ~= 'x' then reserved = reserved + tonumber(n) end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'used', used, 'reserved', reserved, 'seeded', 1, 'cut', now)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('DEL', KEYS[2])
return 1
