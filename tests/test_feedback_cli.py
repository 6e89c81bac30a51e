"""``ia feedback``: a label for a known action decision reaches the feedback topic with
the decision's entity, signed with the feedback key; one for an unknown decision, or
without a feedback key, is refused and publishes nothing."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner

from ia.cli import main
from ia.core.kafka import ensure_topics, read_all
from ia.core.redis import client as redis_client
from ia.core.settings import RedisSettings, Topics
from ia.core.signing import FEEDBACK_FIELDS
from ia.decisions.learning import RedisDecisionMemory, Remembered
from tests.support import TEST_FEEDBACK_KEY_FILE, TEST_FEEDBACK_KEYS, TEST_KEYS


async def _remember(redis: RedisSettings, prefix: str, decision_id: str, entity: str) -> None:
    client = redis_client(redis)
    try:
        await RedisDecisionMemory(client, prefix).remember(
            [(decision_id, Remembered(entity, "restart", {"score": 0.9}))])
    finally:
        await client.aclose()


@pytest.fixture
def env(infra, topic_prefix, monkeypatch) -> Topics:
    for name, value in {**infra.env, "IA_TOPIC_PREFIX": topic_prefix,
                        "IA_REDIS_PREFIX": topic_prefix,
                        "IA_FEEDBACK_KEY_FILE": str(TEST_FEEDBACK_KEY_FILE)}.items():
        monkeypatch.setenv(name, value)
    topics = Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 1)
    return topics


def test_a_label_for_a_known_decision_is_published(env: Topics, infra, topic_prefix) -> None:
    asyncio.run(_remember(infra.redis, topic_prefix, "dc-known", "svc-1"))
    out = CliRunner().invoke(main, ["feedback", "dc-known", "--label", "false_positive",
                                    "--by", "ops@example", "--comment", "deploy, not a leak"])
    assert out.exit_code == 0, out.output
    (record,) = read_all(infra.kafka, env.feedback, timeout_s=10)
    assert (record["decision_id"], record["label"], record["entity"], record["by"]) == (
        "dc-known", "false_positive", "svc-1", "ops@example")
    assert TEST_FEEDBACK_KEYS.verify(record, FEEDBACK_FIELDS) is None
    # the decisions' key is another one: a labeller cannot sign decisions
    assert TEST_KEYS.verify(record, FEEDBACK_FIELDS) is not None


def test_no_label_without_a_feedback_key(env: Topics, infra, topic_prefix,
                                         monkeypatch) -> None:
    asyncio.run(_remember(infra.redis, topic_prefix, "dc-known", "svc-1"))
    monkeypatch.delenv("IA_FEEDBACK_KEY_FILE")
    out = CliRunner().invoke(main, ["feedback", "dc-known", "--label", "false_positive"])
    assert out.exit_code == 2
    assert "no feedback key: set IA_FEEDBACK_KEY_FILE" in out.output
    assert read_all(infra.kafka, env.feedback, timeout_s=5) == []


def test_a_label_for_an_unknown_decision_is_refused(env: Topics, infra) -> None:
    out = CliRunner().invoke(main, ["feedback", "dc-unknown", "--label", "true_positive"])
    assert out.exit_code == 1
    assert "no action decision dc-unknown is known" in out.output
    assert read_all(infra.kafka, env.feedback, timeout_s=5) == []
