-- Capacity floor: would a group keep min_pct healthy with the target out of service?
-- KEYS[1] zset entity -> last sample ts; KEYS[2] zset entity -> last anomalous sample ts;
-- KEYS[3] zset "target|decision" -> hold end (admitted actions keep their target out).
-- ARGV: target, member, now, fresh_ms, anomaly_ms, member_ms, min_pct, lease_ms, reserve (1/0).
-- Returns {admitted (1/0), healthy members left, members}.
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[6])))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - tonumber(ARGV[5])))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local mine = ARGV[1] .. '|' .. ARGV[2]
local away = {[ARGV[1]] = true}
for _, m in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if m ~= mine then away[string.match(m, '^(.*)|[^|]*$')] = true end
end
local sick_before = now - tonumber(ARGV[5])
local healthy = 0
for _, e in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - tonumber(ARGV[4])), '+inf')) do
  if not away[e] then
    local s = redis.call('ZSCORE', KEYS[2], e)
    if (not s) or tonumber(s) <= sick_before then healthy = healthy + 1 end
  end
end
local members = redis.call('ZCARD', KEYS[1])
local admitted = members > 0 and healthy * 100 >= tonumber(ARGV[7]) * members - 1e-9
if admitted and ARGV[9] == '1' then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), mine)
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[8]) + 60000)
end
if admitted then return {1, healthy, members} end
return {0, healthy, members}
