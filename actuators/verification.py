"""Verification of an action's effect, and the compensating action when it fails.

An action declares both in its params (policy YAML; values are strings)::

    action:
      type: simulator
      target: "{entity}"
      params:
        op: scale_out
        verify_metric: latency_ms      # default: the decision's metric
        verify_within_s: 60            # the metric must recover within this time
        verify_below: 250              # ... to below this value (or verify_above)
        compensate: notify             # action type to run when it does not
        compensate.message: "scale-out did not help"   # params of the compensating action
        # compensate_target: other     # default: the same target

After the action succeeds the actuator watches the feature store (the
worker's per-series state in Redis): the metric has *recovered* once a sample
newer than the action satisfies the threshold.  If no such sample arrives in
time (including no sample at all) verification fails, the compensating action
runs, and both outcomes are published (phases ``verification`` and
``compensation``).  Pending verifications live in Redis, so they survive an
actuator restart and any actuator process may finish them.

A pending verification is scheduled in the same transaction as the action's
``done`` claim (:class:`VerificationJob`, written by the executor), and
removed only once its verdict and compensation are published
(:meth:`Verifier.finish`).  In between, the actuator that reached the verdict
holds the job for a lease with the verdict stored in it: if that actuator dies
before publishing, another one publishes the same verdict once the lease has
run out (the compensation, claimed on its own, does not run twice).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from ia.core import clock
from ia.core.errors import IaError
from ia.core.keys import Keys
from ia.features.store import RedisFeatureStore
from ia.schemas.models import Action, Decision
from ia.schemas.serde import decode, encode


class SpecError(IaError, ValueError):
    pass


@dataclass(frozen=True)
class VerifySpec:
    metric: str
    entity: str
    within_s: float
    below: float | None = None
    above: float | None = None
    compensate: Action | None = None

    def recovered(self, value: float) -> bool:
        return (self.below is None or value < self.below) and \
               (self.above is None or value > self.above)

    def describe(self) -> str:
        parts = []
        if self.below is not None:
            parts.append(f"< {self.below:g}")
        if self.above is not None:
            parts.append(f"> {self.above:g}")
        return f"{self.metric} {' and '.join(parts)} within {self.within_s:g}s"


def _number(params: dict[str, str], key: str) -> float | None:
    raw = params.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SpecError(f"{key}={raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SpecError(f"{key} must be finite")
    return value


def spec_of(d: Decision) -> VerifySpec | None:
    """The verification an action declares, or None; raises :class:`SpecError`."""
    if d.action is None:
        return None
    p = d.action.params
    if not any(k.startswith("verify_") for k in p) and "compensate" not in p:
        return None
    within = _number(p, "verify_within_s")
    below, above = _number(p, "verify_below"), _number(p, "verify_above")
    if within is None or within <= 0:
        raise SpecError("verify_within_s (> 0) is required")
    if below is None and above is None:
        raise SpecError("verify_below or verify_above is required")
    compensate = None
    if p.get("compensate"):
        params = {k.split(".", 1)[1]: v for k, v in p.items()
                  if k.startswith("compensate.") and k != "compensate."}
        compensate = Action(type=p["compensate"],
                            target=p.get("compensate_target") or d.action.target, params=params)
    return VerifySpec(metric=p.get("verify_metric") or d.metric,
                      entity=p.get("verify_entity") or d.entity, within_s=within, below=below,
                      above=above, compensate=compensate)


@dataclass
class Verdict:
    decision: Decision
    spec: VerifySpec
    recovered: bool
    detail: str
    started_at: int
    at: int


@dataclass(frozen=True)
class VerificationJob:
    """A pending verification, to be written in the caller's transaction (:meth:`queue`)."""

    key: str
    due_key: str
    decision_id: str
    body: str
    deadline: int
    ttl_s: int

    def queue(self, pipe) -> None:
        # NX: a retry after a reply lost on the way must not reset a job already taken.
        pipe.set(self.key, self.body, ex=self.ttl_s, nx=True)
        pipe.zadd(self.due_key, {self.decision_id: self.deadline}, nx=True)


# Compare-and-set of a job's body, keeping its expiry.
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


class Verifier:
    """Pending verifications in Redis, checked against the feature store."""

    def __init__(self, client, prefix: str = "ia", lease_s: float = 120.0) -> None:
        """``lease_s``: how long a verdict is held for publication by the actuator
        that reached it before another one may publish it instead."""
        self.client = client
        self.store = RedisFeatureStore(client, prefix)
        self.keys = Keys(prefix)
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lease_ms = int(lease_s * 1000)

    async def latest(self, entity: str, metric: str) -> tuple[int, float] | None:
        """(samples seen, last value) of one series in the worker's feature store.

        The only place that knows the store's layout: the worker keeps one
        hash per entity with the per-metric state (:mod:`ia.features.store`).
        """
        rec = (await self.store.load([entity]))[entity]
        state = rec.series.get(metric)
        return None if state is None else (state.n, state.last_value)

    async def job(self, d: Decision, spec: VerifySpec, now_ms: int | None = None
                  ) -> VerificationJob:
        """The verification of ``d``'s action, watching ``spec.metric`` from its current
        state (build it after the action ran)."""
        now = clock.now_ms() if now_ms is None else now_ms
        seen = await self.latest(spec.entity, spec.metric)
        deadline = now + int(spec.within_s * 1000)
        body = json.dumps({"decision": encode(d, "json").decode(), "since_n": seen[0] if seen
                           else 0, "started_at": now, "deadline": deadline})
        return VerificationJob(self.keys.verification(d.decision_id),
                               self.keys.verifications_due, d.decision_id, body, deadline,
                               int(spec.within_s) + 7 * 24 * 3600)

    async def poll(self, now_ms: int | None = None, limit: int = 500) -> list[Verdict]:
        """Every verification that recovered or ran out of time, held for publication.

        Call :meth:`finish` once the verdicts (and compensations) are published.
        """
        now = clock.now_ms() if now_ms is None else now_ms
        out = []
        for raw_id in await self.client.zrange(self.keys.verifications_due, 0, limit - 1):
            did = raw_id.decode()
            body = await self.client.get(self.keys.verification(did))
            if body is None:
                await self.client.zrem(self.keys.verifications_due, did)
                continue
            job = json.loads(body)
            held = job.get("held")
            if held and held["owner"] != self.owner and held["until"] > now:
                continue  # another actuator is publishing its verdict
            d = decode(job["decision"].encode(), Decision, "json")
            spec = spec_of(d)
            if spec is None:  # pragma: no cover - only scheduled with a spec
                await self.finish([did])
                continue
            verdict = job.get("verdict") or await self._judge(job, spec, now)
            if verdict is None:
                continue
            taken = {**job, "verdict": verdict, "held": {"owner": self.owner,
                                                         "until": now + self.lease_ms}}
            # Whoever swaps the body publishes the verdict (several actuators may poll).
            if await self.client.eval(_SWAP, 1, self.keys.verification(did), body,
                                      json.dumps(taken)):
                out.append(Verdict(d, spec, verdict["recovered"], verdict["detail"],
                                   job["started_at"], verdict["at"]))
        return out

    async def _judge(self, job: dict, spec: VerifySpec, now: int) -> dict | None:
        """The verdict on ``job`` at ``now``, or None while it may still recover."""
        seen = await self.latest(spec.entity, spec.metric)
        fresh = seen is not None and seen[0] > job["since_n"]
        value = seen[1] if seen is not None else 0.0
        waited = (now - job["started_at"]) / 1000
        if fresh and spec.recovered(value):
            return {"recovered": True, "at": now, "detail": f"{spec.metric} recovered to "
                    f"{value:g} after {waited:.1f}s ({spec.describe()})"}
        if now < job["deadline"]:
            return None
        seen_text = f"last value {value:g}" if fresh else f"no new {spec.metric} sample"
        return {"recovered": False, "at": now, "detail": f"{spec.metric} did not recover: "
                f"{seen_text} after {waited:.1f}s ({spec.describe()})"}

    async def finish(self, decision_ids: Iterable[str]) -> None:
        """Remove the verifications of ``decision_ids``: their outcomes are published."""
        ids = list(decision_ids)
        if not ids:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.verifications_due, *ids)
            pipe.delete(*(self.keys.verification(did) for did in ids))
            await pipe.execute()
