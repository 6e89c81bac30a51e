"""The worker's side of learning from feedback (Redis, no Kafka).

* :meth:`FeedbackLearner.remember` keeps, for each decision that proposed an
  action, the classifier inputs and action type (``{prefix}:dfx:{id}``, 30
  days), because a label may arrive long after the decision.
* :meth:`FeedbackLearner.learn` applies one label: the per (entity, action
  type) counters that raise the bar for that pair, and one update of the
  shared classifier, written as a new checkpoint version atomically
  (:class:`~decisions.checkpoint.RedisModelStore`).  A decision teaches at
  most once, whatever redelivery does.
* :meth:`FeedbackLearner.refresh` loads a newer classifier checkpoint into the
  engine before a batch (one ``HGET`` when nothing changed), so a restarted
  worker or a new partition owner decides with everything learnt so far.
"""

from __future__ import annotations

import json
import logging

from ia.decisions.checkpoint import RedisModelStore
from ia.decisions.engine import DecisionEngine
from ia.decisions.feedback import FeedbackClassifier, inputs_of
from ia.features.store import RedisFeatureStore
from ia.schemas.models import Decision

log = logging.getLogger("ia.learning")
MODEL_NAME = "feedback"
REMEMBER_S = 30 * 24 * 3600


class FeedbackLearner:
    def __init__(self, client, store: RedisFeatureStore, prefix: str = "ia") -> None:
        self.client = client
        self.store = store
        self.prefix = prefix
        self.models = RedisModelStore(client, prefix)

    def _key(self, kind: str, decision_id: str) -> str:
        return f"{self.prefix}:{kind}:{decision_id}"

    async def remember(self, decisions: list[Decision]) -> None:
        rows = [(d, inputs_of(d)) for d in decisions if d.action is not None]
        if not rows:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for d, x in rows:
                pipe.set(self._key("dfx", d.decision_id),
                         json.dumps({"entity": d.entity, "action": d.action.type, "x": x},
                                    sort_keys=True), ex=REMEMBER_S)
            await pipe.execute()

    async def entity_of(self, decision_id: str) -> str | None:
        """The entity of a remembered action decision (a label may name only its id,
        e.g. of a pending approval request, which has no outcome yet)."""
        raw = await self.client.get(self._key("dfx", decision_id))
        return json.loads(raw)["entity"] if raw is not None else None

    async def learn(self, decision_id: str, positive: bool) -> int | None:
        """Apply one label; return the new classifier version, or None if the decision
        is unknown (no action, expired) or has already taught."""
        raw = await self.client.get(self._key("dfx", decision_id))
        if raw is None:
            return None
        first = await self.client.set(self._key("learnt", decision_id), b"1", nx=True,
                                      ex=REMEMBER_S)
        if not first:
            return None
        info = json.loads(raw)
        await self.store.incr_context(info["entity"],
                                      f"{'tp' if positive else 'fp'}:{info['action']}")

        def apply(blob: bytes | None) -> tuple[int, bytes]:
            clf = FeedbackClassifier.loads(blob)
            clf.learn(info["x"], positive)
            return clf.version, clf.dumps()

        version = await self.models.update(MODEL_NAME, apply)
        log.info("feedback model v%d learnt %s from %s", version,
                 "useful" if positive else "not useful", decision_id)
        return version

    async def refresh(self, engine: DecisionEngine) -> None:
        if await self.models.version(MODEL_NAME) == engine.feedback.version:
            return
        _, blob = await self.models.load(MODEL_NAME)
        engine.feedback = FeedbackClassifier.loads(blob)
