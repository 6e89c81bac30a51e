"""GapGuard: every offset of a partition delivered once, a skipped batch fetched again,
a gap with no record behind it given up on after the grace (no broker needed)."""

from __future__ import annotations

from ia.core.gaps import GapGuard

T = "t"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _guard(**options: float) -> tuple[GapGuard, list[tuple[str, int, int]], Clock]:
    seeks: list[tuple[str, int, int]] = []
    clock = Clock()
    guard = GapGuard(lambda t, p, o: seeks.append((t, p, o)), clock=clock, **options)
    return guard, seeks, clock


def _delivered(guard: GapGuard, offsets: list[int], partition: int = 0) -> list[int]:
    return [o for o in offsets if guard.admit(T, partition, o)]


def test_contiguous_offsets_are_delivered_without_seeking():
    guard, seeks, _ = _guard()
    guard.expect(T, 0, 0)
    assert _delivered(guard, list(range(10))) == list(range(10))
    assert seeks == [] and guard.stats.gaps == 0


def test_a_skipped_batch_is_fetched_again_and_every_offset_delivered_once():
    guard, seeks, clock = _guard()
    guard.expect(T, 0, 0)
    # The broker served batch 5..9 before it stored batch 3..4.
    got = _delivered(guard, [0, 1, 2, 5, 6, 7, 8, 9])
    assert got == [0, 1, 2]
    assert seeks == [(T, 0, 3)], "one seek back to the first missing offset"
    assert guard.open_gaps() == {(T, 0): 3}
    clock.now += 0.01
    got += _delivered(guard, [3, 4, 5, 6, 7, 8, 9, 10])  # the re-fetch from 3
    assert got == list(range(11))
    assert guard.stats.refetched == 1 and guard.stats.accepted == 0
    assert guard.open_gaps() == {}


def test_records_below_the_next_offset_are_dropped_as_duplicates():
    guard, _, _ = _guard()
    guard.expect(T, 0, 0)
    assert _delivered(guard, [0, 1, 2, 1, 2, 3]) == [0, 1, 2, 3]
    assert guard.stats.duplicates == 2


def test_a_gap_is_sought_again_only_when_its_retry_is_due():
    guard, seeks, clock = _guard(retry_s=0.1)
    guard.expect(T, 0, 0)
    _delivered(guard, [2, 3, 4])
    assert len(seeks) == 1
    guard.tick()
    assert len(seeks) == 1, "no second seek within retry_s"
    clock.now += 0.1
    guard.tick()
    assert seeks == [(T, 0, 0), (T, 0, 0)], "tick seeks again though no record arrived"


def test_a_skipped_first_batch_is_a_gap_when_the_start_is_known():
    guard, seeks, _ = _guard()
    guard.expect(T, 0, 0)
    assert _delivered(guard, [4, 5]) == []
    assert seeks == [(T, 0, 0)]


def test_without_a_known_start_a_partition_starts_at_its_first_record():
    guard, seeks, _ = _guard()
    assert _delivered(guard, [7, 8]) == [7, 8]
    assert seeks == []


def test_a_gap_that_outlives_the_grace_is_accepted_from_its_first_record_on():
    guard, seeks, clock = _guard(retry_s=0.1, grace_s=1.0)
    guard.expect(T, 0, 0)
    assert _delivered(guard, [0, 3, 4]) == [0]
    clock.now += 1.0
    # Records beyond the lowest one after the gap are still held back...
    assert _delivered(guard, [4]) == []
    # ...until the re-fetch brings the first record after the gap again.
    assert _delivered(guard, [3, 4, 5]) == [3, 4, 5]
    assert guard.stats.accepted == 1 and guard.stats.skipped_offsets == 2
    assert guard.stats.refetched == 0 and guard.open_gaps() == {}
    assert len(seeks) >= 1


def test_partitions_are_tracked_apart_and_forget_drops_one():
    guard, seeks, _ = _guard()
    guard.expect(T, 0, 0)
    guard.expect(T, 1, 0)
    assert _delivered(guard, [0, 1], partition=0) == [0, 1]
    assert _delivered(guard, [0, 2], partition=1) == [0]
    assert seeks == [(T, 1, 1)]
    guard.forget(T, 1)
    assert guard.open_gaps() == {}
    assert _delivered(guard, [9], partition=1) == [9], "a forgotten partition starts afresh"


def test_track_starts_a_partition_once_and_leaves_a_tracked_one_alone():
    guard, seeks, _ = _guard()
    guard.track(T, 0, 5)
    guard.track(T, 0, 9)  # a later position of the same reading: no new start
    assert _delivered(guard, [5, 6]) == [5, 6]
    guard.track(T, 0, 0)
    assert _delivered(guard, [7]) == [7] and seeks == []
    guard.forget(T, 0)
    guard.track(T, 0, 3)
    assert _delivered(guard, [4]) == [] and seeks == [(T, 0, 3)]


def test_a_run_from_the_next_offset_is_delivered_whole_and_any_other_run_is_refused():
    guard, seeks, _ = _guard()
    guard.expect(T, 0, 0)
    assert guard.admit_run(T, 0, 0, 5)
    assert not guard.admit_run(T, 0, 7, 3), "a run beyond the next offset is a gap"
    assert not guard.admit_run(T, 0, 3, 3), "a run of duplicates"
    assert not guard.admit_run(T, 1, 0, 3), "an untracked partition: record by record"
    assert _delivered(guard, [5, 6]) == [5, 6] and seeks == []
    assert _delivered(guard, [9]) == [] and seeks == [(T, 0, 7)]
    assert not guard.admit_run(T, 0, 7, 3), "a gap is open: its records are judged one by one"
    assert _delivered(guard, [7, 8, 9]) == [7, 8, 9] and guard.stats.refetched == 1
