"""Learning from feedback: will this action be useful?

A River logistic regression (behind an online standard scaler) predicts, from
a decision's features and its proposed action type, the probability that the
action is useful.  Labels come from ``ia.feedback`` (``true_positive`` /
``useful`` are positive, ``false_positive`` / ``harmful`` negative) and from
``ia.outcomes`` (a failed or timed-out action is a negative; success of
*execution* says nothing about usefulness and is not a label).

The probability enters confidence as ``min(1, 2 p)``: an untrained model
(p = 0.5) changes nothing, and a model that has learnt that such actions are
false alarms withholds trust.  Per (entity, action type) counters of labels
add a Laplace-smoothed precision on top, so repeated false positives raise the
bar for that entity and action even before the shared model generalises.

The model is shared by every worker: each label is applied as an optimistic
read-modify-write of one Redis hash (``WATCH``/``MULTI``), so every update is
a new, atomically written, numbered version (see :mod:`ia.decisions.checkpoint`),
and workers pick up new versions on their next batch.

A checkpoint is data, never code: JSON of the scaler's and the regression's numbers
(:meth:`FeedbackClassifier.dumps`), checked field by field on the way back in
(:meth:`FeedbackClassifier.loads`), so write access to Redis can at worst spoil the
model's advice (which guards and policy bound), not run anything in a worker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from river import compose, linear_model, optim, preprocessing

from ia.schemas.models import Decision, FeatureContribution, ModelInfo

# Bumped when the input features or the checkpoint layout change; a checkpoint of
# another format is then ignored (the model starts afresh) rather than misread.
FORMAT = 1
# Bounds of a checkpoint read back: the inputs are ~13 fixed names plus one per action
# type, so anything near these limits was not written by a worker.
MAX_CHECKPOINT_BYTES = 1 << 20
MAX_INPUTS = 1024
MAX_NAME_CHARS = 200
# Larger integers are not exact as floats (and not counts any worker reached).
MAX_EXACT_INT = 2**53
POSITIVE = frozenset({"true_positive", "useful"})
NEVER_S = 1e9


def classifier_inputs(features: dict[str, float], score: float, action_type: str,
                      drift: str = "stable") -> dict[str, float]:
    """The classifier's view of a decision: bounded, unit-free numbers only."""
    since_deploy = features.get("seconds_since_deploy", NEVER_S)
    return {
        "score": score,
        "score_point": features.get("score_point", 0.0),
        "score_window": features.get("score_window", 0.0),
        "abs_residual_z": min(abs(features.get("residual_z", 0.0)), 10.0),
        "out_of_range": 1.0 if features.get("range_excess", 0.0) > 0 else 0.0,
        "seasonal": features.get("seasonal", 0.0),
        "log_samples": math.log1p(max(features.get("n", 0.0), 0.0)),
        "recent_deploy": 1.0 if since_deploy < 3600 else 0.0,
        "entity_fp": math.log1p(features.get("false_positives", 0.0)),
        "entity_tp": math.log1p(features.get("true_positives", 0.0)),
        "entity_failed": math.log1p(features.get("actions_failed", 0.0)),
        "drift": 1.0 if drift == "drift" else 0.0,
        f"action={action_type}": 1.0,
    }


def inputs_of(decision: Decision) -> dict[str, float] | None:
    """Classifier inputs of a published decision, or None if it proposed no action."""
    if decision.action is None:
        return None
    return classifier_inputs(decision.features, decision.anomaly_score, decision.action.type,
                             decision.drift.value)


def is_positive(label: str) -> bool:
    return label in POSITIVE


@dataclass
class Prediction:
    p_useful: float
    factor: float
    top: list[FeatureContribution]


class FeedbackClassifier:
    """P(action useful | decision), online; ``version`` counts learnt labels."""

    def __init__(self) -> None:
        self.model = compose.Pipeline(
            preprocessing.StandardScaler(),
            linear_model.LogisticRegression(optimizer=optim.SGD(0.05)),
        )
        self.version = 0
        self._info: ModelInfo | None = None
        self._info_version = -1

    @property
    def info(self) -> ModelInfo:
        # Asked for once per decision: built again only when the model has learnt.
        if self._info is None or self._info_version != self.version:
            self._info = ModelInfo(id="feedback-logreg", version=f"{FORMAT}.{self.version}")
            self._info_version = self.version
        return self._info

    def predict(self, x: dict[str, float]) -> Prediction:
        if self.version == 0:
            return Prediction(0.5, 1.0, [])
        p = float(self.model.predict_proba_one(x).get(True, 0.5))
        return Prediction(p, min(1.0, 2.0 * p), self._contributions(x))

    def learn(self, x: dict[str, float], useful: bool) -> None:
        self.model.learn_one(x, useful)
        self.version += 1

    def _contributions(self, x: dict[str, float]) -> list[FeatureContribution]:
        # Signed contribution of each input to the log-odds: weight * scaled value.
        scaler, lr = self._steps()
        scaled = scaler.transform_one(x)
        contrib = {k: lr.weights.get(k, 0.0) * v for k, v in scaled.items()}
        top = sorted(contrib.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:2]
        return [FeatureContribution(name=k, value=round(x[k], 6), weight=round(w, 6))
                for k, w in top if w != 0.0]

    def dumps(self) -> bytes:
        """The checkpoint: every number the model's next prediction and lesson depend
        on, in the models' own key order (the dot products sum in that order)."""
        scaler, lr = self._steps()
        state = {
            "format": FORMAT, "version": self.version,
            "scaler": {"counts": dict(scaler.counts), "means": dict(scaler.means),
                       "vars": dict(scaler.vars)},
            "logreg": {"weights": lr._weights.to_dict(), "intercept": lr.intercept,
                       "iterations": lr.optimizer.n_iterations},
        }
        return json.dumps(state, allow_nan=False, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, blob: bytes | None) -> FeedbackClassifier:
        """Restore a checkpoint; a missing one gives a fresh model.

        Raises
        ------
        CheckpointError
            If the blob is not a checkpoint of this :data:`FORMAT` with sane
            numbers: the caller decides what to do instead, nothing in it is run.
        """
        clf = cls()
        if not blob:
            return clf
        state = _parse(blob)
        scaler, lr = clf._steps()
        scaler.counts.update(state["scaler"]["counts"])
        scaler.means.update(_floats(state["scaler"]["means"]))
        scaler.vars.update(_floats(state["scaler"]["vars"]))
        lr._weights.update(_floats(state["logreg"]["weights"]))
        lr.intercept = float(state["logreg"]["intercept"])
        lr.optimizer.n_iterations = state["logreg"]["iterations"]
        clf.version = state["version"]
        return clf

    def _steps(self) -> tuple[preprocessing.StandardScaler, linear_model.LogisticRegression]:
        return self.model.steps["StandardScaler"], self.model.steps["LogisticRegression"]


class CheckpointError(ValueError):
    """A stored checkpoint that is not one this code wrote (corrupt, foreign, hostile)."""


def _parse(blob: bytes) -> dict[str, Any]:
    """The checkpoint's fields, validated: right types, finite numbers, bounded sizes."""
    if len(blob) > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{len(blob)} bytes, more than {MAX_CHECKPOINT_BYTES}")
    try:
        state = json.loads(blob, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"not JSON: {exc}") from None
    _require(isinstance(state, dict), "not an object")
    _require(state.get("format") == FORMAT, f"format {state.get('format')!r}, not {FORMAT}")
    _require(_is_count(state.get("version")), "version is not a count")
    scaler, lr = state.get("scaler"), state.get("logreg")
    _require(isinstance(scaler, dict) and isinstance(lr, dict), "scaler or logreg missing")
    _table(scaler.get("counts"), _is_count, "scaler.counts")
    _table(scaler.get("means"), _is_finite, "scaler.means")
    _table(scaler.get("vars"), lambda v: _is_finite(v) and v >= 0, "scaler.vars")
    _table(lr.get("weights"), _is_finite, "logreg.weights")
    _require(_is_finite(lr.get("intercept")), "logreg.intercept is not a finite number")
    _require(_is_count(lr.get("iterations")), "logreg.iterations is not a count")
    return state


def _table(value: object, valid: Callable[[Any], bool], where: str) -> None:
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} is not an object")
    _require(len(value) <= MAX_INPUTS, f"{where} has {len(value)} inputs")
    for name, v in value.items():
        _require(len(name) <= MAX_NAME_CHARS, f"{where} has a {len(name)}-character name")
        _require(valid(v), f"{where}[{name[:40]!r}] = {str(v)[:40]!r}")


def _is_count(v: object) -> bool:
    # bool is an int to Python, not a number to a checkpoint.
    return type(v) is int and 0 <= v <= MAX_EXACT_INT


def _is_finite(v: object) -> bool:
    if type(v) is int:
        return abs(v) <= MAX_EXACT_INT
    return type(v) is float and math.isfinite(v)


def _floats(table: dict[str, int | float]) -> dict[str, float]:
    return {name: float(v) for name, v in table.items()}


def _no_constant(name: str) -> float:
    raise CheckpointError(f"{name} is not a number")


def _require(ok: bool, reason: str) -> None:
    if not ok:
        raise CheckpointError(reason)


def laplace_precision(tp: float, fp: float) -> float:
    """Laplace-smoothed precision of past labels: 1 before any label, lower with each
    false positive, back towards 1 with true positives.

    Two factors of confidence use it, and they multiply on purpose: the entity-wide
    one (:func:`entity_trust`) lowers every decision of an entity whose actions were
    labelled false alarms, the per-action one (:func:`action_trust`) lowers only the
    action type that earned them, once that action is proposed.
    """
    return (tp + 1.0) / (tp + fp + 1.0)


def counter_name(positive: bool, action_type: str | None = None) -> str:
    """The entity context counter one label increments: ``tp``/``fp`` entity-wide (the
    ``true_positives``/``false_positives`` features), ``tp:<action>``/``fp:<action>``
    for the action type the decision proposed."""
    name = "tp" if positive else "fp"
    return name if action_type is None else f"{name}:{action_type}"


def entity_trust(features: dict[str, float]) -> float:
    """Trust earned by all labelled decisions of the entity, whatever their action."""
    return laplace_precision(features.get("true_positives", 0.0),
                             features.get("false_positives", 0.0))


def action_trust(context: dict[str, str], action_type: str) -> float:
    """Trust earned by this entity's labelled decisions that proposed ``action_type``."""
    return laplace_precision(float(context.get(counter_name(True, action_type), 0)),
                             float(context.get(counter_name(False, action_type), 0)))
