"""One conformance suite per guard-store protocol, run against memory and Redis.

Replay and the policy tester run the guards on :class:`MemoryGuardStore`,
workers and actuators on :class:`RedisGuardStore`; a replay only reproduces
production if both answer every call the same way.  Each test states what a
protocol promises (``ia.decisions.guards.stores``) and runs once per backend,
in the manner of River's ``check_estimator``.  The last tests pin the Redis
key layout, which must not change without a data migration.
"""

from __future__ import annotations

import random
import uuid

import pytest

from ia.decisions.guards import BreakerVerdict as V
from ia.decisions.guards import FloorVerdict, HealthSpan, MemoryGuardStore, RedisGuardStore
from ia.decisions.windows import FreezeWindow

T0 = 1_700_000_000_000
BREAKER = (2, 10_000, 5_000, 3_000)  # failures, window_ms, open_ms, probe_timeout_ms


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store(request):
    if request.param == "memory":
        return MemoryGuardStore()
    return RedisGuardStore(request.getfixturevalue("aredis"), prefix=f"t{uuid.uuid4().hex[:8]}")


# --- ClaimStore -----------------------------------------------------------------------------


async def test_claims_block_other_owners_until_they_lapse(store) -> None:
    assert await store.claim("c", "o1", T0, T0 + 100) == "o1"
    assert await store.claim("c", "o2", T0 + 50, T0 + 150) == "o1"
    assert await store.claim("c", "o1", T0 + 500, T0 + 600) == "o1"  # its own, even later
    assert await store.claim("c", "o2", T0 + 601, T0 + 700) == "o2"  # lapsed: taken
    assert await store.claim("other", "o3", T0, T0 + 100) == "o3"


async def test_only_the_holder_releases_a_claim(store) -> None:
    await store.claim("c", "o1", T0, T0 + 100)
    await store.release_claim("c", "o2")
    assert await store.claim("c", "o2", T0 + 1, T0 + 100) == "o1"
    await store.release_claim("c", "o1")
    assert await store.claim("c", "o2", T0 + 1, T0 + 100) == "o2"
    await store.release_claim("never-claimed", "o1")


async def test_claims_follow_the_claim_rule_out_of_order(store) -> None:
    """A random walk of claims, mostly forward in event time, against the rule itself:
    a claim blocks another owner while its ``until_ts`` is after the claim's ``ts``."""
    rng = random.Random(99)
    held: dict[str, tuple[str, int]] = {}
    ts, outcomes = 1_000_000, set()
    for _ in range(400):
        ts += rng.randint(-500, 1_500)
        key, owner = rng.choice(["k1", "k2", "k3"]), rng.choice(["d1", "d2", "d3", "d4"])
        until = ts + rng.randint(0, 5_000)
        holder, hold_until = held.get(key, ("", 0))
        expected = holder if holder and (holder == owner or hold_until > ts) else owner
        if expected == owner and holder != owner:
            held[key] = (owner, until)
        assert await store.claim(key, owner, ts, until) == expected, (key, owner, ts, until)
        outcomes.add(expected == owner)
    assert outcomes == {True, False}


# --- WindowStore ----------------------------------------------------------------------------


async def test_window_admits_up_to_the_limit_and_slides(store) -> None:
    got = [await store.window_admit("w", f"m{i}", T0 + i * 1000, 3000, 2.5) for i in range(5)]
    assert got == [(True, 1), (True, 2), (False, 2), (True, 2), (True, 2)]
    assert await store.window_admit("w", "m1", T0 + 4000, 3000, 2.5) == (True, 2)  # again
    await store.window_release("w", "m4")
    assert await store.window_admit("w", "m5", T0 + 4000, 3000, 2.5) == (True, 2)


async def test_window_weights_add_up(store) -> None:
    assert await store.window_admit("cost", "a", T0, 60_000, 10, 4.5) == (True, 4.5)
    assert await store.window_admit("cost", "b", T0, 60_000, 10, 4.5) == (True, 9.0)
    assert await store.window_admit("cost", "c", T0, 60_000, 10, 4.5) == (False, 9.0)
    await store.window_release("cost", "b", 4.5)
    assert await store.window_admit("cost", "c", T0 + 1, 60_000, 10, 4.5) == (True, 9.0)
    assert await store.window_admit("other", "c", T0, 60_000, 10, 4.5) == (True, 4.5)


# --- SlotStore and FleetStore ---------------------------------------------------------------


async def test_slots_are_limited_renewed_released_and_leased(store) -> None:
    got = [await store.slot_acquire("g", f"s{i}", T0, 2, 1000) for i in range(3)]
    assert got == [(True, 1), (True, 2), (False, 2)]
    assert await store.slot_acquire("g", "s0", T0 + 10, 2, 1000) == (True, 2)  # renewed
    assert await store.slot_acquire("other", "s2", T0, 2, 1000) == (True, 1)
    await store.slot_release("s0")
    await store.slot_release("never-held")
    assert await store.slot_acquire("g", "s3", T0 + 20, 2, 1000) == (True, 2)
    assert await store.slot_acquire("g", "s4", T0 + 2000, 2, 1000) == (True, 1)  # leases ended


async def test_the_group_of_a_decision_is_remembered(store) -> None:
    await store.note_group("x", "service=pay")
    assert (await store.group_of("x"), await store.group_of("y")) == ("service=pay", None)


async def test_fleet_counts_distinct_entities_per_group(store) -> None:
    await store.fleet_add("f", ["a", "b"])
    await store.fleet_add("f", ["b", "c"])
    await store.fleet_add("g", ["a"])
    assert [await store.fleet_size(g) for g in ("f", "g", "nothing")] == [3, 1, 0]


# --- BreakerStore and ResultStore -----------------------------------------------------------


async def _open_breaker(store) -> None:
    for n, at in ((1, T0), (2, T0 + 1)):
        await store.record_result("b", ["global"], f"f{n}", False, at)


async def test_breaker_opens_then_lets_one_probe_through(store) -> None:
    assert await store.breaker_check("b", "p0", T0, *BREAKER) == V("closed", True, "")
    await _open_breaker(store)
    checks = [(await store.breaker_check("b", owner, now, *BREAKER))
              for owner, now in (("p0", T0 + 10), ("p1", T0 + 5_010), ("p2", T0 + 5_020),
                                 ("p1", T0 + 5_030), ("p3", T0 + 8_011))]
    assert [(v.state, v.allowed, v.detail) for v in checks] == [
        ("open", False, str(T0 + 10)), ("half_open", True, "p1"), ("half_open", False, "p1"),
        ("half_open", True, "p1"),   # the probe asking again
        ("half_open", True, "p3")]   # p1 did not report within probe_timeout_ms
    assert (await store.breaker_check("other", "p9", T0 + 10, *BREAKER)).allowed


async def test_a_released_probe_is_taken_by_the_next_decision(store) -> None:
    await _open_breaker(store)
    await store.breaker_check("b", "p0", T0 + 10, *BREAKER)
    assert (await store.breaker_check("b", "p1", T0 + 5_010, *BREAKER)).detail == "p1"
    await store.breaker_release_probe("b", "p2")  # not the probe: no-op
    assert not (await store.breaker_check("b", "p2", T0 + 5_011, *BREAKER)).allowed
    await store.breaker_release_probe("b", "p1")
    assert await store.breaker_check("b", "p2", T0 + 5_012, *BREAKER) == V("half_open", True, "p2")


async def test_the_probes_result_closes_or_reopens_the_breaker(store) -> None:
    await _open_breaker(store)
    await store.breaker_check("b", "p0", T0 + 10, *BREAKER)
    await store.breaker_check("b", "p1", T0 + 5_010, *BREAKER)
    await store.record_result("b", [], "p1", False, T0 + 5_100)
    reopened = V("open", False, str(T0 + 5_100))  # from the probe's outcome
    assert await store.breaker_check("b", "p2", T0 + 10_099, *BREAKER) == reopened
    await store.breaker_check("b", "p2", T0 + 10_100, *BREAKER)
    await store.record_result("b", [], "p2", True, T0 + 10_200)
    # closed, and the failures before it closed no longer count
    assert await store.breaker_check("b", "p3", T0 + 10_300, *BREAKER) == V("closed", True, "")


async def test_results_count_per_scope_within_the_window(store) -> None:
    await store.record_result("b", ["global", "rule:r"], "f1", False, T0)
    await store.record_result("b", ["global", "rule:r"], "f2", False, T0 + 1)
    await store.record_result("b", ["global"], "ok1", True, T0 + 2)
    await store.record_result("b", ["global"], "late", True, T0 + 2)
    await store.record_result("b", ["global"], "late", False, T0 + 2)  # replaces its success
    assert await store.results("global", T0 + 3, 10_000) == (1, 3)
    assert await store.results("rule:r", T0 + 3, 10_000) == (0, 2)
    assert await store.results("rule:other", T0 + 3, 10_000) == (0, 0)
    assert await store.results("global", T0 + 20_000, 10_000) == (0, 0)


# --- FreezeStore ----------------------------------------------------------------------------


def _window(name: str, **kw) -> FreezeWindow:
    return FreezeWindow.model_validate({
        "name": name, "effect": "block", "owner": "op", "reason": "test",
        "start": T0, "end": T0 + 3_600_000, **kw})


async def test_freeze_windows_are_added_once_listed_by_name_and_removed(store) -> None:
    assert await store.freeze_windows() == []
    b, a = _window("b"), _window("a", effect="needs_approval", match={"labels": {"env": "prod"}})
    assert await store.add_freeze_window(b) and await store.add_freeze_window(a)
    assert not await store.add_freeze_window(_window("a", reason="other"))  # name taken
    assert await store.freeze_windows() == [a, b]
    assert await store.remove_freeze_window("a") == a
    assert await store.remove_freeze_window("a") is None
    assert await store.freeze_windows() == [b]


async def test_a_decisions_scope_is_remembered(store) -> None:
    assert await store.scope_of("d1") is None
    await store.note_scope("d1", {"labels": {"env": "prod"}, "held": ["w"]})
    assert await store.scope_of("d1") == {"labels": {"env": "prod"}, "held": ["w"]}


# --- HealthStore ----------------------------------------------------------------------------

SPAN = HealthSpan(fresh_ms=60_000, anomaly_ms=120_000, member_ms=600_000)


async def _fleet(store, n: int, at: int) -> None:
    await store.health_seen("g", {f"e{i}": at for i in range(n)}, 0)


async def test_the_floor_counts_fresh_members_without_anomalies(store) -> None:
    await _fleet(store, 10, T0)
    admit = store.health_admit
    # The target counts as out: 9 of 10 healthy.
    assert await admit("g", "e0", "d1", T0, SPAN, 90, 1000, False) == FloorVerdict(True, 9, 10)
    assert await admit("g", "e0", "d1", T0, SPAN, 95, 1000, False) == FloorVerdict(False, 9, 10)
    await store.health_anomaly("g", "e1", T0)
    await store.health_anomaly("g", "e2", T0 - 200_000)   # too old to count
    assert await admit("g", "e0", "d1", T0, SPAN, 50, 1000, False) == FloorVerdict(True, 8, 10)
    # Later: nobody sent a fresh sample but e3: only it is healthy; e1's anomaly has aged out.
    await store.health_seen("g", {"e3": T0 + 100_000}, 0)
    assert await admit("g", "e0", "d1", T0 + 130_000, SPAN, 10, 1000, False) == \
        FloorVerdict(True, 1, 10)
    # Members not seen within member_ms leave the group; the one left is stale by now.
    assert await admit("g", "e0", "d1", T0 + 650_000, SPAN, 10, 1000, False) == \
        FloorVerdict(False, 0, 1)


async def test_admitted_actions_hold_their_targets_out_until_released_or_lapsed(store) -> None:
    await _fleet(store, 4, T0)
    admit = store.health_admit
    assert (await admit("g", "e0", "d0", T0, SPAN, 50, 10_000, True)).admitted   # 3/4
    assert (await admit("g", "e1", "d1", T0, SPAN, 50, 10_000, True)).admitted   # 2/4
    assert await admit("g", "e2", "d2", T0, SPAN, 50, 10_000, True) == FloorVerdict(False, 1, 4)
    assert (await admit("g", "e1", "d1", T0, SPAN, 50, 10_000, True)).admitted   # idempotent
    await store.health_release("g", "e1", "d1")
    assert (await admit("g", "e2", "d2", T0, SPAN, 50, 10_000, True)).admitted
    # Holds lapse with their lease.
    assert await admit("g", "e3", "d3", T0 + 10_001, SPAN, 75, 10_000, False) == \
        FloorVerdict(True, 3, 4)


async def test_an_unknown_group_is_not_admitted(store) -> None:
    assert await store.health_admit("nobody", "e0", "d1", T0, SPAN, 1, 1000, True) == \
        FloorVerdict(False, 0, 0)


# --- the Redis layout -----------------------------------------------------------------------


@pytest.mark.integration
async def test_redis_keys_and_encodings(aredis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    store = RedisGuardStore(aredis, prefix=prefix)
    await store.claim("cooldown:target:svc-a", "d1", T0, T0 + 60_000)
    await store.window_admit("rate:r", "d1", T0, 60_000, 5)
    await store.window_admit("cost", "d1", T0, 60_000, 10, 2.5)
    await store.slot_acquire("service=pay", "d1", T0, 2, 30_000)
    await store.note_group("d1", "service=pay")
    await store.fleet_add("service=pay", ["svc-a"])
    await store.record_result("log:svc-a", ["global"], "d1", False, T0)
    await store.breaker_check("log:svc-a", "d2", T0 + 1, 1, 60_000, 5_000, 3_000)
    keys = sorted(k.decode().removeprefix(f"{prefix}:") for k in await aredis.keys(f"{prefix}:*"))
    assert keys == ["claim:cooldown:target:svc-a", "g:cb-fail:log:svc-a", "g:cb:log:svc-a",
                    "g:eb:global:fail", "g:fleet:service=pay", "g:group-of:d1",
                    "g:slot-of:d1", "g:slots:service=pay", "g:win:cost", "g:win:rate:r"]
    k = f"{prefix}:"
    assert await aredis.get(k + "claim:cooldown:target:svc-a") == f"d1|{T0 + 60_000}".encode()
    assert 0 < await aredis.pttl(k + "claim:cooldown:target:svc-a") <= 24 * 3600 * 1000
    assert await aredis.zrange(k + "g:win:cost", 0, -1, withscores=True) == [(b"2.5|d1", T0)]
    assert await aredis.zrange(k + "g:win:rate:r", 0, -1) == [b"1.0|d1"]
    assert await aredis.zrange(k + "g:slots:service=pay", 0, -1, withscores=True) == [
        (b"d1", T0 + 30_000)]
    assert await aredis.get(k + "g:slot-of:d1") == b"service=pay"
    assert await aredis.get(k + "g:group-of:d1") == b"service=pay"
    assert await aredis.hgetall(k + "g:cb:log:svc-a") == {b"state": b"open",
                                                          b"opened_at": str(T0 + 1).encode()}
    assert await aredis.zrange(k + "g:eb:global:fail", 0, -1) == [b"d1"]
