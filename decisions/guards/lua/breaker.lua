-- Check (and move) a circuit breaker: closed -> open -> half_open (one probe at a time).
-- KEYS[1] breaker hash, KEYS[2] failures zset.
-- ARGV: owner, now, failures, window_ms, open_ms, probe_timeout_ms
-- Returns {state, allowed (1/0), detail}.
local now = tonumber(ARGV[2])
local st = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probe', 'probe_at', 'closed_at')
local state = st[1] or 'closed'
local opened = tonumber(st[2] or '0')
if state == 'closed' then
  local since = math.max(now - tonumber(ARGV[4]), tonumber(st[5] or '0'))
  local n = redis.call('ZCOUNT', KEYS[2], '(' .. since, '+inf')
  if n < tonumber(ARGV[3]) then return {'closed', 1, ''} end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  state = 'open'
  opened = now
end
redis.call('PEXPIRE', KEYS[1], 604800000)
if state == 'open' then
  if now - opened < tonumber(ARGV[5]) then return {'open', 0, tostring(opened)} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', ARGV[1], 'probe_at', now)
  return {'half_open', 1, ARGV[1]}
end
if st[3] == ARGV[1] then return {'half_open', 1, ARGV[1]} end
if now - tonumber(st[4] or '0') >= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_at', now)
  return {'half_open', 1, ARGV[1]}
end
return {'half_open', 0, st[3] or ''}
