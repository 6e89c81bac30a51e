"""`ia bench features` runs end to end and reports what the issue asks for (figures are
printed by the command, not asserted here: timings are not tests)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ia.bench.features import BenchOptions, format_report, run_bench
from ia.cli import main
from ia.core.redis import sync_client

pytestmark = pytest.mark.integration

REQUIRED = ("enrich_us_per_event_batch_1", "enrich_us_per_event_batch_100",
            "enrich_us_per_event_batch_1000", "redis_bytes_per_entity_metric")


def test_bench_reports_every_figure_and_cleans_up(infra) -> None:
    opts = BenchOptions(entities=60, rounds={1: 3, 100: 2, 500: 1, 1000: 1}, memory_samples=10)
    result = run_bench(infra.redis, opts)
    for key in REQUIRED:
        assert result[key] > 0, key
    assert set(result["batches"]) == {"1", "100", "500", "1000"}
    assert result["batches"]["1000"]["hgetall_us"]["median"] > 0
    assert result["series_state_bytes"] == 693
    report = format_report(result)
    assert "raw HGETALL" in report and "per (entity, metric)" in report
    r = sync_client(infra.redis)
    try:
        assert not list(r.scan_iter(match=f"{result['redis_prefix']}:*", count=1000))
    finally:
        r.close()


def test_bench_features_command_writes_json(infra, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(BenchOptions, "quick", classmethod(lambda cls: cls(
        entities=40, rounds={1: 2, 100: 1, 1000: 1}, memory_samples=5)))
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "features", "--quick", "--json", str(out)],
                             env=infra.env)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert all(key in data for key in REQUIRED)
    assert "enrich us/event" in res.output
