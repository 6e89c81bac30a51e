"""Who is acting when a person runs a command and does not say (``--by``)."""

from __future__ import annotations

import getpass
import socket


def default_by() -> str:
    """``user@host`` of this process, recorded with approvals, pauses and promotions."""
    return f"{getpass.getuser()}@{socket.gethostname()}"
