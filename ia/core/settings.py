"""Typed settings, read from the environment (and an optional ``.env`` file).

Connection settings use the conventional names ``KAFKA_BOOTSTRAP_SERVERS``
and ``REDIS_URL`` so ``eval "$(ia up)"`` and external infrastructure work the
same way; everything else is prefixed ``IA_``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        # Decisions of a shadow candidate (`ia worker --shadow`). No actuator reads it,
        # and it is not in all(): only the shadow worker creates it.
        self.decisions_shadow = f"{prefix}.decisions.shadow"

    def all(self) -> list[str]:
        return [self.telemetry, self.decisions, self.outcomes, self.feedback, self.dlq,
                self.approvals]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IA_", env_file=".env", extra="ignore")

    kafka_bootstrap_servers: str | None = Field(
        default=None,
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "IA_KAFKA_BOOTSTRAP_SERVERS"),
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "IA_REDIS_URL")
    )
    topic_prefix: str = "ia"
    topic_partitions: int = Field(default=4, ge=1)
    app_id: str = "ia-pipeline"
    actuator_app_id: str = "ia-actuator"
    # Wire format of every topic: json (default), avro (schemaless binary) or
    # confluent (magic byte + schema id + Avro binary).
    wire_format: Literal["json", "avro", "confluent"] = "json"
    # Short sessions make rebalances (and tansu's join delay) fast; production
    # Kafka users may raise it.
    session_timeout_s: float = Field(default=6.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=500, ge=1)
    batch_within_s: float = Field(default=0.02, gt=0)
    # Longest a consumer fetch waits for data (Faust's own 1.5 s adds up to
    # 1.5 s of latency on brokers that hold fetches until the wait expires).
    fetch_max_wait_s: float = Field(default=0.01, gt=0)
    # How often consumed offsets are committed: after a crash, records since the
    # last commit are delivered again (the feature store detects and skips them).
    commit_interval_s: float = Field(default=1.0, gt=0)
    policy_file: Path | None = None
    metrics_port: int = Field(default=0, ge=0, description="0 disables the metrics endpoint")
    # Address the metrics endpoint binds; containers need 0.0.0.0 to be scraped.
    metrics_host: str = "127.0.0.1"
    run_dir: Path = Path(".ia")
    audit_dir: Path | None = Field(default=None, description="default: <run_dir>/audit")
    redis_prefix: str = "ia"
    action_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retries: int = Field(default=3, ge=0)
    simulator_url: str | None = None
    # Human in the loop: how long an approval request waits, and what an
    # unanswered one becomes (a rule's action may override both with params
    # approval_ttl_s / on_expiry).
    approval_ttl_s: float = Field(default=900.0, gt=0)
    approval_on_expiry: Literal["reject", "approve"] = "reject"
    audit_app_id: str = "ia-audit"
    # Default: decisions with an action (or a mode other than none) are
    # recorded in full, the rest as per-batch digests; true records all in full.
    audit_all_decisions: bool = False
    # Approval HTTP API (`ia api`): bearer token from the environment or a file,
    # never from code.  Without one the API refuses every request.
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8470, ge=0)
    # Default incoming-webhook URL of the notify actuator (Slack-compatible).
    notify_url: SecretStr | None = None
    # Which actuator plug-ins (entry point group "ia.actuators") to load:
    # "all", "none" or a comma-separated list of names.
    actuator_plugins: str = "all"
    log_level: str = "warn"

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def audit_log(self) -> Path:
        """The hash-chained audit log (JSONL); its head lives in Redis."""
        return (self.audit_dir or self.run_dir / "audit") / f"{self.topic_prefix}.audit.jsonl"

    def require_endpoints(self) -> tuple[str, str]:
        if not self.kafka_bootstrap_servers or not self.redis_url:
            raise SystemExit(
                "KAFKA_BOOTSTRAP_SERVERS and REDIS_URL must be set. "
                'Start the embedded broker and Redis with: eval "$(ia up)"'
            )
        return self.kafka_bootstrap_servers, self.redis_url
