"""Explanations: the few features that made a decision, in words and numbers.

The detector's evidence has three parts (see :mod:`ia.decisions.detector`): the
surprise of this sample's residual (``score_point``), of the recent run of
residuals (``score_window``) and a value outside the series' range
(``out_of_range``).  Their shares of the evidence rank them; the feedback
classifier's largest log-odds contributions follow when an action was
proposed.  Everything is rounded, so replay stays byte-identical.
"""

from __future__ import annotations

from ia.decisions.feedback import Prediction
from ia.schemas.models import Explanation, FeatureContribution, ModelInfo, TelemetryEvent

EVIDENCE = ("score_point", "score_window", "out_of_range")
TOP_DETECTOR_FEATURES = 3


def _detector_contributions(f: dict[str, float]) -> list[FeatureContribution]:
    evidence = {k: f[k] for k in EVIDENCE if f.get(k, 0.0) > 0.0}
    total = sum(evidence.values())
    ranked = sorted(evidence.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_DETECTOR_FEATURES]
    out = [FeatureContribution(name=k, value=round(v, 6), weight=round(v / total, 6))
           for k, v in ranked]
    if "residual_z" in f:
        # The number behind the surprise, for humans: how far off, in sigmas.
        out.append(FeatureContribution(name="residual_z", value=round(f["residual_z"], 6),
                                       weight=0.0))
    return out


def _summary(ev: TelemetryEvent, f: dict[str, float], score: float,
             drift_event: str | None, pred: Prediction | None) -> str:
    if "expected" not in f:
        return f"{ev.kind.value} {ev.metric}: not scored"
    baseline = "hour-of-week" if f.get("seasonal") else "level"
    parts = [f"{ev.metric}={ev.value:.6g} vs expected {f['expected']:.6g} "
             f"({baseline} baseline, residual {f.get('residual_z', 0.0):+.1f} sigma); "
             f"anomaly score {score:.2f}"]
    if f.get("out_of_range"):
        parts.append("outside the range seen so far")
    if drift_event:
        parts.append(f"{drift_event} drift detected, baseline re-learnt")
    if pred is not None and pred.factor < 1.0:
        parts.append(f"feedback model: p(useful)={pred.p_useful:.2f}")
    return "; ".join(parts)


def explain(ev: TelemetryEvent, f: dict[str, float], score: float, drift_event: str | None,
            pred: Prediction | None, models: list[ModelInfo]) -> Explanation:
    top = _detector_contributions(f)
    if pred is not None:
        top += pred.top
    return Explanation(summary=_summary(ev, f, score, drift_event, pred), top_features=top,
                       models=models, drift_event=drift_event,
                       p_useful=None if pred is None else round(pred.p_useful, 6))
