"""Shared fixtures.

``infra`` gives every integration test a Kafka bootstrap string and a Redis
URL. If ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL`` are both set, those
(external) endpoints are used and nothing is started; otherwise one embedded
tansu + valkey stack is started for the whole session and stopped at the end.
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

from ia.runtime.embedded import EmbeddedStack


@dataclass(frozen=True)
class Infra:
    kafka: str
    redis_url: str
    external: bool = False


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("REDIS_URL")
    if kafka and redis_url:
        yield Infra(kafka=kafka, redis_url=redis_url, external=True)
        return
    stack = EmbeddedStack(tmp_path_factory.mktemp("ia-infra"))
    stack.start()
    try:
        yield Infra(kafka=stack.kafka_bootstrap_servers, redis_url=stack.redis_url)
    finally:
        stack.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test, e.g. ``t1a2b3c4d``."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(infra: Infra) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(infra.redis_url, decode_responses=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
async def aredis(infra: Infra) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(infra.redis_url, decode_responses=False)
    try:
        yield client
    finally:
        await client.aclose()


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist (``make test`` runs two processes) the fault trials run one
    after another on one worker: each loads the machine on purpose, and two at once
    would measure each other.  The tests of ``test_ingest_e2e.py`` stay together and in
    order too: they share one module fixture (a broker, three ``ia`` processes,
    Prometheus and Alertmanager) that two workers would each start, and its last test
    pauses that broker.  Every other test is scheduled on its own.

    (``--dist loadgroup`` would say this with a marker, but pytest-xdist 3.8 cannot
    rename pytest 9's node ids, so its groups are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FaultTrialsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/test_faults"):
                return "fault-trials"
            if nodeid.startswith("tests/test_ingest_e2e.py"):
                return "tests/test_ingest_e2e.py"
            return nodeid

    return FaultTrialsTogether(config, log)
