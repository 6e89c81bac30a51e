"""Topic contracts: pydantic models, their Avro schemas, and the wire formats.

The ``.avsc`` files in ``schemas/avro`` are the source of truth; ``models``
mirrors them for validation in Python, ``serde`` reads and writes them, and
``compat`` guards their evolution against the published ``avro/history``.
"""

from ia.schemas.compat import check_backward_compatible, compatibility_report
from ia.schemas.models import (
    CONTRACTS,
    Action,
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    DeadLetter,
    Decision,
    DriftState,
    EventKind,
    Feedback,
    FeedbackLabel,
    Mode,
    ModelInfo,
    OutcomePhase,
    OutcomeStatus,
    RuleTrace,
    TelemetryEvent,
    derive_decision_id,
    derive_event_id,
)
from ia.schemas.serde import (
    DECODE_REASONS,
    FORMATS,
    Codec,
    DecodeError,
    EncodeError,
    Format,
    SchemaIds,
    decode,
    detect_format,
    encode,
    load_schema,
    schema_name,
)

__all__ = [
    "CONTRACTS",
    "DECODE_REASONS",
    "FORMATS",
    "Action",
    "ActionOutcome",
    "ApprovalEvent",
    "ApprovalStatus",
    "Codec",
    "DeadLetter",
    "Decision",
    "DecodeError",
    "DriftState",
    "EncodeError",
    "EventKind",
    "Feedback",
    "FeedbackLabel",
    "Format",
    "Mode",
    "ModelInfo",
    "OutcomePhase",
    "OutcomeStatus",
    "RuleTrace",
    "SchemaIds",
    "TelemetryEvent",
    "check_backward_compatible",
    "compatibility_report",
    "decode",
    "derive_decision_id",
    "derive_event_id",
    "detect_format",
    "encode",
    "load_schema",
    "schema_name",
]
