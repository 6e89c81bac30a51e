"""What every command shares: settings from the environment, a Redis client, and the
one place that turns library errors into messages and exit codes."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from ia.core.errors import IaError
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
    """The ``ia`` group: an :class:`IaError` from any command is shown as a message with
    its exit code, never as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IaError as exc:
            raise IaClickError(exc) from exc
