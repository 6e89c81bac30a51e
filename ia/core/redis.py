"""Every Redis client of ``ia`` is made here, from :class:`~ia.core.settings.RedisSettings`.

A client made anywhere else would wait for a hung Redis for as long as the library's
defaults say (for ever, in older redis-py).  These clients give up on a command after
``socket_timeout_s`` (and on a connection after ``connect_timeout_s``), retry it a few
times, and check idle connections before use; what still fails is one of
:data:`UNAVAILABLE`, which the processes treat as a dependency that is away: the step
is retried, its input kept.

A bare ``redis://`` URL instead of the settings means the default timeouts and no
password (an open Redis).  A password is read from ``password_file``
(``IA_REDIS_PASSWORD_FILE``) each time a client is made, so it is in neither the URL,
the environment nor ``ia config``, and a rotated file is picked up by the next client;
with ``username`` (``IA_REDIS_USERNAME``) the client authenticates as that ACL user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    TimeoutError,
    TryAgainError,
)
from redis.retry import Retry

from ia.core.errors import ConfigError
from ia.core.settings import RedisSettings

Endpoint = RedisSettings | str

#: Errors that mean Redis cannot serve now -- away, too slow, still loading, out of
#: memory, a read-only replica -- not that the request is wrong.  A step failing with
#: one is retried for as long as it takes, and its records never become dead letters.
#: (``OSError`` covers a socket error that reaches ``ia`` unwrapped.)
UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError, TimeoutError, BusyLoadingError, OutOfMemoryError, ReadOnlyError,
    MasterDownError, ClusterDownError, TryAgainError, OSError)

# A retry of a command waits 50 ms, then 100 ms, ..., at most 1 s: a blip passes inside
# one step, a longer outage reaches the process's own retry.
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 1.0


def redis_settings(endpoint: Endpoint) -> RedisSettings:
    """``endpoint`` as settings: a bare URL gets the default timeouts."""
    return endpoint if isinstance(endpoint, RedisSettings) else RedisSettings(url=endpoint)


def client(endpoint: Endpoint, *, decode_responses: bool = False) -> aioredis.Redis:
    """An asyncio client (the processes: worker, actuator, audit writer, API, CLI)."""
    conf = redis_settings(endpoint)
    return aioredis.Redis.from_url(
        _url(conf), decode_responses=decode_responses,
        retry=AsyncRetry(_backoff(), conf.retries), **_options(conf))


def sync_client(endpoint: Endpoint, *, decode_responses: bool = False) -> redis.Redis:
    """A blocking client (health probes and benchmarks outside an event loop)."""
    conf = redis_settings(endpoint)
    return redis.Redis.from_url(
        _url(conf), decode_responses=decode_responses,
        retry=Retry(_backoff(), conf.retries), **_options(conf))


def _url(conf: RedisSettings) -> str:
    if not conf.url:
        raise ConfigError('REDIS_URL must be set (eval "$(ia up)" starts one)')
    return conf.url


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S)


def _options(conf: RedisSettings) -> dict[str, Any]:
    options: dict[str, Any] = {"socket_timeout": conf.socket_timeout_s,
                               "socket_connect_timeout": conf.connect_timeout_s,
                               "health_check_interval": conf.health_check_interval_s,
                               "retry_on_timeout": True}
    if conf.password_file is not None:
        options["password"] = read_password(conf.password_file)
    if conf.username is not None:
        if conf.password_file is None:
            raise ConfigError("IA_REDIS_USERNAME needs IA_REDIS_PASSWORD_FILE (the user's "
                              "password)")
        options["username"] = conf.username
    return options


def read_password(path: Path) -> str:
    """The password in ``path`` (one line; the trailing newline an editor adds is not
    part of it)."""
    try:
        password = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"Redis password file {path}: {exc.strerror}") from None
    if not password:
        raise ConfigError(f"Redis password file {path} is empty")
    return password


#: The persistence that keeps an action claim through any crash (what ``ia up`` and
#: compose ship; why: :data:`ia.runtime.embedded.REDIS_PERSISTENCE`).
CLAIM_SAFE_PERSISTENCE = {"appendonly": "yes", "appendfsync": "always"}


async def persistence_gap(redis: aioredis.Redis) -> str | None:
    """What in the Redis's persistence can lose an acknowledged write (an action claim),
    or None if nothing can -- or if the server does not say (``CONFIG`` refused, as
    managed services may)."""
    try:
        conf = await redis.config_get("append*")
    except redis_errors.ResponseError:
        return None
    conf = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                         else v) for k, v in conf.items()}
    gaps = [f"{name} {conf.get(name)}" for name, want in CLAIM_SAFE_PERSISTENCE.items()
            if conf.get(name) != want]
    return ", ".join(gaps) or None
