"""Wall-clock time in epoch milliseconds: the one definition every module uses.

Offline runs never call this; they pass event time explicitly, which is what makes
replay deterministic.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch, from the system clock."""
    return int(time.time() * 1000)
