"""The backtest report over NAB data renders in headless Chromium, offline, without errors.

Needs the shared NAB development set (../shared/data/nab, or IA_NAB_DIR) and
Debian's `chromium` (.ci/run installs it); skips with a message otherwise.  By
default three NAB files are backtested (symlinked, never copied); with
IA_NAB_FULL=1 the whole development set is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAB = Path(os.environ.get("IA_NAB_DIR") or ROOT.parent / "shared" / "data" / "nab")
LABELS = NAB / "labels" / "combined_windows_dev.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SUBSET = ("realKnownCause/nyc_taxi.csv", "artificialWithAnomaly/art_daily_jumpsup.csv",
          "realAWSCloudwatch/ec2_cpu_utilization_5f5533.csv")

pytestmark = [
    pytest.mark.skipif(not LABELS.is_file(),
                       reason=f"NAB development set not found at {NAB} (../shared is not "
                              "checked out here; IA_NAB_DIR overrides)"),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium not installed (apt-get install -y chromium; "
                              ".ci/run installs it)"),
]


def nab_input(tmp: Path) -> Path:
    if os.environ.get("IA_NAB_FULL") == "1":
        return NAB
    root = tmp / "nab"
    for rel in SUBSET:
        link = root / "data" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(NAB / "data" / rel)
    return root


def render(html: Path, profile: Path) -> tuple[str, str]:
    """The DOM after scripts ran, and Chromium's log (console messages included)."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         # Nothing may come from the network: every host name fails to resolve.
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=30000",
         "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def test_nab_backtest_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "ia.cli", "backtest",
         "--baseline", str(ROOT / "examples/backtest/baseline.yaml"),
         "--candidate", str(ROOT / "examples/backtest/candidate.yaml"),
         "--input", str(nab_input(tmp_path)), "--format", "nab", "--labels", str(LABELS),
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    q = summary["candidate"]["quality"]
    assert q["windows"] > 0 and q["recall"] is not None
    report = out / "report.html"
    html = report.read_text(encoding="utf-8")
    # Self-contained: no external scripts, styles, images or frames.
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link[^>]+href=", html)

    dom, log = render(report, tmp_path / "chromium-profile")
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    attrs = dict(re.findall(r'data-([a-z]+)="(\d+)"', body.group(1)))
    assert attrs.get("errors") == "0", re.search(r"render-errors[^<]*<", dom)
    plots = int(attrs["plots"])
    assert plots == 1 + summary["source"]["entities"]  # the overview + every series
    assert attrs["rendered"] == attrs["plots"], attrs
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not [c for c in console if re.search(r"error|uncaught|failed", c, re.I)], console
