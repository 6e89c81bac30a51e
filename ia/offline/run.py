"""The one offline runner: history -> the worker's decision engine -> decisions.

Replay, backtest, ``ia eval nab`` and ``ia policy test`` all decide history
here: a fresh :class:`~ia.decisions.engine.DecisionEngine` (the code the worker
runs: features, detector, drift, policy, guards) with in-memory feature and
guard state and, by default, each event's own time as its clock.  Nothing is
read from or written to Kafka or Redis, so production state cannot be touched,
and the same history always gives the same decisions, byte for byte.  Events
are decided in batches of :data:`BATCH`, as the worker takes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from ia.decisions.detector import AdaptiveDetector, DetectorConfig
from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import MemoryGuardStore, MemoryKillSwitch
from ia.decisions.policy import Policy
from ia.features.store import MemoryFeatureStore
from ia.schemas.models import Decision, TelemetryEvent

BATCH = 500
Clock = Callable[[TelemetryEvent], int]


def event_time(ev: TelemetryEvent) -> int:
    """The clock of every offline run: an event is decided at its own time, so the
    answer does not depend on when (or how fast) history is replayed."""
    return ev.ts


@dataclass(frozen=True)
class Variant:
    """What is being run: a policy and the detector's settings."""

    name: str
    source: str
    policy: Policy
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    detector_overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "policy": self.policy.source,
                "policy_version": self.policy.version, "rules": len(self.policy.doc.rules),
                "detector": self.detector_overrides}


def observe_only() -> Variant:
    """The baseline variant: no rules (:meth:`Policy.observe_only`), default detector."""
    return Variant("observe-only", "<observe-only>", Policy.observe_only())


class Runner:
    """One engine on memory state: decides events in the order given.

    ``guards`` and ``kill_switch`` are the guard state to decide with (fresh and
    empty unless given; ``ia policy test`` passes its own to feed outcomes in).
    """

    def __init__(self, variant: Variant, *, pipeline_id: str = "main",
                 guards: MemoryGuardStore | None = None,
                 kill_switch: MemoryKillSwitch | None = None,
                 clock: Clock = event_time) -> None:
        policy = variant.policy
        self.guards = guards if guards is not None else MemoryGuardStore()
        self.kill_switch = kill_switch if kill_switch is not None else MemoryKillSwitch()
        self.engine = DecisionEngine(lambda: policy, MemoryFeatureStore(), self.guards,
                                     clock=clock, pipeline_id=pipeline_id,
                                     kill_switch=self.kill_switch,
                                     detector=AdaptiveDetector(variant.detector))

    async def decide(self, events: list[TelemetryEvent]) -> list[Decision]:
        """One decision per event, in order."""
        return await self.engine.process(events)


async def decide(history: Iterable[TelemetryEvent], variant: Variant, *,
                 pipeline_id: str = "main", guards: MemoryGuardStore | None = None,
                 clock: Clock = event_time) -> AsyncIterator[list[Decision]]:
    """Decisions for ``history`` in order, one list per batch of :data:`BATCH` events.

    ``pipeline_id`` ``main`` gives production's decision ids, so feedback given
    on production decisions names the replayed ones too.
    """
    runner = Runner(variant, pipeline_id=pipeline_id, guards=guards, clock=clock)
    for batch in _batches(history):
        yield await runner.decide(batch)


def _batches(events: Iterable[TelemetryEvent]) -> Iterator[list[TelemetryEvent]]:
    it = iter(events)
    while batch := list(islice(it, BATCH)):
        yield batch
