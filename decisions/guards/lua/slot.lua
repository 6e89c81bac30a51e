-- Hold one of a group's in-flight slots (idempotent per member: a holder renews its lease).
-- KEYS[1] zset member -> lease end; KEYS[2] member's slot pointer.
-- ARGV: member, now, limit, lease_ms, group.  Returns {held (1/0), slots in use}.
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if (not held) and n >= tonumber(ARGV[3]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[4]) + 60000)
redis.call('SET', KEYS[2], ARGV[5], 'PX', 2 * tonumber(ARGV[4]) + 60000)
if held then return {1, n} end
return {1, n + 1}
