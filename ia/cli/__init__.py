"""The ``ia`` command: one click group, every command registered here, once.

Each noun's commands live in their own module; their heavy imports happen inside the
commands, so ``ia --help`` stays fast. An :class:`ia.core.errors.IaError` from any
command is shown as ``Error: <message>`` with its exit code (:class:`IaGroup`).
"""

from __future__ import annotations

import click

from ia.cli import (
    approvals,
    audit,
    backtest,
    bench,
    config,
    features,
    feedback,
    ingest,
    killswitch,
    policy,
    replay,
    run,
    shadow,
    stack,
    windows,
)
from ia.cli.common import IaGroup


@click.group(cls=IaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="intelligent-automation")
def main() -> None:
    """intelligent-automation: closed-loop operations automation.

    Connects to KAFKA_BOOTSTRAP_SERVERS and REDIS_URL; `eval "$(ia up)"` starts
    an embedded broker and Redis and sets both.
    """


COMMANDS: list[click.Command] = [
    stack.up, stack.down, stack.status, config.config,
    run.worker, run.actuate, run.audit_writer, run.api, run.simulate, run.demo,
    killswitch.pause, killswitch.resume, policy.policy, approvals.approvals, audit.audit,
    replay.replay, replay.eval_group, replay.judge, backtest.backtest, backtest.record,
    shadow.shadow, feedback.feedback, features.features, bench.bench, ingest.ingest, ingest.receive,
    windows.windows,
]
for command in COMMANDS:
    main.add_command(command)

__all__ = ["main"]
