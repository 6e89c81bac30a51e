"""Shadow mode: a candidate policy/model beside production, and the two compared.

* ``ia worker --shadow --policy CANDIDATE`` runs the worker's pipeline on the
  same telemetry with its own consumer group (``<IA_APP_ID>-shadow``), its own
  Redis namespace (``<IA_REDIS_PREFIX>.shadow``: production feature and guard
  keys are never read or written) and pipeline id ``shadow`` (so its decision
  ids differ from production's), and publishes only to
  ``<prefix>.decisions.shadow``, which no actuator reads; its decisions carry
  ``mode: shadow`` (:mod:`ia.decisions.shadow`).
* ``ia shadow report`` compares the two decision topics over a time range.
* ``ia shadow promote`` and ``rollback`` (:mod:`ia.governance.promotion`) then
  make the candidate production, on the record, or undo that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ia.core.settings import Settings
from ia.decisions.shadow import PIPELINE_ID
from ia.offline.backtest import Labels, Row, compare, guard_interventions, quality, volume
from ia.offline.recording import Partitions
from ia.schemas.models import Decision
from ia.schemas.serde import DecodeError, decode

# --------------------------------------------------------------------------- the shadow worker


def shadow_settings(s: Settings) -> Settings:
    """Settings of the shadow worker: own consumer group and Redis namespace."""
    return s.with_overrides(worker={"app_id": f"{s.worker.app_id}-{PIPELINE_ID}"},
                            redis={"prefix": f"{s.redis.prefix}.{PIPELINE_ID}"})


# --------------------------------------------------------------------------- report


def decisions_of(partitions: Partitions, fmt: str) -> tuple[list[Decision], int]:
    """Decoded decisions, first delivery of each decision id kept; and how many
    records could not be decoded."""
    seen: set[str] = set()
    out, bad = [], 0
    for p in sorted(partitions):
        for rec in partitions[p]:
            try:
                d = decode(rec.value or b"", Decision, fmt)
            except DecodeError:
                bad += 1
                continue
            if d.decision_id not in seen:
                seen.add(d.decision_id)
                out.append(d)
    return out, bad


def pair_rows(production: Iterable[Decision], shadow: Iterable[Decision]
              ) -> tuple[list[Row], list[Row], int, int]:
    """Rows of the events both sides decided, in (event time, event id) order, and
    the numbers decided by one side only (e.g. before the shadow started)."""
    prod = {d.event_id: Row.of(d) for d in production}
    shad = {d.event_id: Row.of(d) for d in shadow}
    both = sorted(set(prod) & set(shad), key=lambda e: (prod[e].ts, e))
    return ([prod[e] for e in both], [shad[e] for e in both], len(set(prod) - set(shad)),
            len(set(shad) - set(prod)))


def _side(rows: Sequence[Row], decisions: Sequence[Decision], labels: Labels | None
          ) -> dict[str, Any]:
    out: dict[str, Any] = {"decisions": len(decisions), "volume": volume(rows),
                           "guard_interventions": guard_interventions(rows),
                           "policy_versions": sorted({d.policy_version for d in decisions})}
    if labels is not None:
        out["quality"] = quality(rows, labels)
    return out


def compare_topics(production: Sequence[Decision], shadow: Sequence[Decision],
                   labels: Labels | None = None, examples: int = 50) -> dict[str, Any]:
    prod_rows, shad_rows, only_prod, only_shadow = pair_rows(production, shadow)
    changes = compare(prod_rows, shad_rows)
    kinds = {k: sum(c.kind == k for c in changes) for k in ("added", "removed", "changed")}
    return {"events_compared": len(prod_rows), "only_production": only_prod,
            "only_shadow": only_shadow,
            "production": _side(prod_rows, production, labels),
            "shadow": _side(shad_rows, shadow, labels),
            "diff": {**kinds, "examples": [c.to_json() for c in changes[:examples]]}}


def format_report(r: dict[str, Any]) -> str:
    d = r["diff"]
    lines = [f"events decided by both: {r['events_compared']} (production only "
             f"{r['only_production']}, shadow only {r['only_shadow']})",
             f"shadow vs production: {d['added']} actions added, {d['removed']} removed, "
             f"{d['changed']} changed"]
    for side in ("production", "shadow"):
        s = r[side]
        line = (f"{side:10} policy {','.join(s['policy_versions']) or '-'}: "
                f"{s['volume']['actions']} actions {s['volume']['by_mode']}, guard "
                f"interventions {s['guard_interventions']}")
        if "quality" in s:
            q = s["quality"]
            line += f"; precision {q['precision']}, recall {q['recall']}"
        lines.append(line)
    for ex in d["examples"][:10]:
        lines.append(f"  {ex['kind']:8} {ex['entity']}/{ex['metric']} ts={ex['ts']}: "
                     f"production {ex['baseline']['mode']} {ex['baseline']['action']} -> "
                     f"shadow {ex['candidate']['mode']} {ex['candidate']['action']}")
    return "\n".join(lines)
