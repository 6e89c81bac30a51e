-- Claim KEYS[1] ("owner|until_ts") for ARGV[1] unless another owner holds it past ARGV[2].
-- ARGV: owner, ts, until_ts, gc_ms.  Returns the holder.
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  local owner = string.sub(v, 1, sep - 1)
  local until_ts = tonumber(string.sub(v, sep + 1))
  if owner == ARGV[1] then return owner end
  if until_ts > tonumber(ARGV[2]) then return owner end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[4])
return ARGV[1]
