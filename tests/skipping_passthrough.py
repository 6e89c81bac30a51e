"""``ia bench passthrough`` behind a broker that moved past a range of offsets.

The first records the app's consumer fetches from partition 0 of the telemetry topic come
back without offsets ``0 .. IA_TEST_SKIP - 1``, as when tansu serves a later batch before
an earlier one is stored (see :mod:`ia.core.gaps`); the consumer's position moves past
them as it does then, and later fetches are untouched.  Run as
``python -m tests.skipping_passthrough`` with the usual ``ia`` settings in the environment.
"""

from __future__ import annotations

import os

from aiokafka.consumer.fetcher import Fetcher

from ia.bench.passthrough import build_passthrough
from ia.core.settings import Settings
from ia.streams.app import run_faust


def skip_first_offsets(topic: str, n: int) -> None:
    """Drop the records of ``topic[0]`` below offset ``n`` until one at or above it has
    been fetched: what a live consumer gets when the broker skipped offsets 0..n-1."""
    fetched_records = Fetcher.fetched_records
    passed = False

    async def skipping(self, partitions, timeout=0, max_records=None):  # type: ignore[no-untyped-def]
        nonlocal passed
        records = await fetched_records(self, partitions, timeout=timeout,
                                        max_records=max_records)
        for tp, batch in records.items():
            if not passed and tp.topic == topic and tp.partition == 0:
                records[tp] = [r for r in batch if r.offset >= n]
                passed = bool(records[tp])
        return {tp: batch for tp, batch in records.items() if batch}

    Fetcher.fetched_records = skipping  # type: ignore[method-assign]


def main() -> None:
    settings = Settings()
    skip_first_offsets(settings.topics.telemetry, int(os.environ["IA_TEST_SKIP"]))
    run_faust(build_passthrough(settings), settings)


if __name__ == "__main__":
    main()
