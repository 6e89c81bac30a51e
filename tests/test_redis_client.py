"""Every Redis client of ``ia`` comes from one factory (``ia.core.redis``) with the
timeouts, health checks and retries of ``RedisSettings``: a Redis that accepts
connections and never answers is a dependency error within the timeout, never a hang."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ia.core.redis import UNAVAILABLE, client, sync_client
from ia.core.settings import RedisSettings, Settings
from ia.decisions.service import RawRecord
from ia.schemas.models import TelemetryEvent
from ia.schemas.serde import encode
from ia.streams.worker import connect_worker

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("schemas", "features", "decisions", "actuators", "streams", "ia")


@pytest.fixture
def stalled_redis() -> Iterator[str]:
    """The URL of a server that accepts connections and never answers (a hung Redis)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def quick(url: str) -> RedisSettings:
    return RedisSettings(url=url, socket_timeout_s=0.3, connect_timeout_s=0.3, retries=0)


def test_the_settings_reach_the_connections() -> None:
    conf = RedisSettings(url="redis://h:6380/2", socket_timeout_s=1.5, connect_timeout_s=0.7,
                         health_check_interval_s=12, retries=4)
    for made in (client(conf), sync_client(conf, decode_responses=True)):
        conn = made.connection_pool.make_connection()
        assert (conn.host, conn.port, conn.db) == ("h", 6380, 2)
        assert (conn.socket_timeout, conn.socket_connect_timeout) == (1.5, 0.7)
        assert conn.health_check_interval == 12 and conn.retry._retries == 4
    assert Settings(_env={"IA_REDIS_SOCKET_TIMEOUT_S": "2.5", "IA_REDIS_RETRIES": "0"}).redis \
        .model_dump(include={"socket_timeout_s", "retries"}) == {"socket_timeout_s": 2.5,
                                                                  "retries": 0}


async def test_a_stalled_redis_is_a_dependency_error_within_the_timeout(stalled_redis) -> None:
    r = client(quick(stalled_redis))
    started = time.monotonic()
    with pytest.raises(UNAVAILABLE):
        await r.ping()
    assert time.monotonic() - started < 1.0
    await r.aclose()


def test_a_stalled_redis_times_out_a_blocking_client_too(stalled_redis) -> None:
    r = sync_client(quick(stalled_redis))
    started = time.monotonic()
    with pytest.raises(UNAVAILABLE):
        r.ping()
    assert time.monotonic() - started < 1.0
    r.close()


async def test_the_worker_on_a_stalled_redis_fails_its_batch_within_the_timeout(
        stalled_redis) -> None:
    settings = Settings(_env={}, kafka={"bootstrap_servers": "127.0.0.1:9"},
                        redis=quick(stalled_redis).model_dump())
    service = connect_worker(settings)
    event = TelemetryEvent(entity="svc-a", metric="latency", value=1.0, ts=1)
    started = time.monotonic()
    with pytest.raises(UNAVAILABLE):
        await service.on_telemetry([RawRecord(b"svc-a", encode(event, "json"), "t", 0, 0)])
    assert time.monotonic() - started < 3.0


def test_no_product_code_makes_a_redis_client_of_its_own() -> None:
    """A client made elsewhere would miss the timeouts (and hang with a hung Redis)."""
    made_here = ROOT / "ia" / "core" / "redis.py"
    offenders = [f"{path.relative_to(ROOT)}:{n}"
                 for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))
                 if path != made_here
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\bfrom_url\(|\bRedis\(", line)]
    assert offenders == []


@pytest.mark.integration
async def test_persistence_gap_names_what_can_lose_a_claim(infra, tmp_path: Path) -> None:
    from ia.core.redis import persistence_gap
    from ia.runtime.embedded import start_redis

    if not infra.external:
        shipped = client(infra.redis)  # the embedded stack's: fsynced before each reply
        try:
            assert await persistence_gap(shipped) is None
        finally:
            await shipped.aclose()
    svc = start_redis(tmp_path, durable=False, password=False)
    bare = client(svc.address)
    try:
        assert await persistence_gap(bare) == "appendonly no, appendfsync everysec"
    finally:
        await bare.aclose()
        svc.stop()
