"""Who may approve what, and when approvals release an action: plain objects only.

The Redis store and the API are exercised in tests/test_approvals.py and, through
the broker, tests/test_governance.py.
"""

from __future__ import annotations

import pytest

from ia.actuators.approvers import (
    Vote,
    approved_by,
    may_answer,
    release_refusal,
    request_payload,
)
from ia.core.signing import Rejection, canonical, parse_keys
from ia.decisions.policy import ApprovalTerms, Policy, PolicyError
from ia.governance.api import RateLimiter
from ia.schemas.models import Action, ApprovalEvent, ApprovalStatus, ExpiryPolicy

T0 = 1_732_700_000_000
KEYS = parse_keys("a1 " + "ab" * 32, "<test>")
OTHER = parse_keys("a1 " + "cd" * 32, "<other>")


def request(**terms) -> ApprovalEvent:
    return ApprovalEvent(
        approval_id="ap-1", decision_id="dc-1", status=ApprovalStatus.requested, entity="e",
        metric="m", action=Action(type="log", target="e"), anomaly_score=0.9, confidence=0.8,
        requested_at=T0, expires_at=T0 + 60_000, rule="restart", **terms)


def vote(by: str, at: int = T0 + 1, status: str = "approved", aid: str = "ap-1") -> Vote:
    return Vote(aid, status, by, f"api:{by}", at, "")


# --------------------------------------------------------------------------- answering


def test_anyone_authenticated_answers_an_unrestricted_request() -> None:
    assert may_answer(request(), "whoever", approve=True) is None
    assert may_answer(request(), "whoever", approve=False) is None


def test_only_the_rules_approvers_answer() -> None:
    req = request(approvers=["ann", "bo"])
    assert may_answer(req, "ann", approve=True) is None
    assert "not an approver" in may_answer(req, "mallory", approve=True)
    assert "rule restart" in may_answer(req, "mallory", approve=False)  # nor reject


def test_an_approver_counts_once() -> None:
    req = request(approvers=["ann", "bo"], required=2, approvals=["ann"])
    assert "already approved" in may_answer(req, "ann", approve=True)
    assert may_answer(req, "bo", approve=True) is None
    assert may_answer(req, "ann", approve=False) is None  # may still change their mind


# --------------------------------------------------------------------------- releasing


def test_release_needs_required_distinct_allowed_timely_approvals() -> None:
    req = request(approvers=["ann", "bo", "cy"], required=2)
    ok = ApprovalStatus.approved
    assert release_refusal(req, ok, [vote("ann"), vote("bo")], T0 + 2) is None
    for votes in ([vote("ann")],
                  [vote("ann"), vote("ann", T0 + 5)],             # the same person twice
                  [vote("ann"), vote("mallory")],                  # not an approver
                  [vote("ann"), vote("bo", T0 + 60_000)],          # after the deadline
                  [vote("ann"), vote("bo", T0 - 1)],               # before the request
                  [vote("ann"), vote("bo", status="rejected")],
                  [vote("ann"), vote("bo", aid="ap-2")]):          # another request's
        assert "1 valid approval(s) of the 2 required" in \
            release_refusal(req, ok, votes, T0 + 2), votes


def test_only_approved_or_approve_on_expiry_runs() -> None:
    assert "rejected" in release_refusal(request(), ApprovalStatus.rejected, [], T0)
    assert "requested" in release_refusal(request(), ApprovalStatus.requested,
                                          [vote("ann")], T0)
    assert "expires as rejected" in release_refusal(request(), ApprovalStatus.expired, [],
                                                    T0 + 10**6)
    yes = request(on_expiry=ExpiryPolicy.approve)
    assert "before its deadline" in release_refusal(yes, ApprovalStatus.expired, [],
                                                    T0 + 59_999)
    assert release_refusal(yes, ApprovalStatus.expired, [], T0 + 60_000) is None


def test_approved_by_names_every_approver() -> None:
    assert approved_by(request(approvals=["ann", "bo"], by="bo")) == "ann, bo"
    assert approved_by(request(by="expiry")) == "expiry"


# --------------------------------------------------------------------------- signatures


def test_votes_are_bound_to_their_request_and_key() -> None:
    v = vote("ann").signed(KEYS, "k1:req")
    assert KEYS.verify_bytes(v.payload("k1:req"), v.signature) is None
    assert KEYS.verify_bytes(v.payload("k1:other-request"), v.signature) is \
        Rejection.bad_signature
    assert OTHER.verify_bytes(v.payload("k1:req"), v.signature) is Rejection.bad_signature
    renamed = Vote(v.approval_id, v.status, "bo", v.via, v.at, v.reason, v.signature)
    assert KEYS.verify_bytes(renamed.payload("k1:req"), v.signature) is Rejection.bad_signature
    assert Vote.from_json(v.to_json()) == v
    assert Vote.from_json("{}") is None and Vote.from_json("not json") is None


def test_approval_signatures_never_verify_as_decisions() -> None:
    """One key may sign both: the domain prefix keeps the two kinds apart."""
    decision = {"decision_id": "dc-1", "mode": "auto"}
    sig = KEYS.sign_bytes(request_payload(canonical(decision), None))
    assert KEYS.check({**decision, "signature": sig}, 0, 10**15) is Rejection.bad_signature
    assert KEYS.verify_bytes(canonical(decision), sig) is Rejection.bad_signature


# --------------------------------------------------------------------------- the policy

GROUPS = """
version: 1
approvers:
  oncall: [ann, bo@ops-box]
  leads: [cy]
"""


def test_policy_resolves_approval_terms_over_defaults() -> None:
    p = Policy.from_text(GROUPS + """
defaults:
  approval: {ttl_s: 300}
rules:
  - name: plain
    action: {type: log}
  - name: guarded
    action: {type: log}
    approval: {approvers: [oncall, leads], four_eyes: true, ttl_s: 60}
  - name: three
    action: {type: log}
    approval: {approvers: [oncall, leads], required: 3, on_expiry: reject}
""")
    assert p.approval_terms("plain") == ApprovalTerms(ttl_s=300)
    assert p.approval_terms("guarded") == ApprovalTerms(
        approvers=("ann", "bo@ops-box", "cy"), groups=("oncall", "leads"), required=2,
        ttl_s=60)
    assert p.approval_terms("three").required == 3
    assert p.approval_terms("no-such-rule") == ApprovalTerms(ttl_s=300)
    assert not ApprovalTerms().restricted and ApprovalTerms(required=2).restricted


@pytest.mark.parametrize(("tail", "line", "message"), [
    ("    approval: {approvers: [oncall, sre]}\n", 9, "unknown approver group 'sre'"),
    ("    approval: {approvers: [leads], required: 2}\n", 9,
     r"required is 2 but the groups \['leads'\] have 1 members"),
    ("    approval: {four_eyes: true, required: 1}\n", 9, "four_eyes needs at least 2"),
    ("    approval: {approvers: [oncall], on_expiry: approve}\n", 9,
     "on_expiry: approve would run the action without its approvers"),
    ("    approval: {required: 0}\n", 9, "greater than or equal to 1"),
    ("    approval: {ttl: 5}\n", 9, "Extra inputs"),
    ("    action: {type: log, params: {approval_ttl_s: 5}}\n", 8,
     "no longer sets approval terms"),
])
def test_policy_approval_errors_name_the_line(tail: str, line: int, message: str) -> None:
    text = GROUPS + "rules:\n  - name: r\n" + \
        ("    action: {type: log}\n" if "action:" not in tail else "") + tail
    with pytest.raises(PolicyError, match=message) as err:
        Policy.from_text(text, "p.yaml")
    assert err.value.line == line, err.value


def test_policy_refuses_identities_that_are_not_names() -> None:
    with pytest.raises(PolicyError, match="is not an identity") as err:
        Policy.from_text("version: 1\napprovers:\n  oncall: [ann, 'x y']\n", "p.yaml")
    assert err.value.line == 3


# --------------------------------------------------------------------------- rate limit


def test_rate_limiter_slides_per_key_and_says_how_long_to_wait() -> None:
    now = [100.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0], max_keys=2)
    assert [limiter.hit("ann") for _ in range(2)] == [None, None]
    assert limiter.hit("ann") == 10.0
    assert limiter.hit("bo") is None  # someone else's budget
    now[0] += 4
    assert limiter.hit("ann") == 6.0  # refused requests do not count
    now[0] += 6
    assert limiter.hit("ann") is None
    limiter.hit("cy")  # a third key: the least recently seen (bo) is forgotten
    assert set(limiter._hits) == {"ann", "cy"}
    assert all(RateLimiter(0, 1.0).hit("x") is None for _ in range(100))  # 0: no limit
