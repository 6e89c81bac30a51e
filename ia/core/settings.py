"""Typed settings, read from the environment (and an optional ``.env`` file).

The settings are grouped by concern (:class:`KafkaSettings`, :class:`RedisSettings`,
:class:`WorkerSettings`, ...), frozen, and strict: a keyword argument that names no
setting is an error, not silently dropped. Every group is read from the flat
environment variables the README documents (``KAFKA_BOOTSTRAP_SERVERS``, ``REDIS_URL``
and ``IA_*``); each field's variable is in :func:`env_names`, and ``ia config`` prints
the effective values with secrets masked.

>>> s = Settings(_env={"IA_BATCH_SIZE": "200", "REDIS_URL": "redis://r:6379/0"})
>>> s.worker.batch_size, s.redis.url, s.kafka.bootstrap_servers
(200, 'redis://r:6379/0', None)
>>> Settings(_env={}, worker={"batch_size": 50}).worker.batch_size
50
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ia.core.errors import ConfigError


class Topics:
    """Topic names derived from one configurable prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.telemetry = f"{prefix}.telemetry"
        self.decisions = f"{prefix}.decisions"
        self.outcomes = f"{prefix}.outcomes"
        self.feedback = f"{prefix}.feedback"
        self.dlq = f"{prefix}.telemetry.dlq"
        self.approvals = f"{prefix}.approvals"
        # CloudEvents (deploys, config changes) read by `ia ingest`; not in all(): the
        # translator creates it (IA_INGEST_CLOUDEVENTS_TOPIC may name another).
        self.cloudevents = f"{prefix}.cloudevents"
        # Decisions and dead letters of a shadow candidate (`ia worker --shadow`). No
        # actuator reads them, and they are not in all(): only the shadow worker creates them.
        self.decisions_shadow = f"{prefix}.decisions.shadow"
        self.dlq_shadow = f"{prefix}.telemetry.dlq.shadow"

    def all(self) -> list[str]:
        return [self.telemetry, self.decisions, self.outcomes, self.feedback, self.dlq,
                self.approvals]


class _Group(BaseModel):
    """A group of settings; its fields are read from ``ENV_PREFIX + NAME`` unless
    ``ENV`` names their variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ENV_PREFIX: ClassVar[str] = "IA_"
    ENV: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def env_names(cls, field: str) -> tuple[str, ...]:
        return cls.ENV.get(field, (cls.ENV_PREFIX + field.upper(),))


SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
_SASL_FIELDS = ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
_SSL_FIELDS = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location",
               "ssl_key_password")


class KafkaSettings(_Group):
    """Where the Kafka cluster is and how every client authenticates to it.

    :mod:`ia.core.kafka` builds every producer, consumer, admin client and Faust app
    from these settings, through :meth:`librdkafka` and :meth:`aiokafka`.
    """

    bootstrap_servers: str | None = Field(
        default=None, description="host:port[,host:port] of the Kafka cluster")
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="how clients reach the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT "
                    "or SASL_SSL (SASL over TLS)")
    sasl_mechanism: SaslMechanism | None = Field(
        default=None, description="SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = Field(default=None, description="SASL user name")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password")
    sasl_password_file: Path | None = Field(
        default=None,
        description="file holding the SASL password (as Docker and Kubernetes mount "
                    "them), read whenever a client is created; instead of the password")
    ssl_ca_location: Path | None = Field(
        default=None,
        description="CA certificates (PEM) the brokers' certificates are checked against "
                    "(default: the system's)")
    ssl_certificate_location: Path | None = Field(
        default=None, description="client certificate (PEM), for TLS client authentication")
    ssl_key_location: Path | None = Field(
        default=None, description="private key (PEM) of the client certificate")
    ssl_key_password: SecretStr | None = Field(
        default=None, description="password of the client certificate's private key")
    session_timeout_s: float = Field(
        default=6.0, gt=0,
        description="consumer session timeout; short sessions make rebalances fast")
    heartbeat_interval_s: float = Field(default=1.0, gt=0,
                                        description="consumer heartbeat interval")
    fetch_max_wait_s: float = Field(
        default=0.01, gt=0,
        description="longest a consumer fetch waits for data (Faust's 1.5 s adds latency "
                    "on brokers that hold fetches until the wait expires)")
    commit_interval_s: float = Field(
        default=1.0, gt=0,
        description="how often consumed offsets are committed; records since the last "
                    "commit are delivered again after a crash and skipped by the store")
    commit_every: int = Field(
        default=1000, gt=0,
        description="also commit after this many records, whichever comes first")

    ENV: ClassVar[dict[str, tuple[str, ...]]] = {
        "bootstrap_servers": ("KAFKA_BOOTSTRAP_SERVERS", "IA_KAFKA_BOOTSTRAP_SERVERS"),
        **{name: (f"IA_KAFKA_{name.upper()}",)
           for name in ("security_protocol", *_SASL_FIELDS, *_SSL_FIELDS)}}

    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        # librdkafka takes these in any case; so do we.
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        problems = self._security_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def _var(self, name: str) -> str:
        return self.env_names(name)[0]

    def _security_problems(self) -> list[str]:
        """What is missing or contradictory in the security settings, in words that name
        the variables to set."""
        protocol = f"{self._var('security_protocol')}={self.security_protocol}"
        given = {name for name in (*_SASL_FIELDS, *_SSL_FIELDS) if getattr(self, name)}
        problems = []
        if self.uses_sasl:
            missing = [self._var(n) for n in ("sasl_mechanism", "sasl_username")
                       if n not in given]
            if not given & {"sasl_password", "sasl_password_file"}:
                missing.append(f"{self._var('sasl_password')} (or "
                               f"{self._var('sasl_password_file')})")
            if missing:
                problems.append(f"{protocol} needs {', '.join(missing)}")
        elif given & set(_SASL_FIELDS):
            problems.append(f"{', '.join(self._var(n) for n in _SASL_FIELDS if n in given)} "
                            f"set but {protocol} uses no SASL (SASL_SSL or SASL_PLAINTEXT do)")
        if {"sasl_password", "sasl_password_file"} <= given:
            problems.append(f"set {self._var('sasl_password')} or "
                            f"{self._var('sasl_password_file')}, not both")
        if not self.uses_tls and given & set(_SSL_FIELDS):
            problems.append(f"{', '.join(self._var(n) for n in _SSL_FIELDS if n in given)} "
                            f"set but {protocol} uses no TLS (SSL or SASL_SSL do)")
        client_cert = given & {"ssl_certificate_location", "ssl_key_location"}
        if len(client_cert) == 1:
            problems.append(f"{self._var('ssl_certificate_location')} and "
                            f"{self._var('ssl_key_location')} go together")
        if "ssl_key_password" in given and "ssl_key_location" not in given:
            problems.append(f"{self._var('ssl_key_password')} needs "
                            f"{self._var('ssl_key_location')}")
        return problems

    def servers(self) -> str:
        """The bootstrap servers; :class:`ConfigError` if none are configured."""
        if not self.bootstrap_servers:
            raise ConfigError("KAFKA_BOOTSTRAP_SERVERS must be set")
        return self.bootstrap_servers

    def password(self) -> str:
        """The SASL password, from :attr:`sasl_password_file` when that is given (read
        now, so a rotated password reaches the next client)."""
        if self.sasl_password_file is None:
            return self.sasl_password.get_secret_value() if self.sasl_password else ""
        try:
            return self.sasl_password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{self._var('sasl_password_file')}: cannot read "
                              f"{self.sasl_password_file}: {exc.strerror}") from None

    def librdkafka(self) -> dict[str, str]:
        """The connection part of a confluent-kafka (librdkafka) client configuration."""
        config = {"bootstrap.servers": self.servers(),
                  "security.protocol": self.security_protocol}
        if self.uses_sasl:
            assert self.sasl_mechanism and self.sasl_username  # checked when validated
            config |= {"sasl.mechanism": self.sasl_mechanism,
                       "sasl.username": self.sasl_username, "sasl.password": self.password()}
        for name in ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location"):
            if (location := getattr(self, name)) is not None:
                config[name.replace("_", ".")] = str(location)
        if self.ssl_key_password is not None:
            config["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return config

    def aiokafka(self) -> dict[str, Any]:
        """The connection keyword arguments of an aiokafka client (Faust's clients are
        aiokafka's): TLS as an :class:`ssl.SSLContext` built from the PEM files."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [h.strip() for h in self.servers().split(",") if h.strip()],
            "security_protocol": self.security_protocol}
        if self.uses_sasl:
            kwargs |= {"sasl_mechanism": self.sasl_mechanism,
                       "sasl_plain_username": self.sasl_username,
                       "sasl_plain_password": self.password()}
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that checks the brokers' certificates and host names (as
        librdkafka does), with the client certificate if one is configured."""
        try:
            context = ssl.create_default_context(
                cafile=str(self.ssl_ca_location) if self.ssl_ca_location else None)
            if self.ssl_certificate_location and self.ssl_key_location:
                context.load_cert_chain(
                    self.ssl_certificate_location, self.ssl_key_location,
                    self.ssl_key_password.get_secret_value() if self.ssl_key_password
                    else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the Kafka TLS files: {exc}") from None
        return context


class RedisSettings(_Group):
    """Where Redis is and how long a client waits for it (:mod:`ia.core.redis` makes
    every client from these settings)."""

    url: str | None = Field(default=None, description="redis://host:port/db of the state store")
    password_file: Path | None = Field(
        default=None,
        description="file holding the Redis password (AUTH), so the password is in neither "
                    "the URL nor the environment; `ia up` writes one")
    username: str | None = Field(
        default=None,
        description="Redis ACL user to authenticate as (with the password of password_file); "
                    "default: Redis's default user")
    prefix: str = Field(default="ia", description="prefix of every Redis key")
    socket_timeout_s: float = Field(
        default=5.0, gt=0,
        description="longest a Redis command waits for its reply; a hung Redis then fails "
                    "the step, which is retried, instead of blocking it for ever")
    connect_timeout_s: float = Field(default=5.0, gt=0,
                                     description="longest a connection to Redis takes to open")
    health_check_interval_s: float = Field(
        default=30.0, ge=0,
        description="a connection idle this long is checked with PING before it is used "
                    "again (a dead connection is replaced, not failed on); 0: never")
    retries: int = Field(
        default=1, ge=0,
        description="retries (exponential backoff) of a Redis command that timed out or lost "
                    "its connection, before the step fails and is retried as a whole; a hung "
                    "Redis fails a command within (retries + 1)^2 x socket_timeout_s (the "
                    "connection's handshake is retried too)")

    ENV: ClassVar[dict[str, tuple[str, ...]]] = {"url": ("REDIS_URL", "IA_REDIS_URL")}
    ENV_PREFIX: ClassVar[str] = "IA_REDIS_"


class WorkerSettings(_Group):
    app_id: str = Field(default="ia-pipeline", description="consumer group of the worker")
    batch_size: int = Field(default=500, ge=1, description="events per batch")
    batch_within_s: float = Field(default=0.02, gt=0,
                                  description="how long to wait to fill a batch")
    processing_attempts: int = Field(
        default=3, ge=1,
        description="attempts of a batch whose decision code fails (not Redis or the broker) "
                    "before its failing records go to the DLQ as processing_error")
    max_metrics_per_entity: int = Field(
        default=256, ge=1,
        description="metrics one entity may have (every batch loads all of its entity's "
                    "state); samples of further metrics go to the DLQ as too_many_metrics")
    feedback_max_per_entity: int = Field(
        default=30, ge=1,
        description="feedback labels that count per entity and window; further ones are "
                    "refused (over_cap)")
    feedback_window_s: float = Field(default=3600.0, gt=0,
                                     description="the window of the feedback cap")


class ActuatorSettings(_Group):
    app_id: str = Field(default="ia-actuator", description="consumer group of the actuator")
    action_timeout_s: float = Field(default=10.0, gt=0, description="timeout of every action")
    webhook_retries: int = Field(
        default=3, ge=0,
        description="retries (exponential backoff) of webhook actions on 5xx/429/network errors")
    notify_url: SecretStr | None = Field(
        default=None,
        description="default Slack-compatible incoming webhook of notify actions and decisions")
    plugins: str = Field(default="all",
                         description="actuator plug-ins to load: all, none or names")
    webhook_allow: str | None = Field(
        default=None,
        description="comma-separated scheme://host[:port] that webhook destinations may "
                    "have (default: those of the policy's own URLs); others are rejected")

    ENV: ClassVar[dict[str, tuple[str, ...]]] = {"app_id": ("IA_ACTUATOR_APP_ID",),
                                                 "plugins": ("IA_ACTUATOR_PLUGINS",),
                                                 "webhook_allow": ("IA_WEBHOOK_ALLOW",)}


class ApprovalSettings(_Group):
    ttl_s: float = Field(
        default=900.0, gt=0,
        description="how long an approval request waits, unless the policy's `approval.ttl_s` "
                    "says otherwise")
    on_expiry: Literal["reject", "approve"] = Field(
        default="reject",
        description="what an unanswered approval request becomes, unless the policy's "
                    "`approval.on_expiry` says otherwise (never approve for a rule with "
                    "`approvers` or `required` above 1)")
    key_file: Path | None = Field(
        default=None,
        description="file of `key_id hex_key` lines signing approval requests (actuator) and "
                    "answers (API, CLI); default IA_SIGNING_KEY_FILE")

    ENV_PREFIX: ClassVar[str] = "IA_APPROVAL_"


class ApiSettings(_Group):
    token: SecretStr | None = Field(
        default=None, description="bearer token of `ia api`; without one it refuses everything")
    token_file: Path | None = Field(
        default=None,
        description="file of named bearer tokens, one per line: `name sha256:<hex>` (the "
                    "token's SHA-256), `name token`, or `token` (identity `api`)")
    host: str = Field(default="127.0.0.1", description="where `ia api` listens")
    port: int = Field(default=8470, ge=0, description="port of `ia api`")
    rate_limit: int = Field(
        default=60, ge=0,
        description="requests per identity (per client address before authentication) and "
                    "window; more get 429 with Retry-After (0: no limit)")
    rate_window_s: float = Field(default=60.0, gt=0, description="window of the rate limit")

    ENV_PREFIX: ClassVar[str] = "IA_API_"


class AuditSettings(_Group):
    app_id: str = Field(default="ia-audit", description="consumer group of the audit writer")
    dir: Path | None = Field(default=None,
                             description="directory of the audit log (default <run_dir>/audit)")
    all_decisions: bool = Field(
        default=False,
        description="record every decision in full, not only those with an action")
    key: SecretStr | None = Field(
        default=None, description="the audit chain's HMAC key itself (prefer key_file)")
    key_file: Path | None = Field(
        default=None,
        description="file of the audit chain's HMAC key "
                    "(default <run_dir>/keys/<prefix>.audit.key, created by the writer)")

    ENV_PREFIX: ClassVar[str] = "IA_AUDIT_"

    @model_validator(mode="after")
    def _one_key_source(self) -> AuditSettings:
        if self.key is not None and self.key_file is not None:
            raise ValueError("set IA_AUDIT_KEY or IA_AUDIT_KEY_FILE, not both")
        return self


class SigningSettings(_Group):
    key_file: Path | None = Field(
        default=None,
        description="file of `key_id hex_key` lines: the first signs decisions, all "
                    "verify; without one the worker signs nothing and `ia actuate` refuses "
                    "to start")
    max_age_s: float = Field(
        default=600.0, gt=0,
        description="an action decision decided longer ago than this is rejected, not run")
    feedback_key_file: Path | None = Field(
        default=None,
        description="file of `key_id hex_key` lines that sign and verify feedback labels "
                    "(`ia feedback` signs, the worker counts only labels it verifies); "
                    "without one no label counts")

    ENV_PREFIX: ClassVar[str] = "IA_SIGNING_"
    ENV: ClassVar[dict[str, tuple[str, ...]]] = {"feedback_key_file": ("IA_FEEDBACK_KEY_FILE",)}


class IngestSettings(_Group):
    """``ia ingest``: OpenTelemetry metrics and CloudEvents from Kafka -> telemetry; and the
    mapping rules it shares with ``ia receive`` (README "Ingest: OpenTelemetry,
    Prometheus, Alertmanager, CloudEvents")."""

    app_id: str = Field(default="ia-ingest", description="consumer group of `ia ingest`")
    otlp_topic: str = Field(
        default="otlp_metrics",
        description="topic the OpenTelemetry Collector's Kafka exporter writes metrics to")
    otlp_encoding: Literal["auto", "otlp_proto", "otlp_json"] = Field(
        default="auto",
        description="encoding of otlp_topic: otlp_proto, otlp_json, or auto (told apart by "
                    "their first byte)")
    cloudevents_topic: str | None = Field(
        default=None,
        description="topic of CloudEvents (binary or structured mode) "
                    "(default <prefix>.cloudevents)")
    entity_labels: str = Field(
        default="service.name,job",
        description="labels (OTLP resource attributes, Prometheus and alert labels) tried in "
                    "turn for the entity; the first present names it")
    series_labels: str = Field(
        default="service.instance.id",
        description="OTLP resource attributes that tell series of one entity apart, as a "
                    "point's own attributes do (appended to the metric name)")
    ignore_labels: str = Field(
        default="",
        description="labels left out of the metric name (still carried in the event's "
                    "labels): values that change without starting a new series")
    quantiles: str = Field(
        default="0.5,0.95,0.99",
        description="quantiles each histogram point becomes (<name>_p50, ...); empty for none")
    histogram_mean: bool = Field(default=True,
                                 description="also send a histogram point's mean (<name>_mean)")
    rate_ttl_s: float = Field(
        default=86400.0, gt=0,
        description="how long a counter's last point is kept in Redis for its next rate")

    ENV_PREFIX: ClassVar[str] = "IA_INGEST_"

    @staticmethod
    def _list(value: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in value.split(",") if part.strip())

    @field_validator("quantiles")
    @classmethod
    def _check_quantiles(cls, value: str) -> str:
        try:
            qs = [float(q) for q in cls._list(value)]
        except ValueError:
            raise ValueError("quantiles must be numbers between 0 and 1, comma-separated")\
                from None
        if not all(0.0 <= q <= 1.0 for q in qs):
            raise ValueError("quantiles must be between 0 and 1")
        return value


class ReceiveSettings(_Group):
    """``ia receive``: the HTTP receiver of Prometheus remote write and Alertmanager."""

    token_file: Path | None = Field(
        default=None,
        description="file of bearer tokens of `ia receive`, one per line: `token` or `name "
                    "token`; without one it refuses everything")
    host: str = Field(default="127.0.0.1", description="where `ia receive` listens")
    port: int = Field(default=8471, ge=0, description="port of `ia receive`")
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024,
        description="largest request body `ia receive` takes, compressed and (remote write) "
                    "uncompressed; larger ones get 413")
    max_samples: int = Field(
        default=50_000, ge=1,
        description="most samples or alerts in one request (Prometheus sends 2000 at most "
                    "by default); more get 413")
    delivery_timeout_s: float = Field(
        default=10.0, gt=0,
        description="longest a request waits for the broker to confirm its records before "
                    "it is answered 503 (the sender retries)")

    ENV_PREFIX: ClassVar[str] = "IA_RECEIVE_"


class Settings(BaseSettings):
    """Everything a process of ``ia`` is configured with."""

    # A validation error would otherwise quote its input, secrets (passwords, tokens) too.
    model_config = SettingsConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)
    ENV_PREFIX: ClassVar[str] = "IA_"
    ENV: ClassVar[dict[str, tuple[str, ...]]] = {}

    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Kafka clients")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="`ia worker`")
    actuator: ActuatorSettings = Field(default_factory=ActuatorSettings,
                                       description="`ia actuate`")
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings,
                                        description="human approvals")
    api: ApiSettings = Field(default_factory=ApiSettings, description="`ia api`")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="the audit log")
    signing: SigningSettings = Field(default_factory=SigningSettings,
                                     description="signatures of action decisions")
    ingest: IngestSettings = Field(default_factory=IngestSettings,
                                   description="`ia ingest` and the mapping rules")
    receive: ReceiveSettings = Field(default_factory=ReceiveSettings,
                                     description="`ia receive`")

    topic_prefix: str = Field(
        default="ia", description="topics are <prefix>.telemetry, .decisions, .outcomes, ...")
    topic_partitions: int = Field(default=4, ge=1, description="partitions of topics ia creates")
    wire_format: Literal["json", "avro", "confluent"] = Field(
        default="json",
        description="json, avro (schemaless binary) or confluent (magic byte + schema id + Avro)")
    policy_file: Path | None = Field(
        default=None, description="policy YAML (default: observe only); reloaded on change")
    metrics_port: int = Field(default=0, ge=0,
                              description="Prometheus /metrics port; 0 disables it")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the metrics endpoint binds; containers need 0.0.0.0")
    run_dir: Path = Field(default=Path(".ia"),
                          description="state and logs of the embedded services")
    simulator_url: str | None = Field(default=None,
                                      description="control API of the demo fleet")
    log_level: str = Field(default="warn", description="log level of the Faust processes")

    def __init__(self, _env: Mapping[str, str] | None = None,
                 _env_file: str | Path | None = ".env", **values: Any) -> None:
        # ``_env`` replaces the process environment and the .env file (tests, doctests);
        # ``_env_file=None`` reads the process environment only.
        token = _ENVIRONMENT.set(dict(_env) if _env is not None else _environment(_env_file))
        try:
            super().__init__(**values)
        finally:
            _ENVIRONMENT.reset(token)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _FlatEnvSource(settings_cls)

    @classmethod
    def env_names(cls, field: str) -> tuple[str, ...]:
        return cls.ENV.get(field, (cls.ENV_PREFIX + field.upper(),))

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def audit_log(self) -> Path:
        """The hash-chained audit log (JSONL); its anchor is beside it, its head in Redis."""
        return (self.audit.dir or self.run_dir / "audit") / f"{self.topic_prefix}.audit.jsonl"

    @property
    def audit_key_file(self) -> Path:
        """Where the audit chain's key is read from when ``IA_AUDIT_KEY`` is unset."""
        return self.audit.key_file or self.run_dir / "keys" / f"{self.topic_prefix}.audit.key"

    def require_endpoints(self) -> tuple[str, str]:
        """The Kafka bootstrap servers and the Redis URL; :class:`ConfigError` if unset."""
        if not self.kafka.bootstrap_servers or not self.redis.url:
            raise ConfigError(
                "KAFKA_BOOTSTRAP_SERVERS and REDIS_URL must be set. "
                'Start the embedded broker and Redis with: eval "$(ia up)"')
        return self.kafka.bootstrap_servers, self.redis.url

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with some fields replaced: ``group={"field": v}`` merges into a group."""
        merged = self.model_dump()
        for key, value in values.items():
            if key not in type(self).model_fields:
                raise ConfigError(f"no setting named {key!r}")
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        return Settings(_env={}, **merged)


_GROUPS: dict[str, type[_Group]] = {
    name: f.annotation for name, f in Settings.model_fields.items()  # type: ignore[misc]
    if isinstance(f.annotation, type) and issubclass(f.annotation, _Group)}


def env_names() -> Iterator[tuple[str, str, FieldInfo, tuple[str, ...]]]:
    """Every setting: (group or "", field, its definition, its environment variables)."""
    for name, f in Settings.model_fields.items():
        group = _GROUPS.get(name)
        if group is None:
            yield "", name, f, Settings.env_names(name)
        else:
            for sub, sf in group.model_fields.items():
                yield name, sub, sf, group.env_names(sub)


def known_env() -> set[str]:
    return {env for *_, names in env_names() for env in names}


_ENVIRONMENT: ContextVar[dict[str, str]] = ContextVar("ia_settings_environment")


def _environment(env_file: str | Path | None) -> dict[str, str]:
    """The process environment over the ``.env`` file's values."""
    from_file: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        from_file = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    return {**from_file, **os.environ}


class _FlatEnvSource(PydanticBaseSettingsSource):
    """The documented flat variables (env first, then the ``.env`` file), as nested values."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        env = _ENVIRONMENT.get()
        out: dict[str, Any] = {}
        for group, name, _field, names in env_names():
            value = next((env[n] for n in names if n in env), None)
            if value is None:
                continue
            if group:
                out.setdefault(group, {})[name] = value
            else:
                out[name] = value
        return out


def load(**overrides: Any) -> Settings:
    """Settings from the environment with ``overrides`` on top (None values are not
    overrides); a value that does not validate is a :class:`ConfigError` that names
    its environment variable."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError("invalid settings:\n" + "\n".join(
            f"  {_where(err['loc'])}: {err['msg']}" for err in exc.errors())) from None


def _where(loc: tuple[Any, ...]) -> str:
    dotted = ".".join(str(part) for part in loc)
    group = _GROUPS.get(str(loc[0])) if loc else None
    if group is not None and len(loc) > 1:
        names = group.env_names(str(loc[1]))
    elif group is None and loc and str(loc[0]) in Settings.model_fields:
        names = Settings.env_names(str(loc[0]))
    else:
        return dotted
    return f"{dotted} ({' or '.join(names)})"


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``IA_*`` variables that name no setting (a typo is otherwise silently ignored)."""
    env = os.environ if env is None else env
    not_settings = {"IA_FAULT_TRIALS", "IA_FAULT_SEED", "IA_TANSU_BIN", "IA_VALKEY_BIN",
                    "IA_PUBLISH_HOST"}
    return sorted(k for k in env if k.startswith("IA_") and k not in known_env()
                  and k not in not_settings)
