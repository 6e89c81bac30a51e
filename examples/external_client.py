"""An external producer and consumer of ia's topics, using only confluent-kafka.

It knows nothing of this project's code, only the documented JSON contract:
it sends a latency series with one spike to ``<prefix>.telemetry``, prints
the decisions the worker publishes for that entity on ``<prefix>.decisions``
and, for those with an action, the actuator's outcomes on ``<prefix>.outcomes``.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/external_client.py --entity web-1
"""

import argparse
import json
import os
import random
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition


def produce_series(bootstrap, topic, entity, metric, n, spike):
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    start = int(time.time() * 1000) - n * 10_000
    rng = random.Random(42)
    for i in range(n):
        value = spike if i == n - 1 else 100.0 + rng.gauss(0, 2)
        event = {"entity": entity, "metric": metric, "value": value, "ts": start + i * 10_000,
                 "labels": {"team": "payments"}, "event_id": f"{entity}-{i}"}
        # Key by entity: ia keeps per-entity state and needs one entity per partition.
        producer.produce(topic, key=entity.encode(), value=json.dumps(event).encode())
    producer.flush(30)


def read_topic(bootstrap, topic, keep, done, timeout_s):
    """Records of ``topic`` from the beginning that ``keep`` returns a key for, until
    ``done(found)`` or the timeout."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found, deadline = {}, time.time() + timeout_s
    while not done(found) and time.time() < deadline:
        for msg in consumer.consume(500, timeout=0.5):
            if msg.error():
                continue
            record = json.loads(msg.value())
            key = keep(record)
            if key is not None:
                found[key] = record
    consumer.close()
    return found


def read_decisions(bootstrap, topic, entity, expected, timeout_s):
    return read_topic(bootstrap, topic,
                      lambda d: d["event_id"] if d["entity"] == entity else None,
                      lambda found: len(found) >= expected, timeout_s)


def read_outcomes(bootstrap, topic, decision_ids, timeout_s):
    """The action outcome of each decision in ``decision_ids`` (once the actuator ran it)."""
    return read_topic(bootstrap, topic,
                      lambda o: o["decision_id"] if o["decision_id"] in decision_ids
                      and o.get("phase", "action") == "action" else None,
                      lambda found: len(found) >= len(decision_ids), timeout_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    ap.add_argument("--prefix", default=os.environ.get("IA_TOPIC_PREFIX", "ia"))
    ap.add_argument("--entity", default="web-1")
    ap.add_argument("--metric", default="latency_ms")
    ap.add_argument("-n", type=int, default=60)
    ap.add_argument("--spike", type=float, default=400.0)
    ap.add_argument("--timeout", type=float, default=180.0,
                    help="seconds to wait for the decisions, then for the outcomes")
    args = ap.parse_args()
    if not args.bootstrap:
        ap.error("set KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap")
    produce_series(args.bootstrap, f"{args.prefix}.telemetry", args.entity, args.metric, args.n,
                   args.spike)
    decisions = read_decisions(args.bootstrap, f"{args.prefix}.decisions", args.entity, args.n,
                               args.timeout)
    for d in sorted(decisions.values(), key=lambda d: d["ts"]):
        if d["action"] or d["anomaly_score"] >= 0.5:
            print(json.dumps({k: d[k] for k in ("event_id", "value", "anomaly_score",
                                                "confidence", "mode", "action")}))
    acting = {d["decision_id"] for d in decisions.values() if d["action"]}
    outcomes = read_outcomes(args.bootstrap, f"{args.prefix}.outcomes", acting,
                             args.timeout) if acting else {}
    for o in outcomes.values():
        print(json.dumps({k: o[k] for k in ("decision_id", "action_type", "target", "status",
                                            "detail")}))
    statuses = {}
    for o in outcomes.values():
        statuses[o["status"]] = statuses.get(o["status"], 0) + 1
    print(json.dumps({"decisions": len(decisions), "actions": len(acting),
                      "outcomes": statuses}))
    raise SystemExit(0 if len(decisions) == args.n else 1)


if __name__ == "__main__":
    main()
