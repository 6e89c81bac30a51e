"""A policy that follows its file: reloaded on change, atomically.

A changed file is parsed and validated completely before it replaces the
current policy; a bad file is logged and the previous policy stays in force.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path

from decisions.policy import Policy, PolicyError

log = logging.getLogger("ia.policy")
CHECK_EVERY_S = 1.0


def builtin_policy_path(name: str) -> Path:
    return Path(str(resources.files("ia") / "policies" / f"{name}.yaml"))


class PolicySource:
    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else builtin_policy_path("observe")
        self._policy = Policy.from_file(self.path)
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self.reloads = 0
        self.rejected = 0

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return -1.0

    def current(self) -> Policy:
        now = time.monotonic()
        if now - self._checked >= CHECK_EVERY_S:
            self._checked = now
            mtime = self._stat()
            if mtime != self._mtime:
                self._mtime = mtime
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
