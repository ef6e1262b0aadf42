-- A request refused before admission (unreadable, invalid, past the model's context, ...) counts one against the
-- tenant's requests/min, as an admitted one does; a bucket already empty takes nothing (docs/limits.md).
-- Mirrors serving.admission.LocalAdmission.count_refused; the bucket is admit.lua's.
-- KEYS: 1 rpm bucket. ARGV: 1 rpm.
-- Returns {rpm left (floor), ms until the bucket holds a request again when it is empty now, else 0}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or rpm)
local ts = tonumber(redis.call('HGET', KEYS[1], 'ts') or now)
if ts > now then ts = now end
tokens = math.min(rpm, tokens + (now - ts) * rpm / 60000)
if tokens >= 1 then
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) * 60000 / rpm)
end
return {math.floor(tokens), wait}
