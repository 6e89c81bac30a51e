"""Human approval of ``needs_approval`` decisions, kept in Redis.

Redis is the authority on an approval's state; the events on ``ia.approvals``
announce each step.  Layout (keys from :mod:`ia.core.keys`; the spec is
``docs/redis-layout.md``)::

    {prefix}:appr:{approval_id}   hash: status, request (the requested event, JSON),
                                  decision (JSON), expires_at, by, via, at, reason
    {prefix}:appr:pending         zset approval_id -> expires_at (still requested)
    {prefix}:appr:unfinished      zset approval_id -> resolved at (outcome not yet produced)
    {prefix}:appr:index           zset approval_id -> requested_at (for listing)

Every transition is one Lua script, so an approval and a rejection (or an
expiry) racing each other cannot both win, and a request answered after its
expiry is refused.  Events are rebuilt from the stored fields, so re-sending
one yields the same bytes.
"""

from __future__ import annotations

import hashlib
import json

from ia.core import clock
from ia.core.errors import Conflict, IaError, NotFound
from ia.core.keys import Keys
from ia.schemas.models import (
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    ExpiryPolicy,
)
from ia.schemas.serde import decode, encode

KEEP_S = 30 * 24 * 3600  # how long a resolved approval stays readable

_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'requested', 'request', ARGV[1], 'decision', ARGV[2],
           'expires_at', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""

# ARGV: status, by, via, at, reason, approval_id, mode ('human' | 'expiry'), keep_s
_RESOLVE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'requested' then return st end
local exp = tonumber(redis.call('HGET', KEYS[1], 'expires_at'))
local now = tonumber(ARGV[4])
if ARGV[7] == 'human' and now >= exp then return 'expiring' end
if ARGV[7] == 'expiry' and now < exp then return 'requested' end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'by', ARGV[2], 'via', ARGV[3], 'at', ARGV[4],
           'reason', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[8])
return 'ok'
"""


class ApprovalError(IaError):
    """An approval that cannot be answered (unknown, already resolved or expired)."""


class ApprovalNotFound(ApprovalError, NotFound):
    """No approval request has this id."""


class ApprovalConflict(ApprovalError, Conflict):
    """The request exists but has expired or was already answered."""


def approval_id_for(decision_id: str) -> str:
    if decision_id.startswith("dc-"):
        return "ap-" + decision_id[3:]
    return "ap-" + hashlib.sha256(decision_id.encode()).hexdigest()[:32]


def normalise_id(some_id: str) -> str:
    """Accept an approval id or the decision id it belongs to."""
    return some_id if some_id.startswith("ap-") else approval_id_for(some_id)



class ApprovalStore:
    def __init__(self, client, prefix: str = "ia", ttl_s: float = 900.0,
                 on_expiry: str = "reject") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.on_expiry = ExpiryPolicy(on_expiry)
        self._request = client.register_script(_REQUEST)
        self._resolve = client.register_script(_RESOLVE)

    def _terms(self, d: Decision) -> tuple[float, ExpiryPolicy]:
        """TTL and expiry policy: the action's params override the defaults."""
        assert d.action is not None
        params = d.action.params
        try:
            ttl = float(params.get("approval_ttl_s", self.ttl_s))
        except ValueError:
            ttl = self.ttl_s
        if not ttl > 0:
            ttl = self.ttl_s
        try:
            policy = ExpiryPolicy(params.get("on_expiry", self.on_expiry.value))
        except ValueError:
            policy = ExpiryPolicy.reject  # unknown value: the conservative reading
        return ttl, policy

    async def request(self, d: Decision, now_ms: int | None = None) -> tuple[ApprovalEvent, bool]:
        """Open the approval request of ``d`` (once); returns its current event and
        whether this call created it."""
        assert d.action is not None
        now = clock.now_ms() if now_ms is None else now_ms
        ttl, policy = self._terms(d)
        aid = approval_id_for(d.decision_id)
        ev = ApprovalEvent(
            approval_id=aid, decision_id=d.decision_id, status=ApprovalStatus.requested,
            entity=d.entity, metric=d.metric, action=d.action, anomaly_score=d.anomaly_score,
            confidence=d.confidence, requested_at=now, expires_at=now + int(ttl * 1000),
            on_expiry=policy, rule=d.chosen_rule or "", policy_version=d.policy_version)
        created = await self._request(
            keys=[self.keys.approval(aid), self.keys.approvals_pending, self.keys.approvals_index],
            args=[ev.model_dump_json(), encode(d, "json"), ev.expires_at, aid, now,
                  int(ttl) + KEEP_S])
        if created:
            return ev, True
        found = await self.get(aid)
        assert found is not None
        return found[0], False

    async def get(self, approval_id: str) -> tuple[ApprovalEvent, Decision] | None:
        raw = await self.client.hgetall(self.keys.approval(normalise_id(approval_id)))
        if not raw:
            return None
        return self._event(raw), decode(raw[b"decision"], Decision, "json")

    @staticmethod
    def _event(raw: dict[bytes, bytes]) -> ApprovalEvent:
        fields = json.loads(raw[b"request"])
        status = raw[b"status"].decode()
        if status != ApprovalStatus.requested.value:
            fields.update(status=status, by=raw[b"by"].decode(), via=raw[b"via"].decode(),
                          at=int(raw[b"at"]), reason=raw[b"reason"].decode())
        return ApprovalEvent.model_validate(fields)

    async def resolve(self, approval_id: str, status: ApprovalStatus, *, by: str, via: str,
                      reason: str = "", now_ms: int | None = None) -> ApprovalEvent:
        """A human approves or rejects; raises :class:`ApprovalError` if that is too late."""
        if status not in (ApprovalStatus.approved, ApprovalStatus.rejected):
            raise ValueError("a human answer is approved or rejected")
        aid = normalise_id(approval_id)
        res = await self._transition(aid, status, by, via, reason,
                                     clock.now_ms() if now_ms is None else now_ms, "human")
        if res == "missing":
            raise ApprovalNotFound(f"no approval request {aid}")
        if res == "expiring":
            raise ApprovalConflict(f"approval request {aid} has expired")
        if res != "ok":
            raise ApprovalConflict(f"approval request {aid} is already {res}")
        found = await self.get(aid)
        assert found is not None
        return found[0]

    async def _transition(self, aid: str, status: ApprovalStatus, by: str, via: str,
                          reason: str, now: int, mode: str) -> str:
        res = await self._resolve(
            keys=[self.keys.approval(aid), self.keys.approvals_pending,
                  self.keys.approvals_unfinished],
            args=[status.value, by[:256], via[:256], now, reason[:4096], aid, mode, KEEP_S])
        return res.decode() if isinstance(res, bytes) else str(res)

    async def expire_due(self, now_ms: int | None = None, limit: int = 100
                         ) -> list[ApprovalEvent]:
        """Expire every request past its deadline; returns the expiry events."""
        now = clock.now_ms() if now_ms is None else now_ms
        due = await self.client.zrangebyscore(self.keys.approvals_pending, "-inf", now, start=0,
                                              num=limit)
        out = []
        for raw_id in due:
            aid = raw_id.decode()
            found = await self.get(aid)
            if found is None:  # the hash expired: forget the index entry
                await self.client.zrem(self.keys.approvals_pending, aid)
                continue
            ev = found[0]
            ttl_s = (ev.expires_at - ev.requested_at) / 1000
            verdict = "approved by default" if ev.on_expiry is ExpiryPolicy.approve \
                else "rejected by default"
            res = await self._transition(aid, ApprovalStatus.expired, "expiry", "actuator",
                                         f"no answer within {ttl_s:g}s: {verdict}", now,
                                         "expiry")
            if res == "ok":
                done = await self.get(aid)
                assert done is not None
                out.append(done[0])
        return out

    async def unfinished(self, older_than_ms: int, limit: int = 100) -> list[str]:
        """Resolved approvals whose outcome was not produced (e.g. a lost event)."""
        ids = await self.client.zrangebyscore(self.keys.approvals_unfinished, "-inf", older_than_ms,
                                              start=0, num=limit)
        return [i.decode() for i in ids]

    async def finish(self, approval_id: str) -> None:
        await self.client.zrem(self.keys.approvals_unfinished, approval_id)

    async def list(self, *, pending_only: bool = True, limit: int = 100
                   ) -> list[ApprovalEvent]:
        key = self.keys.approvals_pending if pending_only else self.keys.approvals_index
        ids = await self.client.zrevrange(key, 0, limit - 1) if not pending_only \
            else await self.client.zrange(key, 0, limit - 1)
        out = []
        for raw_id in ids:
            found = await self.get(raw_id.decode())
            if found is not None:
                out.append(found[0])
        return out
