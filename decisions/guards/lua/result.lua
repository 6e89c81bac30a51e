-- Record one finished action for its breaker and the error budgets.
-- KEYS[1] breaker hash, KEYS[2] failures zset, then pairs of budget zsets: (record in,
-- remove from) -- a later result of the same decision replaces the earlier one.
-- ARGV: member, ok (1/0), at, retention_ms
local at = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
if ARGV[2] == '0' then
  redis.call('ZADD', KEYS[2], at, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', at - keep)
  redis.call('PEXPIRE', KEYS[2], keep)
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local st = redis.call('HMGET', KEYS[1], 'state', 'probe')
if st[1] == 'half_open' and st[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at', at)
  else
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', at)
  end
  redis.call('PEXPIRE', KEYS[1], keep)
end
for i = 3, #KEYS, 2 do
  redis.call('ZADD', KEYS[i], at, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', at - keep)
  redis.call('PEXPIRE', KEYS[i], keep)
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
end
return 0
