"""The global kill switch: ``ia pause`` stops all automation, ``ia resume`` lets it run.

Guards read it through :class:`KillSwitchState` (one method, :meth:`info`);
:class:`KillSwitch` keeps it in Redis for workers, actuators and the CLI,
:class:`MemoryKillSwitch` in memory for replay and the policy tester.
"""

from __future__ import annotations

import json
import math
import time
from typing import Protocol

from ia.core.clock import now_ms
from ia.core.keys import Keys
from ia.decisions.guards.redis_store import text_of

KILL_SWITCH_REFRESH_S = 0.2


class KillSwitchState(Protocol):
    async def info(self) -> dict | None:
        """Who paused, when and why, or ``None`` when automation runs."""
        ...


class KillSwitch:
    """The global kill switch: ``ia pause`` sets ``{prefix}:paused``, ``ia resume`` clears it.

    :meth:`paused` is what hot paths call: it reads Redis at most every
    ``refresh_s`` (200 ms) and otherwise answers from its cache, so a pause is
    honoured within ``refresh_s`` plus the time one batch takes.  Workers
    turn every action decision into ``blocked`` (trace ``guard:kill_switch``);
    actuators refuse to execute (outcome ``blocked``).
    """

    def __init__(self, client, prefix: str = "ia", refresh_s: float = KILL_SWITCH_REFRESH_S
                 ) -> None:
        self.client = client
        self.key = Keys(prefix).kill_switch
        self.refresh_s = refresh_s
        self._checked = -math.inf
        self._info: dict | None = None

    async def paused(self) -> bool:
        return (await self.info()) is not None

    async def info(self) -> dict | None:
        """Who paused, when and why (cached), or ``None`` when automation runs."""
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            raw = await self.client.get(self.key)
            self._info = _pause_info(raw)
            self._checked = now
        return self._info

    async def pause(self, by: str = "", reason: str = "") -> dict:
        info = {"at": now_ms(), "by": by[:256], "reason": reason[:1024]}
        await self.client.set(self.key, json.dumps(info))
        self._checked = -math.inf
        return info

    async def resume(self) -> bool:
        self._checked = -math.inf
        return bool(await self.client.delete(self.key))


def _pause_info(raw: bytes | str | None) -> dict | None:
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        return info if isinstance(info, dict) else {"reason": str(info)}
    except ValueError:
        return {"reason": text_of(raw)}


class MemoryKillSwitch:
    """A kill switch in memory (replay, the policy tester): off unless told."""

    def __init__(self, paused: bool = False) -> None:
        self._info = {"at": 0, "by": "test", "reason": "paused"} if paused else None

    async def paused(self) -> bool:
        return self._info is not None

    async def info(self) -> dict | None:
        return self._info


def pause_reason(info: dict) -> str:
    by = f" by {info['by']}" if info.get("by") else ""
    why = f": {info['reason']}" if info.get("reason") else ""
    return f"automation paused{by}{why} (ia resume to continue)"
