"""The README's examples run as written: the "Running the pieces" walkthrough and kcat.

The shell blocks are taken from README.md itself, so an edit that breaks them fails here.
Only what would collide on a shared machine is changed: HOME and the run directory are
the test's own, and the fixed metrics ports become free ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ia.core.kafka import ensure_topics
from ia.runtime.embedded import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def sh_block_after(marker: str) -> str:
    """The first ```sh block after ``marker`` in the README."""
    start = README.index(marker)
    found = re.search(r"```sh\n(.*?)```", README[start:], re.DOTALL)
    assert found, f"no sh block after {marker!r}"
    return found.group(1)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no ia settings, no broker or Redis."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("IA_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL",
                                                     "VIRTUAL_ENV", "LD_PRELOAD")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # the venv comes from `. .venv/bin/activate`
    return {**env, **extra}


def test_the_walkthrough_ends_with_an_action(tmp_path: Path) -> None:
    script = sh_block_after("## Running the pieces")
    assert "--entity web-1" in script and "ia up" in script and "ia down" in script
    for port in ("9464", "9465", "9466"):
        script = script.replace(f"--metrics-port {port}", f"--metrics-port {free_port()}")
    run_dir = tmp_path / "run"
    env = clean_env(HOME=str(tmp_path), IA_RUN_DIR=str(run_dir),
                    IA_API_PORT=str(free_port()))
    try:
        out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=420)
    finally:  # should the script fail before its own `ia down`
        subprocess.run([str(ROOT / ".venv/bin/ia"), "down", "--run-dir", str(run_dir)],
                       env=env, capture_output=True, timeout=60)
    # The client's JSON lines (Faust writes terminal control codes to stdout on exit).
    text = re.sub(r"[\x00-\x09\x0b-\x1f]", "", re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.stdout))
    lines = [line for line in text.splitlines() if line.startswith("{\"")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert summary == {"decisions": 60, "actions": 1, "outcomes": {"succeeded": 1}}, \
        out.stdout + out.stderr[-3000:]
    outcome = json.loads(lines[-2])
    assert outcome["action_type"] == "log" and outcome["target"] == "web-1"
    assert '"healthy": true' in out.stdout, out.stdout[:2000]  # ia status
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


KCAT = shutil.which("kcat")
needs_kcat = pytest.mark.skipif(
    KCAT is None, reason="kcat is not installed (apt-get install kcat; .ci/run installs it): "
                         "the README's kcat example is not checked")


def kcat_script(topic: str) -> str:
    """The README's kcat lines, on ``topic`` instead of the shared ia.* topics."""
    script = sh_block_after("With `kcat`:")
    assert "LD_PRELOAD" in script and "-t ia.telemetry" in script
    return script.replace("-t ia.telemetry", f"-t {topic}").replace("-t ia.decisions",
                                                                       f"-t {topic}")


@needs_kcat
def test_the_readme_kcat_lines_work(infra, tmp_path: Path) -> None:
    topic = f"kcat-{uuid.uuid4().hex[:8]}"
    ensure_topics(infra.kafka, [topic], 1)
    venv_bin = str(Path(sys.executable).parent)
    env = clean_env(KAFKA_BOOTSTRAP_SERVERS=infra.kafka, PATH=f"{venv_bin}:/usr/bin:/bin")
    out = subprocess.run(["bash", "-ec", kcat_script(topic)], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '{"entity":"web-1","metric":"latency_ms","value":950' in out.stdout, out.stderr


@needs_kcat
def test_debian_kcat_still_cannot_talk_to_the_embedded_broker(infra) -> None:
    """Pins the incompatibility the README explains: when this fails, kcat (its librdkafka)
    or the broker was upgraded and the README's LD_PRELOAD workaround can go."""
    version = subprocess.run([KCAT, "-V"], capture_output=True, text=True, timeout=10).stdout
    librdkafka = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", version)
    assert librdkafka, version
    if tuple(map(int, librdkafka.groups())) >= (2, 16, 0):
        pytest.skip(f"this kcat links librdkafka {'.'.join(librdkafka.groups())}, as new as "
                    "confluent-kafka's: the pinned incompatibility is that of older ones")
    out = subprocess.run([KCAT, "-b", infra.kafka, "-L", "-m", "5"], capture_output=True,
                         text=True, timeout=30, env=clean_env())
    assert out.returncode != 0 and "Read underflow" in out.stderr, (
        "plain kcat now reads the embedded broker's metadata: simplify the README's kcat "
        f"example (drop LD_PRELOAD)\n{out.stdout[-500:]}{out.stderr[-500:]}")
