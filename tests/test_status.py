"""``ia status`` shows the kill switch; approving while paused says what would happen; ready
lines carry no Redis password."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ia.cli import main
from ia.core.redis import client as redis_client
from ia.decisions.guards import KillSwitch
from ia.streams.app import redis_address


def test_a_redis_password_never_reaches_a_ready_line() -> None:
    assert redis_address("redis://:s3cret@db.internal:6380/2") == "redis://db.internal:6380/2"
    assert redis_address("rediss://user:s3cret@db/0") == "rediss://db/0"
    assert redis_address(None) == "-"


@pytest.mark.integration
def test_status_shows_the_pause_state_from_any_directory(infra, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    prefix = f"st{uuid.uuid4().hex[:6]}"
    env = {**infra.env, "IA_REDIS_PREFIX": prefix,
           "IA_RUN_DIR": str(tmp_path / "nowhere")}
    monkeypatch.chdir(tmp_path)

    def status() -> dict:
        out = CliRunner().invoke(main, ["status"], env=env, catch_exceptions=False)
        assert out.exit_code == 0, out.output
        return json.loads(out.output)

    assert status()["paused"] == {"paused": False}

    async def pause() -> None:
        client = redis_client(infra.redis)
        await KillSwitch(client, prefix).pause("ann", "incident 42")
        await client.aclose()

    asyncio.run(pause())
    report = status()
    assert report["run_dir"] == str(tmp_path / "nowhere")
    assert report["paused"]["paused"] is True
    assert (report["paused"]["by"], report["paused"]["reason"]) == ("ann", "incident 42")


@pytest.mark.integration
def test_approving_while_paused_says_the_action_would_be_blocked(infra) -> None:
    prefix = f"ap{uuid.uuid4().hex[:6]}"
    env = {**infra.env,
           "IA_REDIS_PREFIX": prefix, "IA_TOPIC_PREFIX": prefix}

    async def pause() -> None:
        client = redis_client(infra.redis)
        await KillSwitch(client, prefix).pause("ann", "incident 42")
        await client.aclose()

    asyncio.run(pause())
    out = CliRunner().invoke(main, ["approvals", "approve", "ap-0123"], env=env)
    assert out.exit_code == 1, out.output
    line = out.output.strip().splitlines()[-1]
    assert line.startswith("Error: automation is paused (by ann at ") and "incident 42" in line
    assert "'blocked' outcome" in line and "--while-paused" in line
