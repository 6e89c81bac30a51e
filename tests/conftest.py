"""Shared fixtures.

``infra`` gives every integration test a Kafka bootstrap string and a Redis
URL with the file of its password. If ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``
are both set, those (external) endpoints are used and nothing is started (with
``IA_REDIS_PASSWORD_FILE`` if that is set); otherwise one embedded tansu + valkey
stack is started for the whole session and stopped at the end, with the secure
default of ``ia up``: Redis requires a password.  So every client a test makes goes
through :mod:`ia.core.redis` with ``infra.redis`` (the settings, password included),
and every process it starts gets ``infra.env`` (or ``tests.support.ia_env``).
Tests share that infrastructure, so name topics with ``topic_prefix`` and
Redis keys with a unique prefix as well.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from ia.core.redis import client, sync_client
from ia.core.settings import RedisSettings
from ia.runtime.embedded import EmbeddedStack


@dataclass(frozen=True)
class Infra:
    kafka: str
    redis_url: str
    external: bool = False
    # The file of the password Redis requires (None: an open external Redis).
    redis_password_file: str | None = None

    @property
    def redis(self) -> RedisSettings:
        """Settings of a client of this Redis, password included."""
        return RedisSettings(url=self.redis_url, password_file=self.redis_password_file)

    @property
    def env(self) -> dict[str, str]:
        """The endpoints as ``eval "$(ia up)"`` exports them, for processes a test starts."""
        return {"KAFKA_BOOTSTRAP_SERVERS": self.kafka, "REDIS_URL": self.redis_url,
                **({"IA_REDIS_PASSWORD_FILE": self.redis_password_file}
                   if self.redis_password_file else {})}


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("REDIS_URL")
    if kafka and redis_url:
        yield Infra(kafka=kafka, redis_url=redis_url, external=True,
                    redis_password_file=os.environ.get("IA_REDIS_PASSWORD_FILE") or None)
        return
    stack = EmbeddedStack(tmp_path_factory.mktemp("ia-infra"))
    stack.start()
    try:
        yield Infra(kafka=stack.kafka_bootstrap_servers, redis_url=stack.redis_url,
                    redis_password_file=stack.redis_password_file)
    finally:
        stack.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test, e.g. ``t1a2b3c4d``."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(infra: Infra) -> Iterator[redis.Redis]:
    r = sync_client(infra.redis)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
async def aredis(infra: Infra) -> AsyncIterator[aioredis.Redis]:
    r = client(infra.redis)
    try:
        yield r
    finally:
        await r.aclose()


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test`` runs two processes) each test module runs whole
    and in order on one worker: a module fixture (a broker and ``ia`` processes in
    ``test_ingest_e2e.py``, the governance stack whose later tests read what earlier
    ones approved) is started once and its tests see each other's effects.  The fault
    trials of every ``test_faults*`` module run one after another on one worker: each
    loads the machine on purpose, and two at once would measure each other.

    (``--dist loadscope`` would say the first half, but pytest-xdist 3.8 cannot
    rename pytest 9's node ids, so its scopes and groups are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesWholeFaultTrialsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/test_faults"):
                return "fault-trials"
            return nodeid.split("::", 1)[0]

    return ModulesWholeFaultTrialsTogether(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault trials first: under pytest-xdist they are the longest unit of work (one
    worker runs them all, a few minutes), so starting them first lets the other worker
    take the rest meanwhile instead of waiting for their tail."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_faults"))
