"""An external producer and consumer of ia's topics, using only confluent-kafka.

It knows nothing of this project's code, only the documented JSON contract:
it sends a latency series with one spike to ``<prefix>.telemetry`` and
prints the decisions the worker publishes for that entity on
``<prefix>.decisions``.

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


def read_decisions(bootstrap, topic, entity, expected, timeout_s):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}",
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found, deadline = {}, time.time() + timeout_s
    while len(found) < expected and time.time() < deadline:
        for msg in consumer.consume(500, timeout=0.5):
            if msg.error():
                continue
            decision = json.loads(msg.value())
            if decision["entity"] == entity:
                found[decision["event_id"]] = decision
    consumer.close()
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    ap.add_argument("--prefix", default=os.environ.get("IA_TOPIC_PREFIX", "ia"))
    ap.add_argument("--entity", default="web-1")
    ap.add_argument("--metric", default="latency_ms")
    ap.add_argument("-n", type=int, default=60)
    ap.add_argument("--spike", type=float, default=400.0)
    ap.add_argument("--timeout", type=float, default=60.0)
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
    print(json.dumps({"decisions": len(decisions),
                      "actions": sum(1 for d in decisions.values() if d["action"])}))
    raise SystemExit(0 if len(decisions) == args.n else 1)


if __name__ == "__main__":
    main()
