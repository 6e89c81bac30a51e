-- Give back the half-open probe of breaker KEYS[1] if ARGV[1] holds it.
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'probe', '', 'probe_at', 0)
end
return 0
