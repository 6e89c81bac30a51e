"""A policy that follows its file: reloaded on change, atomically.

A changed file is parsed and validated completely before it replaces the
current policy; a bad file is logged and the previous policy stays in force.
A change is noticed by the file's modification time, size and inode, so an
editor's write-and-rename and a same-second rewrite are both seen; the file
is checked at most every ``CHECK_EVERY_S``.  Every decision records the
``policy_version`` (a content hash) it was made under.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from ia.decisions.policy import Policy, PolicyError

log = logging.getLogger("ia.policy")
CHECK_EVERY_S = 1.0


def builtin_policy_path(name: str) -> Path:
    return Path(str(resources.files("ia") / "policies" / f"{name}.yaml"))


class PolicySource:
    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else builtin_policy_path("observe")
        self._policy = Policy.from_file(self.path)
        self._sig = self._stat()
        self._checked = time.monotonic()
        self.reloads = 0
        self.rejected = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY_S:
            self._checked = now
            sig = self._stat()
            if sig != self._sig:
                self._sig = sig
                self._reload()
        return self._policy

    def _reload(self) -> None:
        try:
            self._policy = Policy.from_file(self.path)
            self.reloads += 1
            log.warning("policy reloaded from %s (version %s)", self.path, self._policy.version)
        except PolicyError as exc:
            self.rejected += 1
            log.error("policy change rejected, keeping version %s: %s", self._policy.version, exc)
