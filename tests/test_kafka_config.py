"""Kafka client configuration: one factory (:mod:`ia.core.kafka`) turns the settings into
librdkafka and aiokafka/Faust configurations for every protocol; secrets stay masked and
contradictory settings are refused with the variables to fix.  No broker is needed."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import shutil
import ssl
import subprocess
import tomllib
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from click.testing import CliRunner
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import ValidationError

from ia.cli import main
from ia.core.errors import ConfigError
from ia.core.kafka import LIBRDKAFKA_LOG, client_config, faust_app_options
from ia.core.settings import KafkaSettings, Settings, load
from ia.streams.app import make_app

ROOT = Path(__file__).resolve().parent.parent
SCRAM = {"KAFKA_BOOTSTRAP_SERVERS": "k1:9093,k2:9093", "IA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
         "IA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "IA_KAFKA_SASL_USERNAME": "ia",
         "IA_KAFKA_SASL_PASSWORD": "hunter2-secret"}


def kafka_of(env: dict[str, str]) -> KafkaSettings:
    return Settings(_env=env).kafka


def without_bootstrap(aiokafka_kwargs: dict) -> dict:
    return {k: v for k, v in aiokafka_kwargs.items() if k != "bootstrap_servers"}


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate (as CA and as client certificate) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("pem")
    cert, key = folder / "ca.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=ia-test-ca", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return {"cert": cert, "key": key}


# --------------------------------------------------------------------------- conversions


def test_plaintext_is_the_bootstrap_servers_only() -> None:
    kafka = kafka_of({"KAFKA_BOOTSTRAP_SERVERS": "k1:9092, k2:9092"})
    assert kafka.librdkafka() == {"bootstrap.servers": "k1:9092, k2:9092",
                                  "security.protocol": "PLAINTEXT"}
    assert kafka.aiokafka() == {"bootstrap_servers": ["k1:9092", "k2:9092"],
                                "security_protocol": "PLAINTEXT"}
    assert faust_app_options(kafka) == {"broker": "kafka://k1:9092;kafka://k2:9092"}


def test_sasl_ssl_with_scram() -> None:
    kafka = kafka_of(SCRAM)
    assert kafka.librdkafka() == {
        "bootstrap.servers": "k1:9093,k2:9093", "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "ia",
        "sasl.password": "hunter2-secret"}
    auth = kafka.aiokafka()
    assert without_bootstrap(auth) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "ia", "sasl_plain_password": "hunter2-secret",
        "ssl_context": auth["ssl_context"]}
    context = auth["ssl_context"]
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


def test_sasl_plaintext_has_no_tls() -> None:
    kafka = kafka_of({**SCRAM, "IA_KAFKA_SECURITY_PROTOCOL": "sasl_plaintext",
                      "IA_KAFKA_SASL_MECHANISM": "plain"})
    assert kafka.librdkafka()["security.protocol"] == "SASL_PLAINTEXT"
    assert without_bootstrap(kafka.aiokafka()) == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "ia", "sasl_plain_password": "hunter2-secret"}


def test_ssl_with_a_ca_and_a_client_certificate(pem: dict[str, Path]) -> None:
    kafka = kafka_of({"KAFKA_BOOTSTRAP_SERVERS": "k:9093", "IA_KAFKA_SECURITY_PROTOCOL": "SSL",
                      "IA_KAFKA_SSL_CA_LOCATION": str(pem["cert"]),
                      "IA_KAFKA_SSL_CERTIFICATE_LOCATION": str(pem["cert"]),
                      "IA_KAFKA_SSL_KEY_LOCATION": str(pem["key"])})
    assert kafka.librdkafka() == {
        "bootstrap.servers": "k:9093", "security.protocol": "SSL",
        "ssl.ca.location": str(pem["cert"]), "ssl.certificate.location": str(pem["cert"]),
        "ssl.key.location": str(pem["key"])}
    context = kafka.aiokafka()["ssl_context"]
    subjects = [dict(rdn[0] for rdn in ca["subject"]) for ca in context.get_ca_certs()]
    assert {"commonName": "ia-test-ca"} in subjects


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    kafka = kafka_of({"KAFKA_BOOTSTRAP_SERVERS": "k:9093", "IA_KAFKA_SECURITY_PROTOCOL": "SSL",
                      "IA_KAFKA_SSL_CA_LOCATION": str(tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="TLS files"):
        kafka.aiokafka()


def test_the_password_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("from-a-file\n")
    env = {k: v for k, v in SCRAM.items() if k != "IA_KAFKA_SASL_PASSWORD"}
    kafka = kafka_of({**env, "IA_KAFKA_SASL_PASSWORD_FILE": str(secret)})
    assert kafka.librdkafka()["sasl.password"] == "from-a-file"
    assert kafka.aiokafka()["sasl_plain_password"] == "from-a-file"
    secret.unlink()
    with pytest.raises(ConfigError, match="IA_KAFKA_SASL_PASSWORD_FILE: cannot read"):
        kafka.librdkafka()


def test_client_settings_lie_over_the_connection() -> None:
    assert client_config(kafka_of(SCRAM), {"linger.ms": 5, "acks": "all"}) == {
        **kafka_of(SCRAM).librdkafka(), "logger": LIBRDKAFKA_LOG, "linger.ms": 5,
        "acks": "all"}
    assert client_config("h:1") == {"bootstrap.servers": "h:1",
                                    "security.protocol": "PLAINTEXT",
                                    "logger": LIBRDKAFKA_LOG}


def test_librdkafka_noise_is_summarised(caplog: pytest.LogCaptureFixture) -> None:
    noise = "[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 " \
            "failed: Connection refused (after {}ms in state CONNECT)"
    log = type(LIBRDKAFKA_LOG)()  # the shared one remembers what earlier tests logged
    with caplog.at_level(logging.WARNING, logger="ia.kafka"):
        for i in range(300):
            log.error(noise.format(i))
        log.error("[thrd:main]: another kind of message")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        "librdkafka: [thrd:127.0.0.1:9/bootstrap]", "librdkafka: [thrd:main]: another kind of"]


@pytest.mark.parametrize("env", [SCRAM, {**SCRAM, "IA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
                                 {"KAFKA_BOOTSTRAP_SERVERS": "k:9093",
                                  "IA_KAFKA_SECURITY_PROTOCOL": "SSL"}],
                         ids=["sasl_ssl", "sasl_plaintext", "ssl"])
def test_faust_and_aiokafka_get_the_same_connection(env: dict[str, str]) -> None:
    kafka = kafka_of(env)
    options = faust_app_options(kafka)
    faust_auth = credentials_to_aiokafka_auth(options["broker_credentials"])
    expected = without_bootstrap(kafka.aiokafka())
    assert {k: v for k, v in faust_auth.items() if k != "ssl_context"} == {
        k: v for k, v in expected.items() if k != "ssl_context"}
    assert isinstance(faust_auth.get("ssl_context"), ssl.SSLContext) == kafka.uses_tls


def test_the_apps_faust_gets_the_credentials() -> None:
    app = make_app(Settings(_env={**SCRAM, "REDIS_URL": "redis://r:6379/0"}), "ia-test")
    auth = credentials_to_aiokafka_auth(app.conf.broker_credentials, app.conf.ssl_context)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_username"]) == (
        "SASL_SSL", "SCRAM-SHA-512", "ia")
    assert [str(url) for url in app.conf.broker] == ["kafka://k1:9093", "kafka://k2:9093"]


@pytest.mark.parametrize("env", [SCRAM, {"KAFKA_BOOTSTRAP_SERVERS": "k:9093",
                                         "IA_KAFKA_SECURITY_PROTOCOL": "SSL"}],
                         ids=["sasl_ssl", "ssl"])
def test_aiokafka_accepts_the_connection(env: dict[str, str]) -> None:
    async def construct() -> None:
        AIOKafkaProducer(**kafka_of(env).aiokafka())  # validates, connects only on start()

    asyncio.run(construct())


# --------------------------------------------------------------------------- secrets


def test_secrets_are_masked_in_repr() -> None:
    kafka = kafka_of({**SCRAM, "IA_KAFKA_SSL_CERTIFICATE_LOCATION": "/cert.pem",
                      "IA_KAFKA_SSL_KEY_LOCATION": "/key.pem",
                      "IA_KAFKA_SSL_KEY_PASSWORD": "key-secret"})
    assert "secret" not in repr(kafka) and "secret" not in str(kafka)
    assert "secret" not in repr(Settings(_env=SCRAM))


def test_secrets_are_not_in_validation_errors() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(_env={**SCRAM, "IA_KAFKA_SASL_MECHANISM": "GSSAPI"})
    assert "IA_KAFKA_SASL_MECHANISM" not in str(refused.value)  # a pydantic message
    assert "secret" not in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        Settings(_env={**SCRAM, "IA_KAFKA_SSL_KEY_PASSWORD": "key-secret"})
    assert "IA_KAFKA_SSL_KEY_PASSWORD needs" in str(refused.value)
    assert "secret" not in str(refused.value)


def test_ia_config_masks_kafka_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SCRAM.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.stdout
    values = {r["setting"]: r["value"] for r in json.loads(result.stdout)["settings"]}
    assert values["kafka.sasl_password"] == "********"
    assert (values["kafka.security_protocol"], values["kafka.sasl_username"]) == ("SASL_SSL", "ia")


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(("env", "message"), [
    ({"IA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"},
     "IA_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs IA_KAFKA_SASL_MECHANISM, "
     "IA_KAFKA_SASL_USERNAME, IA_KAFKA_SASL_PASSWORD (or IA_KAFKA_SASL_PASSWORD_FILE)"),
    ({**SCRAM, "IA_KAFKA_SASL_PASSWORD_FILE": "/run/secrets/kafka"},
     "set IA_KAFKA_SASL_PASSWORD or IA_KAFKA_SASL_PASSWORD_FILE, not both"),
    ({"IA_KAFKA_SASL_USERNAME": "ia"},
     "IA_KAFKA_SASL_USERNAME set but IA_KAFKA_SECURITY_PROTOCOL=PLAINTEXT uses no SASL"),
    ({**SCRAM, "IA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
      "IA_KAFKA_SSL_CA_LOCATION": "/ca.pem"},
     "IA_KAFKA_SSL_CA_LOCATION set but IA_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT uses no TLS"),
    ({"IA_KAFKA_SECURITY_PROTOCOL": "SSL", "IA_KAFKA_SSL_KEY_LOCATION": "/key.pem"},
     "IA_KAFKA_SSL_CERTIFICATE_LOCATION and IA_KAFKA_SSL_KEY_LOCATION go together"),
    ({"IA_KAFKA_SECURITY_PROTOCOL": "SSL", "IA_KAFKA_SSL_KEY_PASSWORD": "x"},
     "IA_KAFKA_SSL_KEY_PASSWORD needs IA_KAFKA_SSL_KEY_LOCATION"),
    ({**SCRAM, "IA_KAFKA_SASL_MECHANISM": "GSSAPI"},
     "kafka.sasl_mechanism (IA_KAFKA_SASL_MECHANISM)"),
    ({"IA_KAFKA_SECURITY_PROTOCOL": "TLS"},
     "kafka.security_protocol (IA_KAFKA_SECURITY_PROTOCOL)"),
], ids=["sasl_without_credentials", "password_twice", "sasl_on_plaintext", "tls_file_without_tls",
        "key_without_certificate", "key_password_without_key", "unknown_mechanism",
        "unknown_protocol"])
def test_contradictory_settings_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                            env: dict[str, str], message: str) -> None:
    monkeypatch.chdir(tmp_path)  # no .env file
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load()
    assert message in str(refused.value)


# --------------------------------------------------------------------------- one factory


def _package_sources() -> list[Path]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = {"ia", *pyproject["tool"]["setuptools"]["package-dir"].values()} - {""}
    return [p for folder in sorted(folders) for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts]


def _hand_built_clients(path: Path) -> list[str]:
    """Kafka client configuration written outside the factory: a ``bootstrap.servers``
    key, a client class called directly, or a Faust app given its brokers."""
    clients = {"Producer", "Consumer", "AdminClient", "AIOKafkaProducer", "AIOKafkaConsumer",
               "AIOKafkaAdminClient"}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value == "bootstrap.servers":
            found.append(f"line {node.lineno}: 'bootstrap.servers'")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in clients:
                found.append(f"line {node.lineno}: {name}(...)")
            if name == "App":
                found += [f"line {node.lineno}: App({kw.arg}=...)" for kw in node.keywords
                          if kw.arg in ("broker", "broker_credentials")]
    return sorted(found)


def test_the_offence_finder_finds_hand_built_clients(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('from confluent_kafka import Producer\n'
                      'p = Producer({"bootstrap.servers": "k:9092"})\n'
                      'app = faust.App("x", broker="kafka://k:9092")\n')
    assert _hand_built_clients(sample) == [
        "line 2: 'bootstrap.servers'", "line 2: Producer(...)", "line 3: App(broker=...)"]


def test_product_code_builds_no_kafka_client_by_hand() -> None:
    factory = {ROOT / "ia" / "core" / "kafka.py", ROOT / "ia" / "core" / "settings.py"}
    sources = _package_sources()
    assert ROOT / "streams" / "app.py" in sources
    offenders = {str(p.relative_to(ROOT)): found for p in sources if p not in factory
                 if (found := _hand_built_clients(p))}
    assert offenders == {}, "build Kafka clients with ia.core.kafka"
