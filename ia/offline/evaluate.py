"""NAB evaluation: replay every data file through the real decision path and score it.

Each ``data/<category>/<file>.csv`` is replayed on its own (one entity, one
metric, fresh in-memory state: score before learn, no look-ahead), its
``anomaly_score`` column written to ``OUT/<category>/<file>.csv`` with the
data file's own timestamp strings, and NAB's rules applied by the scorer in
``shared/tools/nab_score.py`` (an independent implementation, run as is).
"""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ia.offline.history import read_nab_csv
from ia.offline.run import decide, observe_only

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")


@dataclass
class NabResult:
    files: int
    rows: int
    scores: dict[str, float]
    report: str


def default_scorer(data_dir: Path) -> Path:
    """``shared/tools/nab_score.py`` next to ``shared/data/nab``."""
    return data_dir.resolve().parents[1] / "tools" / "nab_score.py"


def data_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "data").glob("*/*.csv"))


async def _scores(path: Path) -> list[float]:
    return [d.anomaly_score
            async for batch in decide(read_nab_csv(path, path.stem, "value"), observe_only())
            for d in batch]


def score_file(path: Path) -> list[tuple[str, float]]:
    """(timestamp string, anomaly_score) per row, from a replay of the file."""
    # The scorer wants the file's own timestamp strings back, not parsed times.
    with path.open(newline="", encoding="utf-8-sig") as fh:
        stamps = [row[0] for row in list(csv.reader(fh))[1:] if row]
    scores = asyncio.run(_scores(path))
    if len(scores) != len(stamps):
        raise RuntimeError(f"{path}: {len(stamps)} rows but {len(scores)} decisions")
    return list(zip(stamps, scores, strict=True))


def write_scores(rows: list[tuple[str, float]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write("timestamp,anomaly_score\n")
        fh.writelines(f"{t},{s:.6f}\n" for t, s in rows)


def run_scorer(scorer: Path, data_dir: Path, out_dir: Path, name: str = "ia") -> tuple[str, dict]:
    json_path = out_dir / "nab_scores.json"
    proc = subprocess.run(
        [sys.executable, str(scorer), "--scores", f"{name}={out_dir}",
         "--data-dir", str(data_dir / "data"),
         "--labels", str(data_dir / "labels" / "combined_windows_dev.json"),
         "--json", str(json_path)],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nab_score.py failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout, json.loads(json_path.read_text())


def _normalised(result: dict, name: str) -> dict[str, float]:
    """Pull the normalised score per profile out of the scorer's JSON, whatever its nesting."""
    found: dict[str, float] = {}

    def walk(node: object, profile: str | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                p = k if k in PROFILES else profile
                if k in ("normalized", "normalised", "normalized_score", "score") and p \
                        and isinstance(v, int | float):
                    found.setdefault(p, float(v))
                walk(v, p)
        elif isinstance(node, list):
            for v in node:
                walk(v, profile)

    walk(result.get(name, result), None)
    return found


def evaluate_nab(data_dir: Path, out_dir: Path, scorer: Path | None = None) -> NabResult:
    files = data_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no NAB data files under {data_dir / 'data'}")
    rows = 0
    for path in files:
        scored = score_file(path)
        rows += len(scored)
        write_scores(scored, out_dir / path.parent.name / path.name)
    report, result = run_scorer(scorer or default_scorer(data_dir), data_dir, out_dir)
    return NabResult(files=len(files), rows=rows, scores=_normalised(result, "ia"), report=report)
