"""Issue 14 acceptance through the real broker and Redis, with the real programs:

* an OTLP producer on the official OpenTelemetry SDK -> ``otlp_metrics`` (both
  encodings) -> ``ia ingest`` -> telemetry -> ``ia worker`` -> decisions;
* CloudEvents (binary and structured) -> deploy/config-change context features;
* ``prometheus`` scraping a target served here and remote-writing into
  ``ia receive`` -> decisions;
* a Prometheus alert rule firing and then resolving -> ``prometheus-alertmanager``
  -> ``ia receive`` -> events (and their decisions);
* the broker paused under the receiver: 503, and Prometheus' own retry then gets
  every sample decided, each with one decision id.

The module runs on a broker of its own (tansu starts in a fraction of a second), so
that pausing it touches no other test; Redis is the session's.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer

from ia.core.kafka import ensure_topics
from ia.features.definitions import NEVER_S
from ia.runtime.embedded import free_port, start_broker
from tests.kafka_client import read_topic
from tests.otlp_producer import OtlpService
from tests.support import IaProcess, ia_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
TOKEN = "receiver-token-of-the-ingest-tests"
HAVE_PROMETHEUS = os.access(PROMETHEUS, os.X_OK)
HAVE_ALERTMANAGER = os.access(ALERTMANAGER, os.X_OK)
needs_prometheus = pytest.mark.skipif(
    not HAVE_PROMETHEUS, reason="prometheus is not installed (Debian: apt-get install "
                                "prometheus; .ci/run installs it)")
needs_alertmanager = pytest.mark.skipif(
    not (HAVE_PROMETHEUS and HAVE_ALERTMANAGER),
    reason="prometheus and prometheus-alertmanager are not installed (Debian: apt-get "
           "install prometheus prometheus-alertmanager; .ci/run installs them)")


class Target:
    """A scrape target: ``ia_test_value`` (settable; the alert rule watches it) and
    ``ia_test_requests_total`` (a counter that grows with every scrape)."""

    def __init__(self) -> None:
        self.value = 1.0
        self.requests = 0
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                target.requests += 1
                body = (f"# TYPE ia_test_value gauge\nia_test_value {target.value}\n"
                        f"# TYPE ia_test_requests_total counter\n"
                        f"ia_test_requests_total {target.requests}\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115  # owned by the child
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


PROMETHEUS_CONFIG = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: ia-target
    static_configs: [{{targets: ["127.0.0.1:{target}"]}}]
rule_files: ["{rules}"]
alerting:
  alertmanagers: [{{static_configs: [{{targets: ["127.0.0.1:{alertmanager}"]}}]}}]
remote_write:
  - url: http://127.0.0.1:{receiver}/api/v1/write
    authorization: {{credentials_file: "{token}"}}
    queue_config: {{batch_send_deadline: 500ms, min_backoff: 100ms, max_backoff: 1s}}
    metadata_config: {{send: false}}
"""

RULES = """
groups:
  - name: ia-tests
    interval: 1s
    rules:
      - alert: IaTestHigh
        expr: ia_test_value > 5
        labels: {severity: page}
        annotations: {summary: "ia_test_value is {{ $value }}"}
"""

ALERTMANAGER_CONFIG = """
route: {{receiver: ia, group_by: [alertname], group_wait: 1s, group_interval: 1s,
         repeat_interval: 1h}}
receivers:
  - name: ia
    webhook_configs:
      - url: http://127.0.0.1:{receiver}/alertmanager
        send_resolved: true
        http_config: {{authorization: {{type: Bearer, credentials_file: "{token}"}}}}
"""


@pytest.fixture(scope="module")
def stack(infra, tmp_path_factory):  # type: ignore[no-untyped-def]
    """A broker of the module's own; ``ia worker``, ``ia ingest`` and ``ia receive`` on
    it; Prometheus and Alertmanager (where installed) scraping a target and sending
    to the receiver."""
    tmp = tmp_path_factory.mktemp("ingest")
    broker = start_broker(tmp / "broker")
    prefix = f"t{os.urandom(4).hex()}"
    token_file = tmp / "tokens"
    token_file.write_text(f"prometheus {TOKEN}\n")
    token_file.chmod(0o600)
    credentials = tmp / "credentials"
    credentials.write_text(TOKEN)
    policy = Path(__file__).resolve().parent.parent / "ia" / "policies" / "observe.yaml"
    receiver_port, metrics_port = free_port(), free_port()
    env = ia_env(infra, prefix, policy, KAFKA_BOOTSTRAP_SERVERS=broker.address,
                 IA_INGEST_OTLP_TOPIC=f"{prefix}.otlp_metrics",
                 IA_INGEST_APP_ID=f"{prefix}-ingest", IA_RECEIVE_TOKEN_FILE=str(token_file),
                 IA_RECEIVE_DELIVERY_TIMEOUT_S="2", IA_TOPIC_PARTITIONS="2")
    ensure_topics(broker.address, [f"{prefix}.{t}" for t in (
        "telemetry", "decisions", "outcomes", "feedback", "telemetry.dlq", "approvals",
        "otlp_metrics", "cloudevents")], 2)
    procs = [IaProcess(["worker"], env, tmp / "worker.log").start(),
             IaProcess(["ingest"], env, tmp / "ingest.log").start(),
             IaProcess(["receive", "--port", str(receiver_port), "--metrics-port",
                        str(metrics_port)], env, tmp / "receive.log").start()]
    target = Target()
    tools: list[subprocess.Popen] = []
    am_port = free_port()
    if HAVE_ALERTMANAGER:
        (tmp / "alertmanager.yml").write_text(ALERTMANAGER_CONFIG.format(
            receiver=receiver_port, token=credentials))
        tools.append(_spawn([ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}",
                             f"--storage.path={tmp / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{am_port}",
                             "--cluster.listen-address=", "--log.level=warn"],
                            tmp / "alertmanager.log"))
    if HAVE_PROMETHEUS:
        (tmp / "rules.yml").write_text(RULES)
        (tmp / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(
            target=target.port, rules=tmp / "rules.yml", alertmanager=am_port,
            receiver=receiver_port, token=credentials))
        prom_port = free_port()
        tools.append(_spawn([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'prom-data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}",
                             "--log.level=warn"], tmp / "prometheus.log"))
    else:
        prom_port = 0
    info = {"prefix": prefix, "kafka": broker.address, "broker": broker, "tmp": tmp,
            "receiver": f"http://127.0.0.1:{receiver_port}", "target": target,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "prometheus": f"http://127.0.0.1:{prom_port}", "procs": procs}
    try:
        wait_until(lambda: _healthy(info["receiver"] + "/healthz"), 30, "ia receive")
        yield info
    finally:
        for tool in tools:
            tool.terminate()
        for proc in procs:  # all asked at once: each takes seconds to shut down
            if proc.alive():
                proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:  # nothing of theirs is checked after this: no long grace
            proc.stop(timeout=3)
        for tool in tools:
            _stop(tool)
        target.close()
        broker.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _logs(stack) -> str:  # type: ignore[no-untyped-def]
    tails = [f"--- {p.log.name}\n{p.tail(15)}" for p in stack["procs"]]
    for name in ("prometheus.log", "alertmanager.log"):
        path = stack["tmp"] / name
        if path.exists():
            tails.append(f"--- {name}\n{path.read_text(errors='replace')[-1500:]}")
    return "\n".join(tails)


def _decisions(stack, until, timeout_s: float = 60.0) -> list[dict]:  # type: ignore[no-untyped-def]
    return read_topic(stack["kafka"], f"{stack['prefix']}.decisions", until=until,
                      timeout_s=timeout_s)


def _produce(stack, topic: str, messages: list[tuple[dict, bytes | None, bytes]]) -> None:  # type: ignore[no-untyped-def]
    p = Producer({"bootstrap.servers": stack["kafka"], "acks": "all"})
    for headers, key, value in messages:
        p.produce(f"{stack['prefix']}.{topic}", key=key, value=value,
                  headers=list(headers.items()))
    assert p.flush(30) == 0


# --- OpenTelemetry over Kafka -------------------------------------------------------------


def test_otlp_exports_in_both_encodings_become_decisions(stack) -> None:  # type: ignore[no-untyped-def]
    services = {enc: OtlpService(f"otlp-{enc.split('_')[1]}", instance="pod-1")
                for enc in ("otlp_proto", "otlp_json")}
    records = []
    for round_ in range(3):
        for enc, svc in services.items():
            svc.meter.create_counter("orders").add(5 + round_, {"shop": "eu"})
            svc.meter.create_gauge("queue_depth").set(10 + round_)
            svc.meter.create_histogram("latency_ms").record(20.0 + round_)
            records.append(({}, None, svc.value(enc)))  # as the Collector: no key, no headers
        time.sleep(0.02)  # event times are milliseconds
    records.append(({}, None, b"\x0a\x05broken"))
    _produce(stack, "otlp_metrics", records)

    want = {(f"otlp-{e}", m) for e in ("proto", "json") for m in (
        'queue_depth{service.instance.id="pod-1"}',
        'orders_rate{service.instance.id="pod-1",shop="eu"}',
        'latency_ms_p95{service.instance.id="pod-1"}',
        'latency_ms_mean{service.instance.id="pod-1"}')}

    def seen(ds: list[dict]) -> set:
        return {(d["entity"], d["metric"]) for d in ds} & want

    decided = _decisions(stack, lambda ds: seen(ds) == want)
    assert seen(decided) == want, _logs(stack)
    gauges = sorted(d["value"] for d in decided
                    if d["entity"] == "otlp-json" and d["metric"].startswith("queue_depth"))
    assert gauges == [10.0, 11.0, 12.0]
    dead = read_topic(stack["kafka"], f"{stack['prefix']}.telemetry.dlq",
                      until=lambda ds: any(d["reason"] == "undecodable_otlp" for d in ds),
                      timeout_s=30)
    assert any(d["reason"] == "undecodable_otlp" and d["source_topic"].endswith("otlp_metrics")
               for d in dead)
    for svc in services.values():
        svc.close()


# --- CloudEvents ----------------------------------------------------------------------------


def test_cloudevents_in_both_modes_feed_the_context_features(stack) -> None:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    deploy = CloudEvent({"id": "deploy-1", "source": "ci://pipelines", "specversion": "1.0",
                         "type": "dev.cdevents.service.deployed.0.2.0", "subject": "ce-svc",
                         "time": now - dt.timedelta(seconds=40),
                         "datacontenttype": "application/json"}, {"version": "2.0.1"})
    change = CloudEvent({"id": "change-7", "source": "cfg://flags", "specversion": "1.0",
                         "type": "com.acme.config.changed", "subject": "ce-svc",
                         "time": now - dt.timedelta(seconds=20),
                         "datacontenttype": "application/json"}, {"flag": "checkout-v2"})
    binary, structured = ce_kafka.to_binary_event(deploy), ce_kafka.to_structured_event(change)
    _produce(stack, "cloudevents", [(binary.headers, b"ce-svc", binary.value),
                                    (structured.headers, b"ce-svc", structured.value)])
    events = _decisions(stack, lambda ds: {d["metric"] for d in ds if d["entity"] == "ce-svc"}
                        >= {"deploy", "config_change"})
    assert {d["metric"] for d in events if d["entity"] == "ce-svc"} >= {"deploy",
                                                                          "config_change"}
    # A sample after both: its decision knows how long ago each happened.
    svc = OtlpService("ce-svc")
    svc.meter.create_gauge("cpu").set(0.7)
    _produce(stack, "otlp_metrics", [({}, None, svc.value("otlp_proto"))])
    decided = _decisions(stack, lambda ds: any(d["entity"] == "ce-svc" and
                                               d["metric"].startswith("cpu") for d in ds))
    sample = next(d for d in decided if d["entity"] == "ce-svc" and d["metric"].startswith("cpu"))
    f = sample["features"]
    assert 39 <= f["seconds_since_deploy"] < 60 and f["seconds_since_deploy"] < NEVER_S
    assert 19 <= f["seconds_since_config_change"] < 40
    assert f["deploy_within_15m"] == 1.0
    svc.close()


# --- Prometheus and Alertmanager ------------------------------------------------------------


@needs_prometheus
def test_prometheus_remote_write_becomes_decisions(stack) -> None:  # type: ignore[no-untyped-def]
    def scraped(ds: list[dict]) -> bool:
        return len({d["ts"] for d in ds if d["entity"] == "ia-target"
                    and d["metric"].startswith("ia_test_requests_total")}) >= 3

    decided = _decisions(stack, scraped)
    assert scraped(decided), _logs(stack)
    sample = next(d for d in decided if d["entity"] == "ia-target"
                  and d["metric"].startswith("ia_test_value"))
    assert sample["metric"] == f'ia_test_value{{instance="127.0.0.1:{stack["target"].port}"}}'
    text = httpx.get(stack["metrics"], timeout=5).text
    assert 'ia_receive_requests_total{code="204",path="/api/v1/write"}' in text


@needs_alertmanager
def test_an_alert_firing_then_resolved_becomes_two_events(stack) -> None:  # type: ignore[no-untyped-def]
    telemetry = f"{stack['prefix']}.telemetry"
    stack["target"].value = 9.0

    def alerts(records: list[dict]) -> list[dict]:
        return [r for r in records if r.get("metric") == "alert:IaTestHigh"]

    def statuses(records: list[dict]) -> list[str]:
        return [r["labels"]["alert.status"] for r in alerts(records)]

    firing = read_topic(stack["kafka"], telemetry, until=lambda rs: "firing" in statuses(rs),
                        timeout_s=60)
    assert "firing" in statuses(firing), _logs(stack)
    stack["target"].value = 1.0
    both = read_topic(stack["kafka"], telemetry, until=lambda rs: "resolved" in statuses(rs),
                      timeout_s=60)
    assert statuses(both) == ["firing", "resolved"], _logs(stack)
    fire, resolve = alerts(both)
    assert fire["kind"] == resolve["kind"] == "event"
    assert (fire["entity"], fire["value"], resolve["value"]) == ("ia-target", 1.0, 0.0)
    assert fire["labels"]["severity"] == "page"
    assert fire["labels"]["annotation.summary"].startswith("ia_test_value is 9")
    assert fire["labels"]["alert.fingerprint"] == resolve["labels"]["alert.fingerprint"]
    assert resolve["ts"] >= fire["ts"]
    decided = _decisions(stack, lambda ds: {d["event_id"] for d in ds} >=
                         {fire["event_id"], resolve["event_id"]})
    assert {d["event_id"] for d in decided} >= {fire["event_id"], resolve["event_id"]}


# --- the broker away (last: it pauses the module's broker) ----------------------------------


def _prometheus_samples(stack, metric: str, since_s: float, until_s: float) -> set[int]:  # type: ignore[no-untyped-def]
    """The times (ms) of the samples Prometheus stored for ``metric`` in a window."""
    window = int(until_s - since_s) + 1
    resp = httpx.get(f"{stack['prometheus']}/api/v1/query",
                     params={"query": f"{metric}[{window}s]", "time": until_s}, timeout=10)
    result = resp.json()["data"]["result"]
    return {round(float(t) * 1000) for series in result for t, _v in series["values"]
            if since_s * 1000 <= float(t) * 1000}


@needs_prometheus
def test_503_while_the_broker_is_away_then_every_sample_is_decided_once(stack) -> None:  # type: ignore[no-untyped-def]
    # Write-ahead: remote write must be flowing before the pause.
    _decisions(stack, lambda ds: any(d["entity"] == "ia-target" for d in ds))
    started = time.time()
    os.kill(stack["broker"].pid, signal.SIGSTOP)
    try:
        wait_until(lambda: 'code="503",path="/api/v1/write"' in _metrics(stack), 30,
                   "a 503 answer to Prometheus while the broker is paused")
    finally:
        os.kill(stack["broker"].pid, signal.SIGCONT)
    resumed = time.time()
    # Prometheus' own retries deliver what was refused; every sample in and around the
    # pause is decided.
    want = _prometheus_samples(stack, "ia_test_requests_total", started - 2, resumed + 2)
    assert len(want) >= 3

    def decided_times(ds: list[dict]) -> set[int]:
        return {d["ts"] for d in ds if d["entity"] == "ia-target"
                and d["metric"].startswith("ia_test_requests_total")}

    time.sleep(2)  # the samples scraped until resumed + 2 s
    decided = _decisions(stack, lambda ds: decided_times(ds) >= want, timeout_s=90)
    assert want - decided_times(decided) == set(), _logs(stack)
    ids: dict[str, set[str]] = defaultdict(set)
    for d in decided:
        ids[d["event_id"]].add(d["decision_id"])
    assert all(len(v) == 1 for v in ids.values()), "a sample with two decision ids"


def _metrics(stack) -> str:  # type: ignore[no-untyped-def]
    try:
        return httpx.get(stack["metrics"], timeout=2).text
    except httpx.HTTPError:
        return ""


def test_the_receiver_refuses_requests_without_the_token(stack) -> None:  # type: ignore[no-untyped-def]
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}):
        resp = httpx.post(stack["receiver"] + "/alertmanager", json={"alerts": []},
                          headers=headers, timeout=5)
        assert resp.status_code == 401
