"""NAB evaluation: every data file through the detector, scored by NAB's rules.

Each ``data/<category>/<file>.csv`` is scored on its own (one series, fresh
state: score before learn, no look-ahead), its ``anomaly_score`` column written
to ``OUT/<category>/<file>.csv`` with the data file's own timestamp strings,
and NAB's rules applied by the scorer in ``shared/tools/nab_score.py`` (an
independent implementation, run as is, in its own process).

Two paths give the same scores:

* ``direct`` (the default): the detector's own ``score`` then ``learn`` on each
  row, the calls the decision engine makes for a metric event
  (:meth:`ia.decisions.engine.DecisionEngine._score`), rounded as decisions are.
  The 29 dev files take seconds, so the whole dev set can run in ``make test``.
* ``engine``: every row as a telemetry event through the full offline decision
  path (:func:`ia.offline.run.decide`: features, detector, policy, guards).
  ``tests/test_nab.py`` checks that both paths give identical scores.

The report puts the overall scores next to the published detectors of the
reference table in ``shared/tools/README.md`` (read from there, not copied), and
breaks them down per category and per file at the one threshold the scorer
chose for all files: raw score, windows detected (TP) and missed (FN), and
detections outside windows (FP rows).
"""

from __future__ import annotations

import asyncio
import csv
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia.decisions.detector import AdaptiveDetector, DetectorConfig
from ia.offline.history import _nab_ms, read_nab_csv
from ia.offline.run import decide, observe_only

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
SHORT = {"standard": "standard", "reward_low_FP_rate": "low FP", "reward_low_FN_rate": "low FN"}
# NAB's cost of a missed window per profile (nab_score.py PROFILES: fnWeight).
FN_WEIGHT = {"standard": 1.0, "reward_low_FP_rate": 1.0, "reward_low_FN_rate": 2.0}
PATHS = ("direct", "engine")


@dataclass
class NabResult:
    files: int
    rows: int
    scores: dict[str, float]
    report: str
    result: dict[str, Any] = field(default_factory=dict)
    references: dict[str, dict[str, float]] = field(default_factory=dict)


def default_scorer(data_dir: Path) -> Path:
    """``shared/tools/nab_score.py`` next to ``shared/data/nab``."""
    return data_dir.resolve().parents[1] / "tools" / "nab_score.py"


def find_nab_data(start: Path | None = None) -> Path | None:
    """``shared/data/nab`` in ``start`` (default: the working directory) or any of its
    parents: ``../shared`` of a clone, or of the folder that holds a git worktree."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "shared" / "data" / "nab"
        if (candidate / "data").is_dir():
            return candidate
    return None


def data_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "data").glob("*/*.csv"))


def read_rows(path: Path) -> tuple[list[str], list[int], list[float]]:
    """Timestamp strings (as in the file), event times (ms) and values of a NAB file."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        t_col, v_col = header.index("timestamp"), header.index("value")
        body = [row for row in rows if row]
    stamps = [row[t_col] for row in body]
    return stamps, [_nab_ms(s) for s in stamps], [float(row[v_col]) for row in body]


def score_series(times: Iterable[int], values: Iterable[float],
                 config: DetectorConfig | None = None) -> list[float]:
    """Anomaly scores of one series, as the decision engine computes them: one fresh
    state, ``score`` then ``learn`` per sample, rounded to 6 decimals as on a decision.

    >>> import math
    >>> scores = score_series(range(0, 400 * 60_000, 60_000),
    ...                       [25.0 if i == 350 else 10.0 + math.sin(i / 5.0) for i in range(400)])
    >>> len(scores), scores[0], scores[349], scores[350]
    (400, 0.0, 0.063155, 1.0)
    """
    det = AdaptiveDetector(config)
    st = det.new_state()
    out = []
    for ts, value in zip(times, values, strict=True):
        scored = det.score(st, value, ts)
        det.learn(st, scored)
        out.append(round(scored.score, 6))
    return out


async def _engine_scores(path: Path) -> list[float]:
    return [d.anomaly_score
            async for batch in decide(read_nab_csv(path, path.stem, "value"), observe_only())
            for d in batch]


def score_file(path: Path, path_kind: str = "direct") -> list[tuple[str, float]]:
    """(timestamp string, anomaly_score) per row of one file."""
    # The scorer wants the file's own timestamp strings back, not parsed times.
    stamps, times, values = read_rows(path)
    if path_kind == "direct":
        scores = score_series(times, values)
    elif path_kind == "engine":
        scores = asyncio.run(_engine_scores(path))
    else:
        raise ValueError(f"unknown evaluation path {path_kind!r} (one of {PATHS})")
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


def reference_scores(scorer: Path) -> dict[str, dict[str, float]]:
    """The published detectors' scores on this data: the reference table of the
    scorer's README (``| detector | standard | low FP | low FN |``), if it is there."""
    readme = scorer.parent / "README.md"
    if not readme.is_file():
        return {}
    found: dict[str, dict[str, float]] = {}
    row = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*$")
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = row.match(line)
        if m:
            found[m.group(1)] = dict(zip(PROFILES, map(float, m.groups()[1:]), strict=True))
    return found


@dataclass
class Tally:
    """Raw score and window/row counts of a group of files at the chosen threshold."""

    raw: float = 0.0
    tp: int = 0
    fn: int = 0
    fp: int = 0
    files: int = 0

    def add(self, r: dict[str, Any]) -> None:
        self.raw += r["score"]
        self.tp += r["tp_windows"]
        self.fn += r["fn_windows"]
        self.fp += r["fp_rows"]
        self.files += 1

    def normalised(self, profile: str) -> float:
        """NAB's normalisation on this group alone (null: every window missed; perfect:
        every window detected at its first row), at the threshold chosen for all files."""
        windows = self.tp + self.fn
        null = -FN_WEIGHT[profile] * windows
        return 100.0 * (self.raw - null) / (windows - null) if windows else float("nan")


def by_category(per_file: dict[str, dict[str, Any]]) -> dict[str, Tally]:
    out: dict[str, Tally] = {}
    for rel, r in sorted(per_file.items()):
        out.setdefault(rel.split("/", 1)[0], Tally()).add(r)
    return out


def _profiles(result: dict, name: str) -> dict[str, dict[str, Any]]:
    body = result.get("results", result).get(name, {})
    return {p: body[p] for p in PROFILES if p in body}


def format_report(result: dict, references: dict[str, dict[str, float]],
                  name: str = "ia") -> str:
    """Overall scores beside the published ones, then per category and per file."""
    profiles = _profiles(result, name)
    mine = {p: r["normalized"] for p, r in profiles.items()}
    lines = [f"{'detector':60s}" + "".join(f"{SHORT[p]:>10s}" for p in PROFILES)]
    table = {**references, f"{name} (this detector)": mine}
    for det, scores in sorted(table.items(), key=lambda kv: -kv[1].get("standard", 0.0)):
        lines.append(f"{det[:60]:60s}" + "".join(f"{scores.get(p, float('nan')):10.2f}"
                                                  for p in PROFILES))
    for p, r in profiles.items():
        thr = r["threshold"]
        lines += ["", f"{SHORT[p]} at threshold {'none' if thr is None else f'{thr:.6g}'}: "
                  f"TP {r['tp_windows']} FN {r['fn_windows']} FP rows {r['fp_rows']}",
                  f"  {'category':26s} {'files':>5s} {'score':>7s} {'raw':>8s} "
                  f"{'TP':>4s} {'FN':>4s} {'FP':>5s}"]
        for cat, t in by_category(r["per_file"]).items():
            lines.append(f"  {cat:26s} {t.files:5d} {t.normalised(p):7.2f} {t.raw:8.3f} "
                         f"{t.tp:4d} {t.fn:4d} {t.fp:5d}")
    std = profiles.get("standard")
    if std:
        lines += ["", "per file (standard):",
                  f"  {'file':58s} {'raw':>7s} {'TP':>3s} {'FN':>3s} {'FP':>4s}"]
        lines += [f"  {rel:58s} {r['score']:7.3f} {r['tp_windows']:3d} {r['fn_windows']:3d} "
                  f"{r['fp_rows']:4d}" for rel, r in std["per_file"].items()]
    return "\n".join(lines)


def evaluate_nab(data_dir: Path, out_dir: Path, scorer: Path | None = None,
                 path_kind: str = "direct") -> NabResult:
    files = data_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no NAB data files under {data_dir / 'data'}")
    scorer = scorer or default_scorer(data_dir)
    rows = 0
    for path in files:
        scored = score_file(path, path_kind)
        rows += len(scored)
        write_scores(scored, out_dir / path.parent.name / path.name)
    _, result = run_scorer(scorer, data_dir, out_dir)
    refs = reference_scores(scorer)
    return NabResult(files=len(files), rows=rows, scores=_normalised(result, "ia"),
                     report=format_report(result, refs), result=result, references=refs)
