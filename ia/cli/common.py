"""What every command shares: settings from the environment, a Redis client, and the
one place that turns library errors into messages and exit codes."""

from __future__ import annotations

import datetime as dt
import errno
from typing import Any

import click

from ia.core.errors import ConfigError, IaError, Unavailable
from ia.core.settings import Settings, load


def settings(**overrides: object) -> Settings:
    """Settings from the environment, with the options the user gave on top."""
    return load(**overrides)


def redis_client(s: Settings) -> Any:
    """An asyncio Redis client for ``s.redis``; :class:`ConfigError` if no URL is set."""
    from ia.core.redis import client

    return client(s.redis)


def when(ms: int | None) -> str:
    """Epoch milliseconds as a UTC time for people, ``-`` for none."""
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class IaClickError(click.ClickException):
    """An :class:`IaError` as click shows it: ``Error: message``, then its exit code."""

    def __init__(self, error: IaError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code


class IaGroup(click.Group):
    """The ``ia`` group: an :class:`IaError` from any command, or a dependency that
    cannot be reached, is shown as one line with its exit code, never as a traceback.

    Exit codes: 1 an error, 2 bad usage, settings or policy, 3 a dependency (broker,
    Redis, a port, a file) unavailable.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IaError as exc:
            raise IaClickError(exc) from exc
        except Exception as exc:
            known = as_user_error(exc)
            if known is None:
                raise
            raise IaClickError(known) from exc


def as_user_error(exc: BaseException) -> IaError | None:
    """The user-facing form of an environment failure, or None for a real bug."""
    import redis.exceptions

    if isinstance(exc, redis.exceptions.AuthenticationError):
        return ConfigError(f"Redis refused the credentials: {exc}")
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable(f"cannot reach Redis: {str(exc).rstrip('.')}. Is it running? "
                           "Check REDIS_URL "
                           '(eval "$(ia up)" starts one)')
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException):
        return Unavailable(f"Kafka: {exc.args[0] if exc.args else exc}. Is the broker "
                           "running? Check KAFKA_BOOTSTRAP_SERVERS")
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Unavailable(f"address already in use: {exc.strerror}; choose another port "
                           "(e.g. --metrics-port, --port) or stop the process using it")
    if isinstance(exc, FileNotFoundError):
        return Unavailable(f"no such file: {exc.filename}")
    if isinstance(exc, PermissionError):
        return Unavailable(f"permission denied: {exc.filename}")
    return None
