"""Who may answer an approval request, and whether its answers release the action.

Pure functions on plain objects (no Redis, no HTTP): the approval store
(:mod:`ia.actuators.approvals`) calls them when an answer comes in and when
the actuator is about to run an approved action, and the tests call them
directly.

Identities: an answer's ``by`` is an authenticated identity, never a name the
caller chose -- an API token's name (``via api:<name>``) or, for ``ia
approvals`` on a host, ``user@host`` of the OS user running it (``via
cli``).  Token names cannot contain ``@``, so the two never collide.

Records are signed with the approval key ring (:func:`ia.core.signing.approval_keys`):

* the **request**, by the actuator that opens it, over the stored request JSON
  (the rule's terms included: approvers, required, expiry) and the decision's
  own signature, so the terms and the decision cannot be swapped;
* every **answer** (a vote), by the API or the CLI that authenticated its
  identity, over the approval id, the request's signature, the status, the
  identity, the channel, the time and the reason.

Everything signed starts with :data:`DOMAIN`, so none of these signatures can
ever verify as a decision's (or the other way round), even with one key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ia.core.signing import KeyRing
from ia.schemas.models import ApprovalEvent, ApprovalStatus, ExpiryPolicy

DOMAIN = b"ia-approval-v1\n"


@dataclass(frozen=True)
class Vote:
    """One signed answer to an approval request."""

    approval_id: str
    status: str  # approved | rejected
    by: str
    via: str
    at: int
    reason: str
    signature: str = ""

    def payload(self, request_sig: str) -> bytes:
        body = {"approval_id": self.approval_id, "request_sig": request_sig,
                "status": self.status, "by": self.by, "via": self.via, "at": self.at,
                "reason": self.reason}
        return DOMAIN + b"vote\n" + json.dumps(body, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False).encode()

    def signed(self, keys: KeyRing, request_sig: str) -> Vote:
        return Vote(self.approval_id, self.status, self.by, self.via, self.at, self.reason,
                    keys.sign_bytes(self.payload(request_sig)))

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Vote | None:
        """The vote stored as ``raw``; None if it is not one."""
        try:
            fields = json.loads(raw)
            return cls(str(fields["approval_id"]), str(fields["status"]), str(fields["by"]),
                       str(fields["via"]), int(fields["at"]), str(fields["reason"]),
                       str(fields["signature"]))
        except (ValueError, TypeError, KeyError):
            return None


def approved_by(ev: ApprovalEvent) -> str | None:
    """Who released ``ev``: its approvers in order (``alice, bob``), else ``by``."""
    return ", ".join(ev.approvals) if ev.approvals else ev.by


def request_payload(request_json: str | bytes, decision_signature: str | None) -> bytes:
    """What the actuator signs when it opens a request (the stored JSON, byte for byte)."""
    raw = request_json.encode() if isinstance(request_json, str) else request_json
    return DOMAIN + b"request\n" + (decision_signature or "").encode() + b"\n" + raw


def may_answer(request: ApprovalEvent, identity: str, approve: bool) -> str | None:
    """Why ``identity`` may not answer ``request`` (None: it may).

    Only the rule's approvers answer (anyone authenticated when it names none);
    an approver counts once, so under the two-person rule (``required`` 2 or
    more) whoever approved first cannot also be the one who releases it.
    """
    if request.approvers and identity not in request.approvers:
        rule = f" (rule {request.rule})" if request.rule else ""
        return f"{identity} is not an approver of this request{rule}"
    if approve and identity in request.approvals:
        return (f"{identity} has already approved; it needs {request.required} distinct "
                f"approvers ({len(request.approvals)} so far)")
    return None


def release_refusal(request: ApprovalEvent, status: ApprovalStatus, votes: Iterable[Vote],
                    now_ms: int) -> str | None:
    """Why a request whose stored status is ``status`` must not run (None: it may).

    ``request`` is the verified request and ``votes`` its verified votes.  An
    approval runs once ``required`` distinct approvers allowed by the request
    approved it within its lifetime; an expiry runs only if the (signed) request
    says ``on_expiry: approve`` and its deadline has passed.
    """
    if status is ApprovalStatus.expired:
        if request.on_expiry is not ExpiryPolicy.approve:
            return "the request expires as rejected"
        if now_ms < request.expires_at:
            return "marked expired before its deadline"
        return None
    if status is not ApprovalStatus.approved:
        return f"the request is {status.value}"
    approvers = set()
    for v in votes:
        if v.approval_id != request.approval_id or v.status != ApprovalStatus.approved.value:
            continue
        if request.approvers and v.by not in request.approvers:
            continue
        if not request.requested_at <= v.at < request.expires_at:
            continue
        approvers.add(v.by)
    if len(approvers) < request.required:
        return (f"{len(approvers)} valid approval(s) of the {request.required} required")
    return None
