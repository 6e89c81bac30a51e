"""``ia feedback``: label a decision (true or false positive, useful or harmful)."""

from __future__ import annotations

import asyncio
import json

import click

from ia.cli.common import redis_client, settings
from ia.core.clock import now_ms
from ia.core.errors import ConfigError, NotFound
from ia.core.operator import default_by
from ia.schemas.models import FeedbackLabel


@click.command("feedback")
@click.argument("decision_id")
@click.option("--label", required=True, type=click.Choice([x.value for x in FeedbackLabel]),
              help="The judgement of the decision.")
@click.option("--by", default=None, help="Who judges (default: user@host).")
@click.option("--comment", default=None, help="Why, in a sentence.")
def feedback(decision_id: str, label: str, by: str | None, comment: str | None) -> None:
    """Label DECISION_ID: the label goes to the feedback topic, and the worker learns from
    it once (trust of the entity and the action, the shared feedback model).

    Only decisions that carried an action can be labelled: the worker remembers those
    (30 days) and refuses labels for any other id.  The label is signed with the
    feedback key (IA_FEEDBACK_KEY_FILE; `ia up` makes one): the worker counts no label
    it cannot verify, and at most IA_FEEDBACK_MAX_PER_ENTITY per entity and window.
    """
    from ia.core.kafka import producer
    from ia.core.signing import FEEDBACK_FIELDS, feedback_keys
    from ia.decisions.learning import RedisDecisionMemory
    from ia.schemas.models import Feedback
    from ia.schemas.serde import encode

    s = settings()
    keys = feedback_keys(s.signing)
    if keys is None:
        raise ConfigError("no feedback key: set IA_FEEDBACK_KEY_FILE to the workers' feedback "
                          "key file (`ia up` makes one); the worker counts no unsigned label")
    s.require_endpoints()

    async def entity_of() -> str | None:
        client = redis_client(s)
        try:
            remembered = await RedisDecisionMemory(client, s.redis.prefix).recall(decision_id)
        finally:
            await client.aclose()
        return None if remembered is None else remembered.entity

    entity = asyncio.run(entity_of())
    if entity is None:
        raise NotFound(f"no action decision {decision_id} is known (only decisions with an "
                       "action can be labelled, for 30 days)")
    record = Feedback(decision_id=decision_id, label=FeedbackLabel(label),
                      by=by or default_by(), at=now_ms(), entity=entity, comment=comment)
    record = record.model_copy(update={"signature": keys.sign(record.model_dump(mode="json"),
                                                              FEEDBACK_FIELDS)})
    out = producer(s.kafka, {"acks": "all", "enable.idempotence": True, "linger.ms": 0})
    errors: list = []
    out.produce(s.topics.feedback, key=entity.encode(), value=encode(record, s.wire_format),
                on_delivery=lambda err, _msg: errors.append(err) if err else None)
    if out.flush(15) or errors:
        raise click.ClickException(f"feedback not delivered to {s.topics.feedback}: "
                                   f"{errors or 'timeout'}")
    click.echo(json.dumps(record.model_dump(mode="json")))
