-- Admit a weighted member into a sliding window if the total stays within the limit.
-- KEYS[1] zset member "weight|decision" -> ts.  ARGV: member, ts, window, limit, weight, slack, ttl
-- Returns {admitted (1/0), total as a string}.
local ts = tonumber(ARGV[2])
local lo = ts - tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (lo - tonumber(ARGV[6])))
local used = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. lo, '+inf')) do
  used = used + tonumber(string.sub(m, 1, string.find(m, '|', 1, true) - 1))
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, tostring(used)} end
local w = tonumber(ARGV[5])
if used + w > tonumber(ARGV[4]) + 1e-9 then return {0, tostring(used)} end
redis.call('ZADD', KEYS[1], ts, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {1, tostring(used + w)}
