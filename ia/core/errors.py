"""One error tree for everything a user can get wrong or an environment can lack.

Library code raises an :class:`IaError` subclass and never decides how it is shown:
the CLI turns it into a message and ``exit_code`` (``ia.cli.common.IaGroup``) and
the approval API into ``http_status`` (``ia.governance.api``). Nothing is chosen by
matching the message text.
"""

from __future__ import annotations


class IaError(Exception):
    """An error whose text (``str(error)``) is meant for the user."""

    exit_code: int = 1
    http_status: int = 500


class ConfigError(IaError):
    """Settings that cannot work (a missing endpoint, an unreadable token file)."""

    exit_code = 2


class UsageError(IaError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = 2
    http_status = 400


class Unavailable(IaError):
    """A dependency (the broker, Redis, a port) cannot be reached or used right now."""

    exit_code = 3
    http_status = 503


class NotFound(IaError):
    """The thing asked for does not exist."""

    http_status = 404


class Forbidden(IaError):
    """The caller is known but may not do this (e.g. approve outside its approver group)."""

    http_status = 403


class Conflict(IaError):
    """The request is valid but too late or already answered."""

    http_status = 409
