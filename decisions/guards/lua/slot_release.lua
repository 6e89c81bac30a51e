-- Free the slot a member holds.  KEYS[1] the member's slot pointer (its group).
-- ARGV: slots key prefix (the group is appended), member.
local group = redis.call('GET', KEYS[1])
if group then
  redis.call('ZREM', ARGV[1] .. group, ARGV[2])
  redis.call('DEL', KEYS[1])
end
return 0
