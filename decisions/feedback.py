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
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass

from river import compose, linear_model, optim, preprocessing

from ia.schemas.models import Decision, FeatureContribution, ModelInfo

# Bumped when the input features or the pickled model layout change; an older
# checkpoint is then ignored (the model starts afresh) rather than misread.
FORMAT = 1
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
        scaler, lr = self.model.steps["StandardScaler"], self.model.steps["LogisticRegression"]
        scaled = scaler.transform_one(x)
        contrib = {k: lr.weights.get(k, 0.0) * v for k, v in scaled.items()}
        top = sorted(contrib.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:2]
        return [FeatureContribution(name=k, value=round(x[k], 6), weight=round(w, 6))
                for k, w in top if w != 0.0]

    def dumps(self) -> bytes:
        return pickle.dumps((FORMAT, self.version, self.model), protocol=5)

    @classmethod
    def loads(cls, blob: bytes | None) -> FeedbackClassifier:
        """Restore a checkpoint; a missing or other-format one gives a fresh model.

        The blob is a pickle of River objects read from this deployment's own
        Redis prefix: the feature store is trusted infrastructure, as it is for
        every other piece of state the worker acts on.
        """
        clf = cls()
        if not blob:
            return clf
        try:
            fmt, version, model = pickle.loads(blob)  # see docstring
        except Exception:  # a corrupt checkpoint must not stop the worker
            return clf
        if fmt == FORMAT:
            clf.version, clf.model = version, model
        return clf


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
