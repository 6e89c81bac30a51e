"""Pydantic models of the topic contracts.

The Avro schemas in ``schemas/avro/*.avsc`` are the source of truth for field
names, types, defaults and nullability; ``tests/test_schemas.py`` checks that
these models agree with them.  Every model is immutable-by-convention and
validates on construction, so a bad record fails at the edge with a clear
error instead of deep inside the pipeline.
"""

from __future__ import annotations

import hashlib
import math
import re
from enum import StrEnum
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds for untrusted input: telemetry comes from anywhere, so every string
# and collection is capped to keep one hostile record from hurting a worker.
MAX_NAME_LEN = 256
# Checked per event on entity and metric names (a regex: the hot path).
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_LABELS = 64
MAX_LABEL_KEY_LEN = 128
MAX_LABEL_VALUE_LEN = 1024

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
# Avro ``long`` is 64-bit; an unbounded Python int would validate here and then
# fail to encode (or be silently wrapped) downstream.
Long = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
NonNegLong = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Contract(BaseModel):
    # allow_inf_nan=False: JSON cannot carry NaN/infinity (pydantic would write
    # null and the record would then fail to decode), so reject them up front.
    model_config = ConfigDict(
        extra="forbid", frozen=False, populate_by_name=True, allow_inf_nan=False
    )


class EventKind(StrEnum):
    metric = "metric"
    event = "event"


class TelemetryEvent(_Contract):
    """One observation from a producer (topic ``ia.telemetry``).

    ``kind="metric"`` carries a numeric sample; ``kind="event"`` marks a
    discrete change such as a deploy (``metric="deploy"``) or config change.
    """

    event_id: str | None = Field(default=None, max_length=MAX_NAME_LEN)
    entity: Name
    metric: Name
    value: float = 0.0
    ts: NonNegLong = Field(description="event time, milliseconds since the Unix epoch")
    labels: dict[str, str] = Field(default_factory=dict)
    kind: EventKind = EventKind.metric

    @field_validator("entity", "metric")
    @classmethod
    def _printable(cls, v: str) -> str:
        if _CONTROL_CHARS.search(v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number (NaN and infinity are rejected)")
        return v

    @field_validator("labels")
    @classmethod
    def _bounded_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_LABELS:
            raise ValueError(f"at most {MAX_LABELS} labels")
        for key, val in v.items():
            if not key or len(key) > MAX_LABEL_KEY_LEN:
                raise ValueError(f"label keys must be 1..{MAX_LABEL_KEY_LEN} characters")
            if len(val) > MAX_LABEL_VALUE_LEN:
                raise ValueError(f"label values must be at most {MAX_LABEL_VALUE_LEN} characters")
        return v

    @model_validator(mode="after")
    def _derive_event_id(self) -> TelemetryEvent:
        if not self.event_id:
            self.event_id = derive_event_id(self.entity, self.metric, self.ts, self.kind.value,
                                            self.value)
        return self


def derive_event_id(entity: str, metric: str, ts: int, kind: str, value: float) -> str:
    """A stable identity for events sent without one.

    Two byte-identical observations get the same id, which is what we want:
    they are duplicates and must produce one decision, not two.
    """
    raw = "\x1f".join((entity, metric, str(ts), kind, repr(float(value))))
    return "ev-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def derive_decision_id(event_id: str, pipeline: str = "main") -> str:
    """Deterministic from the input event, so reprocessing yields the same id."""
    return "dc-" + hashlib.sha256(f"{pipeline}\x1f{event_id}".encode()).hexdigest()[:32]


class ModelInfo(_Contract):
    id: str
    version: str


class DriftState(StrEnum):
    stable = "stable"
    warning = "warning"
    drift = "drift"


GUARD_PREFIX = "guard:"


class RuleTrace(_Contract):
    """One step of policy evaluation: which rule or guard, and why.

    On the wire a guard's step is named ``guard:<name>`` in ``rule``; read it through
    :attr:`guard` rather than by its spelling.

    >>> RuleTrace.of_guard("cooldown", "acted 30 s ago").guard
    'cooldown'
    >>> RuleTrace(rule="restart-on-leak", matched=True, reason="score 0.9").guard is None
    True
    """

    rule: str
    matched: bool
    reason: str

    @classmethod
    def of_guard(cls, guard: str, reason: str, matched: bool = True) -> RuleTrace:
        return cls(rule=GUARD_PREFIX + guard, matched=matched, reason=reason)

    @property
    def guard(self) -> str | None:
        """The guard's name if this step is a guard's, else None (a policy rule's)."""
        return self.rule[len(GUARD_PREFIX):] if self.rule.startswith(GUARD_PREFIX) else None


class Action(_Contract):
    type: Name
    target: Name
    params: dict[str, str] = Field(default_factory=dict)


class Mode(StrEnum):
    auto = "auto"
    needs_approval = "needs_approval"
    shadow = "shadow"
    blocked = "blocked"
    none = "none"
    # Tell humans what would be done; never executed (the autonomy ladder's lowest rung).
    notify = "notify"


class FeatureContribution(_Contract):
    """One feature and how much it weighed in a decision."""

    name: str
    value: float
    weight: float


class Explanation(_Contract):
    """Why the score and confidence are what they are, and which models said so."""

    summary: str = ""
    top_features: list[FeatureContribution] = Field(default_factory=list)
    models: list[ModelInfo] = Field(default_factory=list)
    drift_event: str | None = None
    p_useful: float | None = None


class Decision(_Contract):
    """What the pipeline decided about one telemetry event (topic ``ia.decisions``)."""

    decision_id: str
    correlation_id: str
    event_id: str
    entity: str
    metric: str
    value: float
    ts: Long
    decided_at: Long
    anomaly_score: Unit
    confidence: Unit
    features: dict[str, float] = Field(default_factory=dict)
    model: ModelInfo
    drift: DriftState = DriftState.stable
    rule_trace: list[RuleTrace] = Field(default_factory=list)
    action: Action | None = None
    mode: Mode = Mode.none
    policy_version: str = ""
    explanation: Explanation | None = None
    #: ``"<key id>:<hex HMAC-SHA256>"`` of the worker that decided it (ia.core.signing);
    #: an actuator executes no action decision without a valid one.
    signature: str | None = None

    @property
    def chosen_rule(self) -> str | None:
        """The policy rule that chose this decision's action: the last matched rule step."""
        for step in reversed(self.rule_trace):
            if step.matched and step.guard is None:
                return step.rule
        return None

    def interventions(self) -> list[RuleTrace]:
        """The guard steps that acted on this decision (blocked, downgraded or held it)."""
        return [step for step in self.rule_trace if step.matched and step.guard is not None]


class OutcomeStatus(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    skipped_duplicate = "skipped_duplicate"
    blocked = "blocked"
    timeout = "timeout"
    #: The actuator failed or died after the action may have started: its
    #: result is unknown, and it is not run again (at most once).
    interrupted = "interrupted"
    #: The decision was refused before anything else (unsigned, badly signed, unknown
    #: key, too old): nothing ran.  The reason is in the outcome's ``error``.
    rejected = "rejected"


class OutcomePhase(StrEnum):
    action = "action"
    verification = "verification"
    compensation = "compensation"


class ActionOutcome(_Contract):
    """The result of handling one action decision (topic ``ia.outcomes``).

    ``phase`` is ``action`` for the decision's own action (exactly one per
    delivery); an action that declares a verification later gets a
    ``verification`` outcome and, when that fails, a ``compensation`` outcome.
    """

    decision_id: str
    entity: str
    action_type: str
    target: str
    status: OutcomeStatus
    actuator: str
    started_at: Long
    finished_at: Long
    duration_ms: float = Field(ge=0.0)
    attempts: NonNegLong = 0
    detail: str = ""
    error: str | None = None
    phase: OutcomePhase = OutcomePhase.action
    approval_id: str | None = None
    approved_by: str | None = None


class FeedbackLabel(StrEnum):
    true_positive = "true_positive"
    false_positive = "false_positive"
    useful = "useful"
    harmful = "harmful"


class Feedback(_Contract):
    """A human or automated judgement of a decision (topic ``ia.feedback``)."""

    decision_id: str
    label: FeedbackLabel
    by: Name
    at: NonNegLong
    entity: str | None = None
    comment: str | None = Field(default=None, max_length=4096)
    #: ``"<key id>:<hex HMAC-SHA256>"`` with a feedback key (ia.core.signing); a worker
    #: counts no label without a valid one.
    signature: str | None = None


class ApprovalStatus(StrEnum):
    requested = "requested"
    approved = "approved"
    rejected = "rejected"
    expired = "expired"


class ExpiryPolicy(StrEnum):
    reject = "reject"
    approve = "approve"


class ApprovalEvent(_Contract):
    """One step of a human approval of a decision (topic ``ia.approvals``).

    ``requested`` when a ``needs_approval`` decision reaches the actuator, then
    exactly one of ``approved``, ``rejected`` or ``expired`` (with who, when
    and why).  A rule that needs ``required`` > 1 approvers announces each
    approval short of that as another ``requested`` event whose ``approvals``
    has grown (``by``/``via``/``at``/``reason`` are that answer's).  Events are
    derived from the stored approval, so a re-sent event is byte-identical:
    consumers deduplicate by ``(approval_id, status, approvals)``.  ``by`` is the
    authenticated identity of whoever answered (a token's name, or ``user@host``
    for the CLI), never a name the caller chose.
    """

    approval_id: str
    decision_id: str
    status: ApprovalStatus
    entity: str
    metric: str
    action: Action
    anomaly_score: Unit
    confidence: Unit
    requested_at: Long
    expires_at: Long
    on_expiry: ExpiryPolicy = ExpiryPolicy.reject
    rule: str = ""
    policy_version: str = ""
    by: str | None = Field(default=None, max_length=MAX_NAME_LEN)
    via: str | None = Field(default=None, max_length=MAX_NAME_LEN)
    at: int | None = Field(default=None, ge=0, le=2**63 - 1)
    reason: str | None = Field(default=None, max_length=4096)
    # The terms, fixed from the actuator's policy when the request is made.
    approvers: list[str] = Field(default_factory=list, max_length=1024)
    required: int = Field(default=1, ge=1, le=1024)
    approvals: list[str] = Field(default_factory=list, max_length=1024)


#: Why a telemetry record became a dead letter, besides the reasons of
#: ``ia.schemas.serde.DECODE_REASONS`` (its bytes are no valid event).  Stable: they
#: are metric labels (``ia_dlq_records_total{reason}``) and what DLQ readers match on.
REJECT_REASONS: Final = {
    "empty_record": "the record has no value (a tombstone)",
    "ts_in_future": "its timestamp is further ahead of the worker's clock than allowed",
    "key_mismatch": "its Kafka key is not its entity (or it has no key)",
    "too_many_metrics": "a new metric of an entity that has the most metrics allowed",
    "processing_error": "a valid event the decision code failed on, every attempt",
}


class DeadLetter(_Contract):
    """A record the pipeline could not accept (topic ``ia.telemetry.dlq``).

    ``reason`` is one of ``DECODE_REASONS`` or :data:`REJECT_REASONS` (or, for records of
    ``ia ingest``'s input topics, ``ia.ingest.mapping.INGEST_REASONS``); ``error`` says
    what was wrong in words (for ``processing_error``: the exception and the innermost
    frames of its stack).
    """

    reason: str
    error: str
    source_topic: str
    source_partition: Long
    source_offset: Long
    failed_at: Long
    original_b64: str


CONTRACTS: dict[str, type[BaseModel]] = {
    "TelemetryEvent": TelemetryEvent,
    "Decision": Decision,
    "ActionOutcome": ActionOutcome,
    "Feedback": Feedback,
    "DeadLetter": DeadLetter,
    "ApprovalEvent": ApprovalEvent,
}
