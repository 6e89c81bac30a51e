"""The embedded Redis requires a password (the default of ``ia up``, the demo and the test
stack): refused without it, nothing written without it, served with it, and the password
in neither a URL, the environment nor a command line."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import AuthenticationError, ResponseError

from ia.core.errors import ConfigError
from ia.core.redis import client, read_password, sync_client
from ia.core.settings import RedisSettings, Settings
from ia.runtime import embedded
from ia.runtime.embedded import ServiceInfo, StackInfo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceInfo]:
    svc = embedded.start_redis(tmp_path_factory.mktemp("redis-pw"))  # the default
    try:
        yield svc
    finally:
        svc.stop()


def _settings(svc: ServiceInfo) -> RedisSettings:
    return RedisSettings(url=svc.address, password_file=svc.password_file)


def test_a_client_without_the_password_is_refused(locked_redis: ServiceInfo) -> None:
    bare = redis.Redis.from_url(locked_redis.address)
    with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)NOAUTH|auth"):
        bare.ping()
    bare.close()
    wrong = redis.Redis.from_url(locked_redis.address, password="guess")
    with pytest.raises((AuthenticationError, ResponseError)):
        wrong.ping()
    wrong.close()


def test_the_factory_authenticates_with_the_password_file(locked_redis: ServiceInfo) -> None:
    r = sync_client(_settings(locked_redis))
    try:
        r.set(b"pw-test", b"1")
        assert r.get(b"pw-test") == b"1"
    finally:
        r.close()
    assert locked_redis.healthy()


async def test_the_async_factory_authenticates_too(locked_redis: ServiceInfo) -> None:
    r = client(_settings(locked_redis))
    try:
        assert await r.ping()
    finally:
        await r.aclose()


def test_the_password_stays_private(locked_redis: ServiceInfo) -> None:
    assert locked_redis.password_file is not None
    password_file = Path(locked_redis.password_file)
    secret = read_password(password_file)
    assert len(secret) >= 32
    for path in (password_file, password_file.with_name(embedded.REDIS_CONFIG)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret not in locked_redis.address
    assert secret not in (embedded._cmdline(locked_redis.pid) or "")
    broker = ServiceInfo("broker", 1, 9092, "tansu", "", 0.0)
    stack = StackInfo(password_file.parent, broker, locked_redis)
    env = stack.env()
    assert env["IA_REDIS_PASSWORD_FILE"] == str(password_file)
    assert not any(secret in line for line in stack.env_lines())
    assert ServiceInfo.from_dict("redis", locked_redis.to_dict()).password_file == \
        locked_redis.password_file


def test_the_password_file_is_a_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IA_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    assert Settings().redis.password_file == tmp_path / "pw"
    with pytest.raises(ConfigError, match="password file"):
        sync_client(Settings().redis.model_copy(update={"url": "redis://127.0.0.1:1/0"}))
    (tmp_path / "pw").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_password(tmp_path / "pw")
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_password(tmp_path / "pw") == "s3cret"


def test_a_client_without_the_password_writes_nothing(locked_redis: ServiceInfo) -> None:
    """S3: whoever reaches the port but lacks the password can neither plant a model, an
    approval nor a pause, nor read what is there."""
    owner = sync_client(_settings(locked_redis))
    owner.set(b"ia:appr:ap-1", b"requested")
    bare = redis.Redis.from_url(locked_redis.address)
    try:
        for command in (lambda: bare.hset(b"ia:model:feedback", b"blob", b"{}"),
                        lambda: bare.set(b"ia:paused", b"1"),
                        lambda: bare.set(b"ia:appr:ap-1", b"approved"),
                        lambda: bare.get(b"ia:appr:ap-1"),
                        lambda: bare.eval("return redis.call('FLUSHALL')", 0)):
            with pytest.raises((AuthenticationError, ResponseError), match=r"NOAUTH|authenticated"):
                command()
        assert owner.exists(b"ia:model:feedback", b"ia:paused") == 0
        assert owner.get(b"ia:appr:ap-1") == b"requested"
    finally:
        bare.close()
        owner.delete(b"ia:appr:ap-1")
        owner.close()


def test_the_password_is_kept_across_a_restart(tmp_path: Path) -> None:
    """A restarted Redis takes the same password, so running processes reconnect."""
    svc = embedded.start_redis(tmp_path)
    first = read_password(Path(str(svc.password_file)))
    svc.stop()
    svc = embedded.start_redis(tmp_path, port=svc.port)
    try:
        assert read_password(Path(str(svc.password_file))) == first
        assert sync_client(_settings(svc)).ping()
    finally:
        svc.stop()


def test_a_password_file_others_can_read_is_replaced(tmp_path: Path) -> None:
    (tmp_path / embedded.REDIS_PASSWORD_FILE).write_text("x" * 40 + "\n")
    (tmp_path / embedded.REDIS_PASSWORD_FILE).chmod(0o644)
    assert embedded._redis_password(tmp_path / embedded.REDIS_PASSWORD_FILE) != "x" * 40
    assert stat.S_IMODE((tmp_path / embedded.REDIS_PASSWORD_FILE).stat().st_mode) == 0o600


def test_an_open_redis_is_an_explicit_choice(tmp_path: Path) -> None:
    svc = embedded.start_redis(tmp_path, password=False)
    try:
        assert svc.password_file is None
        assert redis.Redis.from_url(svc.address).ping()
    finally:
        svc.stop()


def test_the_test_infra_requires_the_password_too(infra) -> None:
    """Every integration test runs against a Redis with a password (the secure default)."""
    if infra.external and not infra.redis_password_file:
        pytest.skip("external Redis without IA_REDIS_PASSWORD_FILE")
    with pytest.raises((AuthenticationError, ResponseError), match=r"NOAUTH|authenticated"):
        redis.Redis.from_url(infra.redis_url).ping()
    assert sync_client(infra.redis).ping()
    assert infra.env["IA_REDIS_PASSWORD_FILE"] == infra.redis_password_file


def test_ia_up_replaces_an_open_stack_when_a_password_is_asked_for(tmp_path: Path) -> None:
    """An open Redis left by ``ia up --no-redis-password`` (or an older ``ia``) is not
    silently reused by ``ia up``, whose default is a password."""
    run_dir = tmp_path / "run"
    try:
        open_stack = embedded.up(run_dir, redis_password=False)
        assert open_stack.redis.password_file is None
        locked = embedded.up(run_dir)
        assert not locked.reused and locked.redis.pid != open_stack.redis.pid
        assert locked.env()["IA_REDIS_PASSWORD_FILE"] == str(run_dir / "redis.password")
        with pytest.raises((AuthenticationError, ResponseError)):
            redis.Redis.from_url(locked.redis_url).ping()
        assert embedded.up(run_dir).reused  # the same ask again: reused
    finally:
        embedded.down(run_dir)
