"""Shadow decisions: what a candidate would have done, marked so nothing acts on it.

The shadow worker (``ia worker --shadow``) runs a candidate policy/model on
the production stream and publishes to ``<prefix>.decisions.shadow``, which no
actuator reads.  As a second line of defence every shadow decision that
carries an action gets ``mode: shadow`` (the contract's "evaluate and record,
never act"; an actuator that were pointed at the topic by mistake would only
report it as ``blocked``), and the mode the candidate chose is kept in a last
``rule_trace`` entry, so comparisons still see ``auto`` vs ``needs_approval``.
"""

from __future__ import annotations

import re

from ia.schemas.models import Decision, Mode, RuleTrace

PIPELINE_ID = "shadow"
TRACE_RULE = "shadow"
_REASON = "candidate mode: {mode} (shadow pipeline: recorded, never acted on)"
_INTENDED = re.compile(r"^candidate mode: (\w+)")


def as_shadow(d: Decision) -> Decision:
    """``d`` with ``mode: shadow`` and its intended mode in the trace; idempotent."""
    if d.action is None or is_marked(d):
        return d
    trace = [*d.rule_trace, RuleTrace(rule=TRACE_RULE, matched=True,
                                      reason=_REASON.format(mode=d.mode.value))]
    return d.model_copy(update={"mode": Mode.shadow, "rule_trace": trace})


def is_marked(d: Decision) -> bool:
    return bool(d.rule_trace) and d.rule_trace[-1].rule == TRACE_RULE


def intended_mode(d: Decision) -> Mode:
    """The mode the candidate chose (``d.mode`` for decisions that are not marked)."""
    if not is_marked(d):
        return d.mode
    m = _INTENDED.match(d.rule_trace[-1].reason)
    return Mode(m.group(1)) if m else d.mode
