"""Command-line options shared by replay, backtest, record and shadow (click only, so
``ia`` starts fast)."""

from __future__ import annotations

from collections.abc import Callable

import click


def _apply(f: Callable, options: list[Callable]) -> Callable:
    for opt in reversed(options):
        f = opt(f)
    return f


def range_options(f: Callable) -> Callable:
    """``--from/--to/--from-offsets/--to-offsets``: which part of a topic's history."""
    return _apply(f, [
        click.option("--from", "from_time", default=None,
                     help="First record: broker time, ISO 8601 (UTC), epoch ms or -2h."),
        click.option("--to", "to_time", default=None, help="Last record: broker time."),
        click.option("--from-offsets", default=None,
                     help="PARTITION:OFFSET[,...]: start there; unlisted partitions are "
                          "not read."),
        click.option("--to-offsets", default=None,
                     help="PARTITION:OFFSET[,...]: stop before these offsets."),
    ])


def history_options(f: Callable) -> Callable:
    """``--topic`` and its range: history read from Kafka (own consumer, no commits)."""
    return click.option("--topic", default=None,
                        help="Read this topic's history from Kafka (own consumer, no "
                             "consumer group, no commits).")(range_options(f))


def replay_output_options(f: Callable) -> Callable:
    return _apply(f, [
        click.option("--output-topic", default=None,
                     help="Publish decisions to this replay topic (never a *.decisions "
                          "topic an actuator reads)."),
        click.option("--full", is_flag=True,
                     help="Write whole Decision records (JSON) instead of compact lines."),
    ])
