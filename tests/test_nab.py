"""NAB: the real streaming path scored by ../shared/tools/nab_score.py.

Skips when the shared NAB data is absent.  The full evaluation (all 29 files,
about a minute) runs only with IA_NAB_FULL=1; `ia eval nab` prints it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ia.offline.evaluate import default_scorer, evaluate_nab, score_file, write_scores

NAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "nab"
pytestmark = pytest.mark.skipif(
    not (NAB / "data").is_dir() or not default_scorer(NAB).is_file(),
    reason=f"NAB data or scorer not found at {NAB} (../shared is not checked out here)")
SMOKE = ("realTraffic/speed_7578.csv", "artificialWithAnomaly/art_daily_jumpsup.csv")


def test_smoke_two_files_are_detected(tmp_path: Path) -> None:
    for rel in SMOKE:
        write_scores(score_file(NAB / "data" / rel), tmp_path / rel)
    proc = subprocess.run(
        [sys.executable, str(default_scorer(NAB)), "--scores", f"ia={tmp_path}",
         "--files", ",".join(SMOKE), "--profile", "standard", "--per-file"],
        capture_output=True, text=True, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ia "))
    assert float(line.split()[1]) > 50.0, proc.stdout
    assert "art_daily_jumpsup.csv" in proc.stdout and "TP 1 FN 0" in proc.stdout


@pytest.mark.skipif(os.environ.get("IA_NAB_FULL") != "1", reason="set IA_NAB_FULL=1")
def test_full_dev_set_meets_targets(tmp_path: Path) -> None:
    result = evaluate_nab(NAB, tmp_path)
    assert result.files == 29
    assert result.scores["standard"] >= 60.0, result.report
    assert result.scores["reward_low_FP_rate"] >= 50.0, result.report
