"""Human approval of ``needs_approval`` decisions, kept in Redis.

Redis is the authority on an approval's state; the events on ``ia.approvals``
announce each step.  Layout (keys from :mod:`ia.core.keys`; the spec is
``docs/redis-layout.md``)::

    {prefix}:appr:{approval_id}   hash: status, request (the requested event, JSON),
                                  decision (JSON), expires_at, request_sig, required,
                                  voters, vote:{identity} (signed answers),
                                  by, via, at, reason (the latest answer)
    {prefix}:appr:pending         zset approval_id -> expires_at (still requested)
    {prefix}:appr:unfinished      zset approval_id -> resolved at (outcome not yet produced)
    {prefix}:appr:index           zset approval_id -> requested_at (for listing)

Every transition is one Lua script, so an approval and a rejection (or an
expiry) racing each other cannot both win, an approver cannot be counted twice,
and a request answered after its expiry is refused.  Events are rebuilt from the
stored fields, so re-sending one yields the same bytes.

Redis is not trusted with what runs: the actuator signs each request with its
terms (from its own policy), the API and the CLI sign each answer with the
identity they authenticated, and before an approved action runs the actuator
verifies the request, the decision and enough distinct, allowed, signed answers
(:meth:`ApprovalStore.release_refusal`, :mod:`ia.actuators.approvers`).  A client
that can write Redis (or the approvals topic) can therefore delay or block an
action, but not release one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

from ia.actuators.approvers import Vote, may_answer, release_refusal, request_payload
from ia.core import clock, metrics
from ia.core.errors import ConfigError, Conflict, Forbidden, IaError, NotFound
from ia.core.keys import Keys
from ia.core.signing import KeyRing, canonical
from ia.decisions.policy import ApprovalTerms
from ia.schemas.models import (
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    ExpiryPolicy,
    OutcomeStatus,
)
from ia.schemas.serde import DecodeError, decode, encode

log = logging.getLogger("ia.actuate")
KEEP_S = 30 * 24 * 3600  # how long a resolved approval stays readable

_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'requested', 'request', ARGV[1], 'decision', ARGV[2],
           'expires_at', ARGV[3], 'request_sig', ARGV[7], 'required', ARGV[8])
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

# A human answer (one signed vote).  ARGV: status, by, via, at, reason, approval_id,
# keep_s, vote JSON.  A rejection resolves at once; an approval resolves when it is
# the `required`-th distinct one, else it is recorded and the request stays open.
_VOTE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'requested' then return st end
local now = tonumber(ARGV[4])
if now >= tonumber(redis.call('HGET', KEYS[1], 'expires_at')) then return 'expiring' end
local field = 'vote:' .. ARGV[2]
if ARGV[1] == 'approved' and redis.call('HEXISTS', KEYS[1], field) == 1 then
  return 'duplicate'
end
redis.call('HSET', KEYS[1], field, ARGV[8], 'by', ARGV[2], 'via', ARGV[3], 'at', ARGV[4],
           'reason', ARGV[5])
local resolved = ARGV[1] == 'rejected'
if not resolved then
  local voters = redis.call('HGET', KEYS[1], 'voters')
  voters = voters and (voters .. '\\n' .. ARGV[2]) or ARGV[2]
  redis.call('HSET', KEYS[1], 'voters', voters)
  local n = redis.call('HINCRBY', KEYS[1], 'nvotes', 1)
  resolved = n >= tonumber(redis.call('HGET', KEYS[1], 'required') or '1')
end
if not resolved then return 'partial' end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 'ok'
"""


class ApprovalError(IaError):
    """An approval that cannot be answered (unknown, already resolved or expired)."""


class ApprovalNotFound(ApprovalError, NotFound):
    """No approval request has this id."""


class ApprovalConflict(ApprovalError, Conflict):
    """The request exists but has expired or was already answered."""


class ApprovalForbidden(ApprovalError, Forbidden):
    """This identity may not answer this request (not an approver, or counted already)."""


class ApprovalTampered(ApprovalError, Conflict):
    """The stored request fails verification (written by something other than an actuator)."""


def approval_refused(d: Decision, ev: ApprovalEvent, reason: str) -> ActionOutcome:
    """The outcome of an approval the actuator will not run: its records do not verify."""
    assert d.action is not None
    log.warning("approval %s of decision %s not trusted (%s): not executed", ev.approval_id,
                d.decision_id, reason)
    metrics.APPROVALS_REFUSED.inc()
    now = clock.now_ms()
    return ActionOutcome(
        decision_id=d.decision_id, entity=d.entity, action_type=d.action.type,
        target=d.action.target, status=OutcomeStatus.rejected, actuator="approval",
        started_at=now, finished_at=now, duration_ms=0.0, approval_id=ev.approval_id,
        detail=f"approval {ev.approval_id} not verified, nothing run: {reason}",
        error="rejected: unverified approval")


def approval_id_for(decision_id: str) -> str:
    if decision_id.startswith("dc-"):
        return "ap-" + decision_id[3:]
    return "ap-" + hashlib.sha256(decision_id.encode()).hexdigest()[:32]


def normalise_id(some_id: str) -> str:
    """Accept an approval id or the decision id it belongs to."""
    return some_id if some_id.startswith("ap-") else approval_id_for(some_id)



class ApprovalStore:
    """Approval requests in Redis.

    ``keys`` (the approval key ring) signs requests and answers and verifies them;
    without it the store can only read.  ``terms`` gives a rule's approval terms
    from the actuator's current policy (None: anyone, one approval); ``ttl_s`` and
    ``on_expiry`` are the settings' fallbacks when the policy leaves them open.
    """

    def __init__(self, client, prefix: str = "ia", ttl_s: float = 900.0,
                 on_expiry: str = "reject", *, keys: KeyRing | None = None,
                 terms: Callable[[str | None], ApprovalTerms] | None = None) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.on_expiry = ExpiryPolicy(on_expiry)
        self.signing = keys
        self.terms = terms or (lambda _rule: ApprovalTerms())
        self._request = client.register_script(_REQUEST)
        self._resolve = client.register_script(_RESOLVE)
        self._vote = client.register_script(_VOTE)

    def require_keys(self) -> KeyRing:
        if self.signing is None:
            raise ConfigError("no approval key: set IA_APPROVAL_KEY_FILE or IA_SIGNING_KEY_FILE "
                              "(`ia up` makes one); approvals are signed with it")
        return self.signing

    def _terms(self, d: Decision) -> tuple[ApprovalTerms, float, ExpiryPolicy]:
        """The rule's terms, TTL and expiry policy: from the policy, then the settings;
        never from the decision (its params cannot lengthen or auto-approve it)."""
        terms = self.terms(d.chosen_rule)
        ttl = terms.ttl_s or self.ttl_s
        if terms.on_expiry is not None:
            policy = ExpiryPolicy(terms.on_expiry)
        else:  # the setting; a restricted rule is never approved by default
            policy = ExpiryPolicy.reject if terms.restricted else self.on_expiry
        return terms, ttl, policy

    async def request(self, d: Decision, now_ms: int | None = None) -> tuple[ApprovalEvent, bool]:
        """Open the approval request of ``d`` (once); returns its current event and
        whether this call created it."""
        assert d.action is not None
        now = clock.now_ms() if now_ms is None else now_ms
        terms, ttl, policy = self._terms(d)
        aid = approval_id_for(d.decision_id)
        ev = ApprovalEvent(
            approval_id=aid, decision_id=d.decision_id, status=ApprovalStatus.requested,
            entity=d.entity, metric=d.metric, action=d.action, anomaly_score=d.anomaly_score,
            confidence=d.confidence, requested_at=now, expires_at=now + int(ttl * 1000),
            on_expiry=policy, rule=d.chosen_rule or "", policy_version=d.policy_version,
            approvers=list(terms.approvers), required=terms.required)
        request_json = ev.model_dump_json()
        sig = self.require_keys().sign_bytes(request_payload(request_json, d.signature))
        created = await self._request(
            keys=[self.keys.approval(aid), self.keys.approvals_pending, self.keys.approvals_index],
            args=[request_json, encode(d, "json"), ev.expires_at, aid, now,
                  int(ttl) + KEEP_S, sig, terms.required])
        if created:
            return ev, True
        found = await self.get(aid)
        assert found is not None
        return found[0], False

    async def get(self, approval_id: str) -> tuple[ApprovalEvent, Decision] | None:
        aid = normalise_id(approval_id)
        raw = await self.client.hgetall(self.keys.approval(aid))
        return self._parsed(aid, raw) if raw else None

    def _parsed(self, aid: str, raw: dict[bytes, bytes]) -> tuple[ApprovalEvent, Decision] | None:
        try:
            return self._event(raw), decode(raw[b"decision"], Decision, "json")
        except (KeyError, ValueError, DecodeError) as exc:  # not written by this code
            log.warning("approval record %s is malformed (%s: %s); ignored", aid,
                        type(exc).__name__, exc)
            return None

    @staticmethod
    def _event(raw: dict[bytes, bytes]) -> ApprovalEvent:
        fields = json.loads(raw[b"request"])
        fields["status"] = raw[b"status"].decode()
        if b"by" in raw:  # an answer (for a request still open: an approval short of required)
            fields.update(by=raw[b"by"].decode(), via=raw[b"via"].decode(),
                          at=int(raw[b"at"]), reason=raw[b"reason"].decode())
        if raw.get(b"voters"):
            fields["approvals"] = raw[b"voters"].decode().split("\n")
        return ApprovalEvent.model_validate(fields)

    def _verified_request(self, raw: dict[bytes, bytes], decision: Decision) -> str | None:
        """Why the stored request is not one an actuator signed for ``decision``."""
        refused = self.require_keys().verify_bytes(
            request_payload(raw[b"request"], decision.signature), raw.get(b"request_sig", b"")
            .decode())
        if refused is not None:
            return f"request signature: {refused.value}"
        request = json.loads(raw[b"request"])
        if request.get("decision_id") != decision.decision_id:
            return "the request belongs to another decision"
        return None

    async def resolve(self, approval_id: str, status: ApprovalStatus, *, by: str, via: str,
                      reason: str = "", now_ms: int | None = None) -> ApprovalEvent:
        """``by`` (an authenticated identity) approves or rejects, through ``via``.

        Raises :class:`ApprovalForbidden` if ``by`` is not one of the request's
        approvers or has approved it already, :class:`ApprovalConflict` if it is too
        late.  An approval short of the rule's ``required`` is recorded and returned
        as the still ``requested`` event with its ``approvals``.
        """
        if status not in (ApprovalStatus.approved, ApprovalStatus.rejected):
            raise ValueError("a human answer is approved or rejected")
        keys = self.require_keys()
        aid = normalise_id(approval_id)
        raw = await self.client.hgetall(self.keys.approval(aid))
        if not raw:
            raise ApprovalNotFound(f"no approval request {aid}")
        found = self._parsed(aid, raw)
        if found is None:
            raise ApprovalTampered(f"approval request {aid} is malformed; not answered")
        current, decision = found
        if current.status is not ApprovalStatus.requested:
            raise ApprovalConflict(f"approval request {aid} is already {current.status.value}")
        tampered = self._verified_request(raw, decision)
        if tampered is not None:
            raise ApprovalTampered(f"approval request {aid} fails verification ({tampered}); "
                                   "not answered")
        denied = may_answer(current, by, status is ApprovalStatus.approved)
        if denied is not None:
            raise ApprovalForbidden(denied)
        now = clock.now_ms() if now_ms is None else now_ms
        vote = Vote(aid, status.value, by[:256], via[:256], now, reason[:4096]).signed(
            keys, raw[b"request_sig"].decode())
        res = await self._vote(
            keys=[self.keys.approval(aid), self.keys.approvals_pending,
                  self.keys.approvals_unfinished],
            args=[status.value, vote.by, vote.via, now, vote.reason, aid, KEEP_S,
                  vote.to_json()])
        res = res.decode() if isinstance(res, bytes) else str(res)
        if res == "missing":
            raise ApprovalNotFound(f"no approval request {aid}")
        if res == "expiring":
            raise ApprovalConflict(f"approval request {aid} has expired")
        if res == "duplicate":  # raced with its own earlier answer
            raise ApprovalForbidden(f"{by} has already approved {aid}")
        if res not in ("ok", "partial"):
            raise ApprovalConflict(f"approval request {aid} is already {res}")
        found = await self.get(aid)
        assert found is not None
        return found[0]

    async def release_refusal(self, approval_id: str, decision: Decision,
                              decision_keys: KeyRing, now_ms: int | None = None) -> str | None:
        """Why the resolved approval ``approval_id`` must not run ``decision`` (None: it
        may).  Checked by the actuator right before it runs an approved (or
        approved-on-expiry) action: Redis is not trusted to say so."""
        raw = await self.client.hgetall(self.keys.approval(normalise_id(approval_id)))
        if not raw:
            return "the approval request is gone"
        if self.signing is None:
            return "no approval key to verify it with"
        try:
            return self._release_refusal(raw, decision, decision_keys, self.signing,
                                         clock.now_ms() if now_ms is None else now_ms)
        except (KeyError, ValueError, DecodeError) as exc:
            return f"malformed record ({type(exc).__name__})"

    def _release_refusal(self, raw: dict[bytes, bytes], decision: Decision,
                         decision_keys: KeyRing, keys: KeyRing, now_ms: int) -> str | None:
        refused = decision_keys.verify_bytes(canonical(decision.model_dump(mode="json")),
                                             decision.signature)
        if refused is not None:
            return f"decision signature: {refused.value}"
        stored = decode(raw[b"decision"], Decision, "json")
        if stored.signature != decision.signature:
            return "the stored decision differs"
        tampered = self._verified_request(raw, decision)
        if tampered is not None:
            return tampered
        request = ApprovalEvent.model_validate_json(raw[b"request"])
        sig = raw[b"request_sig"].decode()
        votes = []
        for name, value in raw.items():
            if not name.startswith(b"vote:"):
                continue
            vote = Vote.from_json(value)
            if vote is not None and name == b"vote:" + vote.by.encode() and \
                    keys.verify_bytes(vote.payload(sig), vote.signature) is None:
                votes.append(vote)
        return release_refusal(request, ApprovalStatus(raw[b"status"].decode()), votes, now_ms)

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
