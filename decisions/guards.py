"""Guards that need shared state: the per-target cooldown.

A cooldown is claimed in *event time* (the triggering event's timestamp), so
live processing and replay of the same events make the same call.  The claim
records its owner (the decision id): a decision reprocessed after a crash
finds its own claim and keeps its action instead of blocking itself.
"""

from __future__ import annotations

from typing import Protocol

# Claims are garbage-collected by Redis a while after they stop mattering;
# the event-time check, not the TTL, decides whether a claim blocks.
CLAIM_GC_MS = 24 * 3600 * 1000

_CLAIM_LUA = """
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
"""


class ClaimStore(Protocol):
    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        """Claim ``key`` for ``owner`` from ``ts`` until ``until_ts``; return the holder."""
        ...


class MemoryClaimStore:
    def __init__(self) -> None:
        self._claims: dict[str, tuple[str, int]] = {}

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        held = self._claims.get(key)
        if held and (held[0] == owner or held[1] > ts):
            return held[0]
        self._claims[key] = (owner, until_ts)
        return owner


class RedisClaimStore:
    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_CLAIM_LUA)

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        holder = await self._script(keys=[f"{self.prefix}:claim:{key}"],
                                    args=[owner, ts, until_ts, CLAIM_GC_MS])
        return holder.decode() if isinstance(holder, bytes) else str(holder)
