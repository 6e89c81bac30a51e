"""Times on the command line: ISO 8601, epoch milliseconds, ``now`` or ``-2h``."""

from __future__ import annotations

import datetime as dt
import re

from ia.core import clock
from ia.core.errors import UsageError

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class TimeFormatError(UsageError, ValueError):
    """A time on the command line that cannot be read."""


def parse_time(text: str, now_ms: int | None = None) -> int:
    """Milliseconds since the epoch from ISO 8601 (naive means UTC), epoch ms,
    ``now``, or a time relative to now such as ``-15m``, ``-2h``, ``-1d``."""
    text = text.strip()
    now = clock.now_ms() if now_ms is None else now_ms
    if text == "now":
        return now
    if text.isdigit():
        return int(text)
    rel = _RELATIVE.match(text)
    if rel:
        return now - int(float(rel.group(1)) * _UNIT_S[rel.group(2)] * 1000)
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TimeFormatError(f"cannot read time {text!r}: use ISO 8601 (UTC unless it has "
                              "an offset), epoch milliseconds, 'now' or e.g. '-2h'") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return int(stamp.timestamp() * 1000)


def iso(ms: int) -> str:
    """``ms`` as ``YYYY-MM-DD HH:MM:SS`` UTC (for reports)."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
