"""What every command shares: settings from the environment, and one place that turns
library errors into messages and exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ia.core.errors import IaError
from ia.core.settings import Settings, load

F = TypeVar("F", bound=Callable[..., Any])


def settings(**overrides: object) -> Settings:
    """Settings from the environment, with the options the user gave on top."""
    return load(**overrides)


class IaClickError(click.ClickException):
    """An :class:`IaError` as click shows it: ``Error: message``, then its exit code."""

    def __init__(self, error: IaError) -> None:
        super().__init__(error.message)
        self.exit_code = error.exit_code


class IaGroup(click.Group):
    """The ``ia`` group: an :class:`IaError` from any command is shown as a message with
    its exit code, never as a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IaError as exc:
            raise IaClickError(exc) from exc


def cli_errors(command: F) -> F:
    """Show an :class:`IaError` raised by ``command`` as a message with its exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except IaError as exc:
            raise IaClickError(exc) from exc

    return wrapper  # type: ignore[return-value]
