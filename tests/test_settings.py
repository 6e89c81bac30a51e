"""Settings: grouped, strict, documented, and read from the README's variables."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from ia.cli import main
from ia.core.errors import ConfigError
from ia.core.settings import Settings, env_names, known_env, load, unknown_env

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _readme_config_variables() -> set[str]:
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return {v for row in table.splitlines() if row.startswith("| `")
            for v in re.findall(r"`((?:IA_|KAFKA_|REDIS_)[A-Z_]+)`", row.split("|")[1])}


def test_every_variable_the_readme_documents_is_a_setting() -> None:
    documented = _readme_config_variables()
    assert len(documented) > 25
    assert documented - known_env() == set()


def test_every_setting_has_a_description() -> None:
    assert [f"{g}.{n}" for g, n, field, _ in env_names() if not field.description] == []


def test_flat_variables_fill_the_groups() -> None:
    s = Settings(_env={"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "IA_REDIS_PREFIX": "p",
                       "IA_ACTUATOR_APP_ID": "act", "IA_APPROVAL_TTL_S": "60",
                       "IA_API_PORT": "9000", "IA_AUDIT_ALL_DECISIONS": "true"})
    assert (s.kafka.bootstrap_servers, s.redis.prefix, s.actuator.app_id) == ("k:9092", "p",
                                                                              "act")
    assert (s.approvals.ttl_s, s.api.port, s.audit.all_decisions) == (60.0, 9000, True)
    assert s.worker.app_id == "ia-pipeline"


def test_a_mistyped_override_is_an_error_not_ignored() -> None:
    with pytest.raises(ValueError, match="batchsize"):
        Settings(_env={}, worker={"batchsize": 3})
    with pytest.raises(ValueError, match="redis_prefix"):
        Settings(_env={}, redis_prefix="x")
    with pytest.raises(ConfigError, match="no setting named"):
        Settings(_env={}).with_overrides(app=1)


def test_overrides_merge_into_the_environment() -> None:
    s = Settings(_env={"IA_BATCH_SIZE": "7"}, worker={"app_id": "w"})
    assert (s.worker.app_id, s.worker.batch_size) == ("w", 7)
    t = s.with_overrides(worker={"batch_size": 9}, topic_prefix="x")
    assert (t.worker.app_id, t.worker.batch_size, t.topic_prefix) == ("w", 9, "x")


def test_an_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IA_BATCH_SIZE", "many")
    with pytest.raises(ConfigError, match=r"worker.batch_size \(IA_BATCH_SIZE\)"):
        load()


def test_unknown_ia_variables_are_reported() -> None:
    assert unknown_env({"IA_BATCHSIZE": "1", "IA_BATCH_SIZE": "1", "HOME": "/"}) == [
        "IA_BATCHSIZE"]


def test_ia_config_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IA_API_TOKEN", "tok-secret-1")
    monkeypatch.setenv("IA_NOTIFY_URL", "https://hooks.example/T0/B0/secret-path")
    monkeypatch.setenv("REDIS_URL", "redis://:pw-secret@r.example:6379/0")
    monkeypatch.setenv("IA_TYPO", "1")
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    assert "secret" not in result.stdout
    doc = json.loads(result.stdout)
    values = {r["setting"]: r["value"] for r in doc["settings"]}
    assert values["api.token"] == values["actuator.notify_url"] == "********"
    assert values["redis.url"] == "redis://:********@r.example:6379/0"
    assert doc["unknown_env"] == ["IA_TYPO"]
