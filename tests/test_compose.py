"""Structural checks of the Docker production stack (Dockerfile, compose/).

Nothing here needs a Docker engine: the compose file, the Prometheus and
Grafana provisioning, the dashboards and the policy are parsed and
cross-checked against each other and against the code (settings, CLI,
metrics registered by ``ia.core.metrics``). ``docker compose config`` runs too
when the docker CLI and its compose plugin are installed (no engine needed).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import ia.core.metrics
from ia.cli import main as cli_main
from ia.core.settings import Settings, Topics
from ia.decisions.policy import Policy

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PROMETHEUS_FILE = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
POLICY_FILE = COMPOSE_DIR / "policy.yaml"
REQUIRED_SERVICES = {"kafka", "topics", "redis", "worker", "actuator", "prometheus", "grafana"}
APP_SERVICES = {"worker": "worker", "actuator": "actuate"}  # service -> ia subcommand

# ---------------------------------------------------------------- helpers

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Apply compose variable interpolation (``${X:-default}``, ``$$``) recursively."""
    env = env or {}
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            name, op, arg = m.group(1), m.group(2), m.group(3)
            current = env.get(name)
            unset = not current if op in (":-", ":?") else current is None
            if not unset:
                return current or ""
            if op and op.endswith("?"):
                raise AssertionError(f"required variable {name} is unset: {arg}")
            return arg if op else ""
        return _INTERPOLATION.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    return value


def load_compose() -> dict:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(raw, dict) and isinstance(raw.get("services"), dict)
    return interpolate(raw)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_of(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts_of(service: dict) -> list[dict]:
    """Volumes as {type, source, target, read_only} (short and long syntax)."""
    out = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            parts = vol.split(":")
            source, target = parts[0], parts[1] if len(parts) > 1 else parts[0]
            mode = parts[2] if len(parts) > 2 else ""
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target,
                        "read_only": "ro" in mode.split(",")})
        else:
            out.append({"type": vol.get("type", "volume"), "source": vol.get("source", ""),
                        "target": vol["target"], "read_only": bool(vol.get("read_only"))})
    return out


def mount_for(service: dict, host_path: Path) -> dict:
    for m in mounts_of(service):
        if m["type"] == "bind" and (COMPOSE_DIR / m["source"]).resolve() == host_path.resolve():
            return m
    raise AssertionError(f"{host_path.relative_to(ROOT)} is not mounted")


def published_ports(service: dict) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out[int(p["target"])] = int(p.get("published", p["target"]))
        else:
            parts = str(p).split(":")
            container = int(parts[-1].split("/")[0])
            out[container] = int(parts[-2]) if len(parts) > 1 else container
    return out


def _ia_metric_families() -> set[str]:
    return {d.name for obj in vars(ia.core.metrics).values()
            if isinstance(obj, MetricWrapperBase) for d in obj.describe()}


def registered_metric_names() -> set[str]:
    """Sample names Prometheus sees for the metrics ``ia.core.metrics`` registers."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count",
                                                                 "_created"],
                "gauge": [""], "summary": ["", "_sum", "_count", "_created"], "info": ["_info"],
                "stateset": [""], "enum": [""], "gaugehistogram": ["_bucket", "_gsum",
                                                                   "_gcount"]}
    ours = _ia_metric_families()
    names = set()
    collectors = {c for cs in ia.core.metrics.FAMILIES.values() for c in cs}
    for family in (f for c in collectors for f in c.collect()):
        if family.name in ours:
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                    "and", "or", "unless", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels, keywords excluded)."""
    s = re.sub(r"\$__\w+|\$\{[^}]*\}|\$\w+", " ", expr)  # Grafana variables
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', s)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() not in _PROMQL_KEYWORDS:
            names.add(m.group())
    return names


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels") or []))
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


# ---------------------------------------------------------------- compose


def test_required_services_exist(services: dict) -> None:
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)


def test_images_are_pinned(services: dict) -> None:
    for name, svc in services.items():
        if "build" in svc:
            ctx = svc["build"]["context"] if isinstance(svc["build"], dict) else svc["build"]
            dockerfile = (svc["build"].get("dockerfile", "Dockerfile")
                          if isinstance(svc["build"], dict) else "Dockerfile")
            assert (COMPOSE_DIR / ctx / dockerfile).resolve() == ROOT / "Dockerfile", name
            continue
        image = svc.get("image", "")
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
    assert services["kafka"]["image"] == "apache/kafka:3.9.0"
    assert services["redis"]["image"].startswith("redis:7.4")
    assert services["prometheus"]["image"] == "prom/prometheus:v2.55.1"
    assert services["grafana"]["image"] == "grafana/grafana:11.3.0"


def test_kafka_runs_in_kraft_mode(services: dict) -> None:
    assert not any("zookeeper" in n or "zookeeper" in str(s.get("image", ""))
                   for n, s in services.items())
    env = env_of(services["kafka"])
    assert not any("ZOOKEEPER" in k for k in env)
    roles = set(env["KAFKA_PROCESS_ROLES"].split(","))
    assert {"broker", "controller"} <= roles
    assert env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    listeners = dict(x.split("://") for x in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(x.split("://") for x in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092"
    assert advertised["EXTERNAL"] == "localhost:9094"
    assert {"PLAINTEXT", "CONTROLLER", "EXTERNAL"} <= set(listeners)
    protocols = dict(x.split(":") for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert published_ports(services["kafka"]).get(9094) == 9094
    assert "kafka-broker-api-versions.sh" in " ".join(services["kafka"]["healthcheck"]["test"])
    data = [m for m in mounts_of(services["kafka"]) if m["target"] == env["KAFKA_LOG_DIRS"]]
    assert data and data[0]["type"] == "volume", "Kafka log dirs must be on a volume"


def test_topics_service_creates_every_topic(services: dict) -> None:
    topics = services["topics"]
    script = " ".join(command_of(topics))
    env = env_of(topics)
    for topic in Topics(Settings(_env_file=None).topic_prefix).all():
        assert topic in env.get("TOPICS", "").split() or topic in script, topic
    assert "--create" in script and "--if-not-exists" in script
    assert env["PARTITIONS"] == "8"  # ${IA_TOPIC_PARTITIONS:-8}
    assert "$PARTITIONS" in script  # $$ in the file: expanded by the container's shell
    assert env["PARTITIONS"] == env_of(services["worker"])["IA_TOPIC_PARTITIONS"]
    assert depends_of(topics) == {"kafka": "service_healthy"}
    assert str(topics.get("restart", "no")) == "no"
    assert interpolate(yaml.safe_load(COMPOSE_FILE.read_text())["services"]["topics"]
                       ["environment"]["PARTITIONS"], {"IA_TOPIC_PARTITIONS": "16"}) == "16"


def test_redis_is_persistent(compose: dict, services: dict) -> None:
    redis = services["redis"]
    cmd = command_of(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    # every write on disk before its reply: an action's claim outlives any crash
    assert cmd[cmd.index("--appendfsync") + 1] == "always"
    data = [m for m in mounts_of(redis) if m["target"] == "/data"]
    assert data and data[0]["type"] == "volume"
    assert data[0]["source"] in (compose.get("volumes") or {})
    assert "redis-cli ping | grep -q PONG" in redis["healthcheck"]["test"][-1]


def test_redis_requires_the_password_of_a_docker_secret(compose: dict, services: dict) -> None:
    """S3: no client reaches Redis without the password, which comes from a Docker secret
    and is in neither the compose file, a command line nor an environment variable."""
    secret = "ia_redis_password"
    path = f"/run/secrets/{secret}"
    assert compose["secrets"][secret]["file"] == f"./secrets/{secret}"
    redis = services["redis"]
    assert secret in redis["secrets"]
    wrapper = " ".join(str(part) for part in redis["entrypoint"])
    assert "requirepass" in wrapper and f"cat {path}" in wrapper
    assert "docker-entrypoint.sh" in wrapper and command_of(redis)[0] == "redis-server"
    assert f"cat {path}" in redis["healthcheck"]["test"][-1]  # the health check logs in
    clients = {"worker", "actuator", "audit-writer", "api"}
    for name in clients:
        svc = services[name]
        assert env_of(svc)["IA_REDIS_PASSWORD_FILE"] == path, name
        assert secret in svc["secrets"], name
        assert "PASSWORD=" not in json.dumps(env_of(svc)) and "requirepass" not in str(svc)


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_service(services: dict, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = services[name]
    deps = depends_of(svc)
    assert deps["kafka"] == "service_healthy" and deps["redis"] == "service_healthy"
    assert deps.get("topics") == "service_completed_successfully"
    assert "healthcheck" in services["kafka"] and "healthcheck" in services["redis"]

    # The environment is valid for the real settings model.
    env = env_of(svc)
    for key in [*Settings.model_fields, "KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"]:
        monkeypatch.delenv(key.upper(), raising=False)
        monkeypatch.delenv(f"IA_{key.upper()}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings(_env_file=None)
    kafka_env = env_of(services["kafka"])
    internal = dict(x.split("://") for x in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert s.kafka.bootstrap_servers == internal["PLAINTEXT"]
    assert s.redis.url and s.redis.url.startswith("redis://redis:6379/")
    assert s.metrics_host == "0.0.0.0", "metrics must bind all interfaces in a container"
    assert s.metrics_port > 0
    assert str(s.metrics_port) in [str(p) for p in svc.get("expose", [])]
    assert s.topic_partitions >= 1

    # The command is a real `ia` subcommand, and the policy it names is mounted.
    cmd = command_of(svc)
    sub = APP_SERVICES[name]
    assert cmd[0] == sub and sub in cli_main.commands
    options = {o for p in cli_main.commands[sub].params for o in getattr(p, "opts", [])}
    assert set(cmd[1::2]) <= options, cmd
    policy_path = cmd[cmd.index("--policy") + 1]
    assert str(s.policy_file) == policy_path
    mount = mount_for(svc, POLICY_FILE)
    assert mount["target"] == policy_path and mount["read_only"]


def test_worker_is_scalable(services: dict) -> None:
    worker = services["worker"]
    replicas = worker["deploy"]["replicas"]
    assert int(replicas) >= 2
    assert "container_name" not in worker, "a fixed container name prevents --scale"
    assert not worker.get("ports"), "host ports prevent --scale; Prometheus scrapes by DNS"
    assert int(env_of(worker)["IA_TOPIC_PARTITIONS"]) >= int(replicas)


def test_prometheus_scrapes_every_replica(services: dict) -> None:
    prom = services["prometheus"]
    cmd = command_of(prom)
    config_path = next(c.split("=", 1)[1] for c in cmd if c.startswith("--config.file="))
    assert mount_for(prom, PROMETHEUS_FILE)["target"] == config_path
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    scraped: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type", "SRV") == "A", "plain compose has no SRV records"
            for n in sd["names"]:
                assert n in services, f"job {job['job_name']} resolves unknown service {n}"
                scraped.setdefault(n, set()).add(int(sd["port"]))
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                host, _, port = target.rpartition(":")
                if host != "localhost":
                    scraped.setdefault(host, set()).add(int(port))
    for name in APP_SERVICES:
        port = int(env_of(services[name])["IA_METRICS_PORT"])
        assert scraped.get(name) == {port}, f"{name} metrics on {port}, scraped {scraped}"


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict,
                                                          services: dict) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for m in mounts_of(svc):
            if m["type"] == "bind":
                assert (COMPOSE_DIR / m["source"]).exists(), f"{name}: {m['source']} missing"
            else:
                assert m["source"] in declared, f"{name}: volume {m['source']} not declared"


# ---------------------------------------------------------------- grafana


def test_grafana_provisioning(services: dict) -> None:
    grafana = services["grafana"]
    prov_target = mount_for(grafana, GRAFANA_DIR / "provisioning")["target"]
    assert prov_target == "/etc/grafana/provisioning"
    dash_target = mount_for(grafana, DASHBOARD_DIR)["target"]

    ds_doc = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml")
                            .read_text())
    (ds,) = [d for d in ds_doc["datasources"] if d["type"] == "prometheus"]
    assert ds["url"] == "http://prometheus:9090" and ds.get("uid")

    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/provider.yml")
                               .read_text())["providers"]
    paths = {PurePosixPath(p["options"]["path"]) for p in providers if p["type"] == "file"}
    assert paths == {PurePosixPath(dash_target)}

    home = PurePosixPath(env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == PurePosixPath(dash_target)
    assert (DASHBOARD_DIR / home.name).is_file()


def test_promql_name_extraction() -> None:
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (le, stage) '
        '(rate(ia_stage_duration_seconds_bucket{stage=~"a|b"}[$__rate_interval])))'
    ) == {"ia_stage_duration_seconds_bucket"}
    assert promql_metric_names(
        "sum(rate(a_total[5m] offset 1h)) / on (instance) group_left sum(b) * 1e3 > bool 2"
    ) == {"a_total", "b"}
    assert promql_metric_names('sum without (job) (up{job="x"})') == {"up"}


def test_dashboards() -> None:
    boards = dashboards()
    assert {"executive.json", "oncall.json", "debug.json"} <= set(boards)
    ds_doc = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml")
                            .read_text())
    ds_uids = {d["uid"] for d in ds_doc["datasources"]}
    known = registered_metric_names()
    assert {"ia_outcomes_total", "ia_stage_duration_seconds_bucket"} <= known
    assert "ia_outcomes" not in known and "ia_stage_duration_seconds" not in known

    uids = [b["uid"] for b in boards.values()]
    titles = [b["title"] for b in boards.values()]
    assert len(set(uids)) == len(uids) and all(uids)
    assert len(set(titles)) == len(titles) and all(titles)
    used: set[str] = set()
    for file, board in boards.items():
        assert board["schemaVersion"] >= 36, file
        panels = all_panels(board["panels"])
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{file}: duplicate panel ids"
        for p in panels:
            if p["type"] == "row":
                continue
            assert p.get("title") and p.get("description"), f"{file}: panel {p['id']}"
            assert p.get("targets"), f"{file}: panel {p['title']!r} has no query"
            for t in p["targets"]:
                ds = t.get("datasource") or p.get("datasource")
                assert ds["uid"] in ds_uids, f"{file}: {p['title']!r} uses {ds}"
                names = promql_metric_names(t["expr"])
                assert names, f"{file}: {p['title']!r}: no metric in {t['expr']!r}"
                unknown = names - known
                assert not unknown, \
                    f"{file}: {p['title']!r}: {sorted(unknown)} not in ia.core.metrics"
                used |= names
    # The dashboards show what they promise, and every metric a process exports.
    assert {"ia_outcomes_total", "ia_feedback_total", "ia_decisions_total",
            "ia_stage_duration_seconds_bucket", "ia_event_time_lag_seconds_bucket",
            "ia_record_to_decision_seconds_bucket", "ia_decisions_rejected_total",
            "ia_checkpoints_rejected_total", "ia_offset_gaps_total",
            "ia_dlq_records_total", "ia_batch_size_bucket", "ia_batch_retries_total"} <= used
    unshown = sorted(f for f in _ia_metric_families() if not any(n.startswith(f) for n in used))
    assert not unshown, f"metrics on no dashboard in compose/grafana/dashboards: {unshown}"


# ---------------------------------------------------------------- policy, image


def test_compose_policy_validates() -> None:
    policy = Policy.from_file(POLICY_FILE)
    assert policy.doc.rules
    # The commented example rule is valid once uncommented.
    lines = POLICY_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("  # - name:"))
    block = []
    for line in lines[start:]:
        if not (line.startswith("  # - ") or line.startswith("  #   ")):
            break
        block.append("  " + line[4:])
    example = Policy.from_text("version: 1\nrules:\n" + "\n".join(block), "<example>")
    assert [r.action.type for r in example.doc.rules if r.action] == ["webhook"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    froms = [i for i, (w, _) in enumerate(instructions) if w == "FROM"]
    final = instructions[froms[-1]:]
    assert all(rest.split()[0] == "python:3.11-slim" for w, rest in instructions if w == "FROM")
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    entry = [rest for w, rest in final if w == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["ia"]
    runs = " ".join(rest for w, rest in instructions if w == "RUN")
    assert "pip wheel" in runs or "pip install" in runs
    assert not re.search(r"pip install[^&;]*(\s-e\s|--editable)", runs), "must not be editable"
    for w, rest in instructions:
        if w == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text()
               .splitlines() if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", ".ia"} <= ignored


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                             timeout=60)
    if version.returncode != 0:
        reason = ((version.stderr or version.stdout).strip().splitlines() or ["?"])[0]
        pytest.skip(f"docker compose plugin not available: {reason[:200]}")
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
