"""Policy documents: loading, error reporting, rule evaluation, hot reload."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import ia.decisions.policy_source as policy_source
from ia.decisions.policy import Policy, PolicyError
from ia.decisions.policy_source import PolicySource, builtin_policy_path
from ia.schemas.models import Mode

NORMAL = {"zscore": 0.2, "value": 10.0}
SPIKE_UP = {"zscore": 9.0, "value": 99.0}
SPIKE_DOWN = {"zscore": -9.0, "value": 1.0}


def policy(text: str, source: str = "<test>") -> Policy:
    return Policy.from_text(textwrap.dedent(text), source)


def evaluate(p: Policy, *, entity: str = "svc-a", metric: str = "cpu", kind: str = "metric",
             labels: dict[str, str] | None = None, features: dict[str, float] | None = None,
             score: float = 0.99, confidence: float = 0.99, drift: str = "stable"):
    return p.evaluate(entity=entity, metric=metric, kind=kind, labels=labels or {},
                      features=SPIKE_UP if features is None else features, score=score,
                      confidence=confidence, drift=drift)


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "observe"])
def test_builtin_policies_load(name: str) -> None:
    path = builtin_policy_path(name)
    assert path.is_file()
    p = Policy.from_file(path)
    assert p.doc.version == 1
    assert p.doc.rules, "a packaged policy without rules is useless"
    assert p.source == str(path)
    assert len(p.version) == 12 and p.version != "inline"
    assert Policy.from_file(path).version == p.version  # content-addressed


def test_demo_policy_rules() -> None:
    p = Policy.from_file(builtin_policy_path("demo"))
    assert [r.name for r in p.doc.rules] == [
        "rollback-bad-deploy", "restart-memory-leak", "scale-out-on-latency", "ask-a-human"]
    assert p.doc.defaults.cooldown_s == 300
    # an error-rate spike right after a deploy rolls back
    r = evaluate(p, entity="svc-pay", metric="error_rate",
                 features={**SPIKE_UP, "seconds_since_deploy": 120.0})
    assert (r.rule, r.action.type, r.action.params, r.mode) == (
        "rollback-bad-deploy", "simulator", {"op": "rollback"}, Mode.auto)
    assert r.action.target == "svc-pay" and r.guards.cooldown_s == 300
    # the simulated fleet's clock is not the wall clock: its samples may act at any age
    assert r.guards.max_event_age_s is None
    # long after a deploy it does not (and falls through to asking a human)
    r = evaluate(p, entity="svc-pay", metric="error_rate",
                 features={**SPIKE_UP, "seconds_since_deploy": 7200.0})
    assert (r.rule, r.mode) == ("ask-a-human", Mode.needs_approval)
    # the observe policy only logs strong anomalies
    obs = Policy.from_file(builtin_policy_path("observe"))
    assert evaluate(obs, score=0.95).action.type == "log"
    assert evaluate(obs, score=0.95).guards.max_event_age_s == 600  # live data: the default
    assert evaluate(obs, score=0.5).action is None


def test_default_source_is_observe() -> None:
    src = PolicySource(None)
    assert src.path == builtin_policy_path("observe")
    assert [r.name for r in src.current().doc.rules] == ["log-strong-anomalies"]


BAD_POLICIES = {
    "yaml-syntax": ("""\
        version: 1
        rules:
          - name: a: b
        """, 3, "mapping values are not allowed"),
    "unknown-key": ("""\
        version: 1
        rules:
          - name: ok
            match: {metric: cpu}
            action: {type: log}
          - name: typo
            match: {metric: cpu}
            whne: {min_score: 0.5}
        """, 8, "rules.1.whne: Extra inputs are not permitted"),
    "unknown-nested-key": ("""\
        version: 1
        rules:
          - name: a
            when:
              min_score: 0.5
              min_scroe: 0.9
        """, 6, "rules.0.when.min_scroe"),
    "wrong-type": ("""\
        version: 1
        rules:
          - name: a
            when:
              min_confidence: 0.5
              min_score: "high"
        """, 6, "rules.0.when.min_score: Input should be a valid number"),
    "out-of-range": ("""\
        version: 1
        defaults: {cooldown_s: 60}
        rules:
          - name: a
            when: {min_score: 1.5}
        """, 5, "less than or equal to 1"),
    "duplicate-names": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
          - name: b
          - name: a
            action: {type: log}
        """, 6, "duplicate rule name 'a'"),
    "undeclared-command": ("""\
        version: 1
        commands:
          drain: [/usr/local/bin/drain, --now]
        rules:
          - name: drain-node
            when: {min_score: 0.9}
            action:
              type: command
              params: {command: reboot}
        """, 7, "unknown command 'reboot'"),
    "version-missing": ("""\
        rules:
          - name: a
        """, 1, "version: Field required"),
    "wrong-version": ("""\
        # policy
        version: 2
        rules: []
        """, 2, "version"),
    "empty-argv": ("""\
        version: 1
        commands:
          nothing: []
        """, 2, "empty argv"),
    "empty-target": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log, target: ""}
        """, 4, "rules.0.action.target"),
    "not-a-mapping": ("""\
        - just
        - a list
        """, 1, "must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_errors_name_file_and_line(case: str, tmp_path: Path) -> None:
    text, line, fragment = BAD_POLICIES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    err = info.value
    assert err.source == str(path)
    assert err.line == line, str(err)
    assert str(err).startswith(f"{path}:{line}: ")
    assert fragment in str(err)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy") as info:
        Policy.from_file(tmp_path / "missing.yaml")
    assert info.value.line is None


# --- evaluation -----------------------------------------------------------------------------


CHAIN = """\
    version: 1
    defaults: {cooldown_s: 120}
    rules:
      - name: only-db
        match: {entity: "db-*"}
        action: {type: log}
      - name: only-memory
        match: {entity: "svc-*", metric: [memory_pct, heap]}
        action: {type: log}
      - name: prod-only
        match: {labels: {env: "prod*"}}
        action: {type: log}
      - name: strong
        when: {min_score: 0.9, min_confidence: 0.5}
        action: {type: webhook, target: "{entity}/{metric}"}
        cooldown_s: 30
      - name: also-matches
        action: {type: log}
"""


def test_first_matching_rule_wins_and_trace_explains() -> None:
    p = policy(CHAIN)
    r = evaluate(p, entity="svc-a", metric="cpu", labels={"env": "staging"})
    assert r.rule == "strong"
    assert r.action.type == "webhook" and r.action.target == "svc-a/cpu"
    assert r.guards.cooldown_s == 30
    assert [(t.rule, t.matched) for t in r.trace] == [
        ("only-db", False), ("only-memory", False), ("prod-only", False), ("strong", True)]
    reasons = [t.reason for t in r.trace]
    assert reasons[0] == "entity not selected"
    assert reasons[1] == "metric not selected"
    assert reasons[2] == "label env does not match 'prod*'"
    assert "score 0.990 >= 0.9" in reasons[3]
    # the label selector matches by glob, and the earlier rule then wins
    r = evaluate(p, labels={"env": "production"})
    assert r.rule == "prod-only" and r.guards.cooldown_s == 120  # the default cooldown
    # a weak score falls through to the catch-all, after a reason for "strong"
    r = evaluate(p, score=0.5)
    assert r.rule == "also-matches"
    assert r.trace[3].reason == "score 0.500 < 0.9"
    r = evaluate(p, confidence=0.1)
    assert r.trace[3].reason == "confidence 0.100 < 0.5"


def test_no_rule_matches() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: only-db
            match: {entity: "db-?"}
            action: {type: log}
    """)
    r = evaluate(p, entity="db-12")
    assert (r.rule, r.action, r.mode) == (None, None, Mode.none)
    assert [t.matched for t in r.trace] == [False]
    assert evaluate(p, entity="db-1").rule == "only-db"
    assert evaluate(p, entity="DB-1").rule is None  # globs are case-sensitive


def test_rule_without_action_decides_nothing() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: silence-batch
            match: {entity: "batch-*"}
          - name: act
            action: {type: log}
    """)
    r = evaluate(p, entity="batch-7")
    assert (r.rule, r.action, r.mode) == ("silence-batch", None, Mode.none)
    assert evaluate(p, entity="svc-1").rule == "act"


def test_direction() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: up
            when: {direction: up}
            action: {type: log, target: up}
          - name: down
            when: {direction: down}
            action: {type: log, target: down}
    """)
    assert evaluate(p, features=SPIKE_UP).action.target == "up"
    r = evaluate(p, features=SPIKE_DOWN)
    assert r.action.target == "down"
    assert r.trace[0].reason == "direction is not up"
    r = evaluate(p, features={"zscore": 0.0})
    assert r.rule is None
    assert r.trace[1].reason == "direction is not down"


def test_drift_filter_and_mode() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: only-when-stable
            when: {drift: [stable]}
            action: {type: log}
            mode: needs_approval
          - name: drifting
            when: {drift: [warning, drift]}
            action: {type: log}
            mode: shadow
    """)
    r = evaluate(p, drift="stable")
    assert (r.rule, r.mode) == ("only-when-stable", Mode.needs_approval)
    r = evaluate(p, drift="drift")
    assert (r.rule, r.mode) == ("drifting", Mode.shadow)
    assert r.trace[0].reason == "drift state drift not in ['stable']"


def test_feature_ranges() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: after-deploy
            when:
              features:
                seconds_since_deploy: {max: 1800}
                value: {min: 50}
            action: {type: log}
    """)
    assert evaluate(p, features={**SPIKE_UP, "seconds_since_deploy": 1800.0}).rule \
        == "after-deploy"  # bounds are inclusive
    r = evaluate(p, features={**SPIKE_UP, "seconds_since_deploy": 1801.0})
    assert r.rule is None
    assert r.trace[0].reason == "feature seconds_since_deploy=1801 outside [None, 1800.0]"
    r = evaluate(p, features={**SPIKE_UP, "seconds_since_deploy": 5.0, "value": 49.0})
    assert r.trace[0].reason.startswith("feature value=49 outside")
    r = evaluate(p, features=SPIKE_UP)
    assert r.trace[0].reason == "feature seconds_since_deploy unavailable"


def test_kind_event_rules() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: on-deploy
            match: {kind: event, metric: deploy}
            action: {type: log, target: "deploy-of-{entity}"}
          - name: metrics
            action: {type: log}
    """)
    r = evaluate(p, kind="event", metric="deploy", score=0.0, confidence=0.0,
                 features={"value": 1.0})
    assert r.rule == "on-deploy" and r.action.target == "deploy-of-svc-a"
    r = evaluate(p, kind="metric", metric="deploy")
    assert r.rule == "metrics"
    assert r.trace[0].reason == "kind metric is not event"
    r = evaluate(p, kind="event", metric="restart", score=0.0, features={})
    assert r.rule is None  # "metrics" is a metric rule
    assert r.trace[1].reason == "kind event is not metric"


def test_target_template_is_not_evaluated() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: r
            action:
              type: webhook
              target: "{entity}|{metric}|{entity.__class__}|{0}|{metric!r}|{{entity}}"
              params: {url: "http://x/{entity.__init__.__globals__}", retries: 3}
    """)
    r = evaluate(p, entity="svc-a", metric="cpu")
    assert r.action.target == "svc-a|cpu|{entity.__class__}|{0}|{metric!r}|{svc-a}"
    assert r.action.params == {"url": "http://x/{entity.__init__.__globals__}", "retries": "3"}
    # telemetry strings are data: placeholders inside an entity are not substituted again
    r = evaluate(p, entity="x{metric}{0}", metric="cpu")
    assert r.action.target.startswith("x{metric}{0}|cpu|")


def test_target_is_bounded() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: r
            action: {type: log, target: "prefix-{entity}-{entity}"}
    """)
    r = evaluate(p, entity="e" * 256)
    assert len(r.action.target) == 256


# --- hot reload -----------------------------------------------------------------------------


V1 = """\
version: 1
rules:
  - name: first
    action: {type: log}
"""
V2 = """\
version: 1
rules:
  - name: second
    action: {type: webhook, params: {url: "http://127.0.0.1:9/x"}}
"""
BROKEN = """\
version: 1
rules:
  - name: second
    when: {min_score: lots}
"""


def bump_mtime(path: Path, seconds: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


def test_policy_source_hot_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(V1)
    src = PolicySource(path)
    first = src.current()
    assert [r.name for r in first.doc.rules] == ["first"]

    path.write_text(V2)
    bump_mtime(path, 10)
    # within CHECK_EVERY_S the file is not even looked at
    monkeypatch.setattr(policy_source, "CHECK_EVERY_S", 3600.0)
    assert src.current() is first
    monkeypatch.setattr(policy_source, "CHECK_EVERY_S", 0.0)
    second = src.current()
    assert [r.name for r in second.doc.rules] == ["second"]
    assert second.version != first.version
    assert (src.reloads, src.rejected) == (1, 0)
    assert src.current() is second  # unchanged file: no reload
    assert src.reloads == 1

    path.write_text(BROKEN)
    bump_mtime(path, 20)
    assert src.current() is second  # the broken change is rejected
    assert (src.reloads, src.rejected) == (1, 1)
    assert src.current() is second  # and not retried until the file changes again
    assert src.rejected == 1

    path.unlink()  # a vanished file keeps the policy in force as well
    assert src.current() is second
    assert src.rejected == 2

    path.write_text(V1)
    bump_mtime(path, 30)
    assert [r.name for r in src.current().doc.rules] == ["first"]
    assert src.current().version == first.version
    assert (src.reloads, src.rejected) == (2, 2)


def test_policy_source_rejects_broken_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(BROKEN)
    with pytest.raises(PolicyError) as info:
        PolicySource(path)
    assert info.value.line == 4
