"""Human views of the feature store: the definitions, and one entity's state.

Used by ``ia features list`` and ``ia features show`` (ia.cli.features); no
Redis here, so both are testable on memory records.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ia.features.aggregations import DROPPED, LAST_TS, LAST_VALUE, LATE, EntityContext
from ia.features.definitions import FeatureDef
from ia.features.registry import FeatureRegistry
from ia.features.store import EntityRecord


def _window(d: FeatureDef) -> str:
    if d.buckets:
        return f"{_duration(d.window_s)}/{d.buckets}"
    if d.samples:
        return f"last {d.samples}"
    return _duration(d.window_s) if d.window_s else "-"


def describe_definitions(registry: FeatureRegistry) -> list[dict]:
    return [{"name": d.name, "version": d.version, "aggregation": d.aggregation.value,
             "kind": d.kind.value, "sources": list(d.sources), "window": _window(d),
             "ttl_s": d.ttl_s, "outputs": list(d.outputs), "description": d.description}
            for d in registry.defs]


def format_definitions(registry: FeatureRegistry, metric: str = "any") -> str:
    rows = describe_definitions(registry)
    head = ("NAME", "V", "AGGREGATION", "KIND", "SOURCES", "WINDOW", "TTL", "OUTPUTS")
    table = [head] + [(r["name"], str(r["version"]), r["aggregation"], r["kind"],
                       ",".join(r["sources"]), r["window"], _duration(r["ttl_s"]),
                       ", ".join(r["outputs"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
             for row in table]
    plan = registry.plan(metric)
    lines.append(f"\nallowed lateness {registry.allowed_lateness_s:g}s; state of one series "
                 f"('{metric}'): {plan.size} bytes; entity TTL {_duration(registry.ttl_s)}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if not seconds:
        return "-"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:g}{unit}"
    return f"{seconds:g}s"


def _iso(ts_ms: int) -> str | None:
    if ts_ms < 0:
        return None
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def series_snapshot(rec: EntityRecord, metric: str, registry: FeatureRegistry) -> dict:
    """A series' bookkeeping and the features its last sample would be served now."""
    st = list(rec.state(metric, registry))  # a copy: showing must not change anything
    wm = st[LAST_TS]
    info = {"metric": metric, "watermark": _iso(wm), "watermark_ms": wm,
            "last_value": st[LAST_VALUE], "late_folded": st[LATE], "dropped": st[DROPPED],
            "state_bytes": registry.plan(metric).size}
    if wm >= 0:
        feats, _ = registry.plan(metric).observe(st, st[LAST_VALUE], wm, fold=False)
        feats.update(_ratios(rec, metric, wm, registry))
        registry.serve_context(EntityContext(rec.context) if rec.context else None, wm, feats)
        info["features"] = feats
    return info


def _ratios(rec: EntityRecord, metric: str, t: int, registry: FeatureRegistry) -> dict:
    out = {}
    for r in registry.ratios_by_metric.get(metric, ()):
        if {r.numerator, r.denominator} <= rec.metrics():
            num, den = (registry.plan(m).window_sum_of(rec.state(m, registry), r.window, t)
                        for m in (r.numerator, r.denominator))
            out[r.d.outputs[0]] = num / den if den > 0 else 0.0
    return out


def entity_snapshot(entity: str, rec: EntityRecord, registry: FeatureRegistry,
                    metric: str | None = None) -> dict:
    metrics = [metric] if metric else sorted(rec.metrics())
    return {
        "entity": entity,
        "series": [series_snapshot(rec, m, registry) for m in metrics if m in rec.metrics()],
        "context": dict(sorted(rec.context.items())),
        "position": None if rec.position is None else dict(zip(
            ("partition", "offset", "newest_ts"), rec.position, strict=True)),
        "detector_state": sorted(rec.detectors),
        "remembered_decisions": len(rec.decisions),
    }


def format_snapshot(snap: dict) -> str:
    lines = [f"entity {snap['entity']}"]
    if snap["position"]:
        p = snap["position"]
        lines.append(f"  last folded record: partition {p['partition']} offset {p['offset']}")
    for key, value in snap["context"].items():
        lines.append(f"  context {key} = {value}")
    if not snap["series"]:
        lines.append("  no series")
    for s in snap["series"]:
        lines.append(f"\n  {s['metric']}: watermark {s['watermark']}  last {s['last_value']:g}  "
                     f"late folded {s['late_folded']}  dropped {s['dropped']}  "
                     f"({s['state_bytes']} bytes)")
        for name, value in s.get("features", {}).items():
            lines.append(f"    {name:<28} {value:.6g}")
    return "\n".join(lines)
