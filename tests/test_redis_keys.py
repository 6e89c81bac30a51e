"""The Redis layout is pinned: every key family's spelling, type and TTL, and
:mod:`ia.core.keys` as the only place a key is spelled.

There is no migration of stored data, so a changed key orphans state (claims,
breakers, approvals, the audit head) in every running deployment.  These tests
fail on any change to a key, and the layout tests run each store against the
real Redis, so a store that used the wrong family would fail too
(``docs/redis-layout.md`` is the spec they check).
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import uuid
from importlib import resources
from pathlib import Path

import pytest

from ia.actuators.approvals import ApprovalStore
from ia.actuators.executor import ActionExecutor
from ia.actuators.verification import Verifier
from ia.core.keys import Keys
from ia.decisions.checkpoint import RedisModelStore
from ia.decisions.guards.kill_switch import KillSwitch
from ia.decisions.guards.redis_store import RedisGuardStore
from ia.decisions.guards.stores import HealthSpan
from ia.decisions.learning import RedisDecisionMemory, Remembered, Step
from ia.decisions.windows import FreezeWindow
from ia.features.series import SeriesState
from ia.features.store import EntityRecord, RedisFeatureStore
from ia.governance.audit import Head
from ia.governance.audit_store import RedisAuditState
from ia.ingest.cumulative import CumulativePoint, RedisCumulativeStore
from ia.ingest.receiver import RedisSeenAlerts
from ia.schemas.models import Action, ApprovalStatus, Decision, Mode, ModelInfo
from tests.support import TEST_APPROVAL_KEYS

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_732_700_000_000
DAY = 24 * 3600

# -- every family, spelled out for the default prefix ---------------------------------------

K = Keys("ia")
PINNED = {
    K.everything: "ia:*",
    K.entity("web-1"): "ia:f:v1:web-1",
    K.claim("cooldown:target:web-1"): "ia:claim:cooldown:target:web-1",
    K.window("rate:restart:web-1"): "ia:g:win:rate:restart:web-1",
    K.slots("env=prod"): "ia:g:slots:env=prod",
    K.slots(""): "ia:g:slots:",
    K.slot_of("dc-1"): "ia:g:slot-of:dc-1",
    K.group_of("dc-1"): "ia:g:group-of:dc-1",
    K.fleet("env=prod"): "ia:g:fleet:env=prod",
    K.breaker("restart:web-1"): "ia:g:cb:restart:web-1",
    K.breaker_failures("restart:web-1"): "ia:g:cb-fail:restart:web-1",
    K.budget("type:restart", "ok"): "ia:g:eb:type:restart:ok",
    K.budget("global", "fail"): "ia:g:eb:global:fail",
    K.freeze_windows: "ia:g:freeze",
    K.freeze_log: "ia:g:freeze-log",
    K.scope_of("dc-1"): "ia:g:scope:dc-1",
    K.health_seen("service=web"): "ia:g:hl-seen:service=web",
    K.health_anomalies("service=web"): "ia:g:hl-sick:service=web",
    K.health_out("service=web"): "ia:g:hl-out:service=web",
    K.kill_switch: "ia:paused",
    K.remembered_decision("dc-1"): "ia:dfx:dc-1",
    K.labels("dc-1"): "ia:labels:dc-1",
    K.label_quota("web-1", 480): "ia:fbq:480:web-1",
    K.model("feedback"): "ia:model:feedback",
    K.action_claim("dc-1"): "ia:act:dc-1",
    K.compensation_claim("dc-1"): "ia:act:dc-1:compensation",
    K.target_lock("web-1"): "ia:lock:web-1",
    K.verification("dc-1"): "ia:verify:dc-1",
    K.verifications_due: "ia:verify:due",
    K.approval("ap-1"): "ia:appr:ap-1",
    K.approvals_pending: "ia:appr:pending",
    K.approvals_unfinished: "ia:appr:unfinished",
    K.approvals_index: "ia:appr:index",
    K.audit_head: "ia:audit:head",
    K.audit_pending: "ia:audit:pending",
    K.audit_offsets: "ia:audit:offsets",
    K.audit_lease: "ia:audit:lease",
    K.cumulative("0f3a"): "ia:ingest:cum:0f3a",
    K.alert_seen("9b1c"): "ia:ingest:alert:9b1c",
}


@pytest.mark.parametrize(("built", "pinned"), PINNED.items(), ids=list(PINNED.values()))
def test_every_key_family_keeps_its_spelling(built: str, pinned: str) -> None:
    assert built == pinned


def test_every_family_is_pinned() -> None:
    families = {name for name in vars(Keys) if not name.startswith("_")} - {"prefix"}
    used = set(re.findall(r"\bK\.([a-z_]+)", Path(__file__).read_text()))
    assert families - used == set(), "pin these families in PINNED"


def test_the_prefix_leads_every_key() -> None:
    assert Keys("t.shadow").entity("e") == "t.shadow:f:v1:e"
    assert Keys().kill_switch == "ia:paused"


# -- each store writes the families the spec says, with their types and TTLs ----------------


async def _layout(aredis, prefix: str) -> dict[str, tuple[str, int]]:
    """Every key of ``prefix`` (without it): its type and TTL in seconds (-1: none)."""
    out = {}
    async for key in aredis.scan_iter(match=f"{prefix}:*"):
        name = key.decode()[len(prefix) + 1:]
        out[name] = ((await aredis.type(key)).decode(), await aredis.ttl(key))
    return out


def _assert_layout(found: dict[str, tuple[str, int]], want: dict[str, tuple[str, int]]) -> None:
    assert sorted(found) == sorted(want)
    for name, (kind, ttl) in want.items():
        got_kind, got_ttl = found[name]
        assert got_kind == kind, name
        assert (got_ttl == -1) if ttl == -1 else (ttl - 30 <= got_ttl <= ttl), (name, got_ttl)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _decision(mode: Mode = Mode.auto, **params: str) -> Decision:
    return Decision(
        decision_id="dc-1", correlation_id="corr-1", event_id="ev-1", entity="web-1",
        metric="latency", value=900.0, ts=T0, decided_at=T0, anomaly_score=0.99,
        confidence=0.9, model=ModelInfo(id="zscore-hst", version="1.0.0"),
        action=Action(type="restart", target="web-1", params=params), mode=mode)


@pytest.mark.integration
async def test_feature_store_layout(aredis, prefix) -> None:
    store = RedisFeatureStore(aredis, prefix, ttl_s=14 * DAY)
    rec = EntityRecord()
    rec.put_series("latency", SeriesState(n=1, mean=1.0, last_value=1.0, last_ts=T0))
    rec.put_context("event:deploy", str(T0))
    rec.put_detector("latency", b"\x01state")
    rec.remember_decision("dc-1", T0, b"{}")
    rec.position, rec.dirty_position = (3, 41, T0), True
    await store.save({"web-1": rec})
    await store.incr_context("web-1", "tp")
    await store.record_action("web-1", "restart", "succeeded", T0)
    _assert_layout(await _layout(aredis, prefix), {"f:v1:web-1": ("hash", 14 * DAY)})
    fields = await aredis.hgetall(f"{prefix}:f:v1:web-1")
    assert sorted(fields) == [b"a:latency", b"c:event:deploy", b"c:last_action", b"c:tp",
                              b"d:dc-1", b"p", b"s1:latency"]
    assert fields[b"p"] == b"3:41:%d" % T0
    assert fields[b"d:dc-1"] == b"%020d|{}" % T0
    assert fields[b"c:last_action"] == b"restart:succeeded:%d" % T0


@pytest.mark.integration
async def test_guard_store_layout(aredis, prefix) -> None:
    g = RedisGuardStore(aredis, prefix)
    await g.claim("cooldown:target:web-1", "dc-1", T0, T0 + 60_000)
    await g.window_admit("rate:restart", "dc-1", T0, 60_000, 5)
    await g.slot_acquire("all", "dc-1", T0, 3, 30_000)
    await g.note_group("dc-1", "all")
    await g.fleet_add("all", ["web-1"])
    await g.record_result("restart:web-1", ["global", "type:restart"], "dc-1", False, T0)
    await g.breaker_check("restart:web-1", "dc-2", T0, 1, 60_000, 30_000, 10_000)
    await g.note_scope("dc-1", {"labels": {"env": "prod"}, "held": []})
    await g.health_seen("all", {"web-1": T0}, 0)
    await g.health_anomaly("all", "web-2", T0)
    await g.health_admit("all", "web-3", "dc-1", T0, HealthSpan(60_000, 60_000, 3_600_000),
                         50, 30_000, True)
    _assert_layout(await _layout(aredis, prefix), {
        "g:scope:dc-1": ("string", 7 * DAY),
        "g:hl-seen:all": ("zset", 7 * DAY),
        "g:hl-sick:all": ("zset", 7 * DAY),
        "g:hl-out:all": ("zset", 120),
        "claim:cooldown:target:web-1": ("string", DAY),
        "g:win:rate:restart": ("zset", DAY + 60),
        "g:slots:all": ("zset", 120),
        "g:slot-of:dc-1": ("string", 120),
        "g:group-of:dc-1": ("string", 7 * DAY),
        "g:fleet:all": ("set", 7 * DAY),
        "g:cb:restart:web-1": ("hash", 7 * DAY),
        "g:cb-fail:restart:web-1": ("zset", 7 * DAY),
        "g:eb:global:fail": ("zset", 7 * DAY),
        "g:eb:type:restart:fail": ("zset", 7 * DAY),
    })
    assert await aredis.get(f"{prefix}:claim:cooldown:target:web-1") == b"dc-1|%d" % (
        T0 + 60_000)
    assert await aredis.hget(f"{prefix}:g:cb:restart:web-1", "state") == b"open"
    await g.slot_release("dc-1")
    assert not await aredis.exists(f"{prefix}:g:slots:all", f"{prefix}:g:slot-of:dc-1")


@pytest.mark.integration
async def test_freeze_window_layout(aredis, prefix) -> None:
    g = RedisGuardStore(aredis, prefix)
    w = FreezeWindow(name="freeze", effect="block", owner="op", reason="test",
                     start="2030-01-01T00:00:00Z", end="2030-01-02T00:00:00Z")
    assert await g.add_freeze_window(w)
    _assert_layout(await _layout(aredis, prefix), {"g:freeze": ("hash", -1)})
    stored = await aredis.hget(f"{prefix}:g:freeze", "freeze")
    assert FreezeWindow.model_validate_json(stored) == w


@pytest.mark.integration
async def test_kill_switch_and_learning_layout(aredis, prefix) -> None:
    await KillSwitch(aredis, prefix).pause(by="op", reason="test")
    memory = RedisDecisionMemory(aredis, prefix)
    await memory.remember([("dc-1", Remembered("web-1", "restart", {"x": 1.0}))])
    await memory.first("dc-1", Step.label, "useful")
    await memory.take("web-1", 480, 3600)
    await RedisModelStore(aredis, prefix).update("feedback", lambda _old: (1, b"blob"))
    _assert_layout(await _layout(aredis, prefix), {
        "paused": ("string", -1),
        "dfx:dc-1": ("string", 30 * DAY),
        "labels:dc-1": ("hash", 30 * DAY),
        "fbq:480:web-1": ("string", 3600),
        "model:feedback": ("hash", -1),
    })
    assert await aredis.get(f"{prefix}:dfx:dc-1") == \
        b'{"action": "restart", "entity": "web-1", "x": {"x": 1.0}}'
    assert await aredis.hgetall(f"{prefix}:labels:dc-1") == {b"label": b"useful"}
    assert await aredis.get(f"{prefix}:fbq:480:web-1") == b"1"
    assert await memory.used("web-1", 480) == 1 and await memory.used("web-1", 481) == 0
    model = await aredis.hgetall(f"{prefix}:model:feedback")
    assert sorted(model) == [b"blob", b"saved_at", b"version"]


@pytest.mark.integration
async def test_ingest_layout(aredis, prefix) -> None:
    point = CumulativePoint("counter\x1fweb-1\x1frequests", T0 - 60_000, T0, (5.0,))
    await RedisCumulativeStore(aredis, prefix, ttl_s=DAY).previous([point])
    await RedisSeenAlerts(aredis, prefix).mark(["9b1c"])
    _assert_layout(await _layout(aredis, prefix), {
        f"ingest:cum:{point.series_id}": ("string", DAY),
        "ingest:alert:9b1c": ("string", 7 * DAY),
    })
    stored = json.loads(await aredis.get(f"{prefix}:ingest:cum:{point.series_id}"))
    assert stored == [[T0, json.dumps([T0 - 60_000, [5.0], []]), -1]]


class _Recorder:
    """An actuator that notes which keys exist while it runs (the target lock)."""

    def __init__(self, aredis, prefix: str) -> None:
        self.aredis, self.prefix, self.seen = aredis, prefix, {}

    async def execute(self, action: Action, decision: Decision) -> str:
        self.seen = await _layout(self.aredis, self.prefix)
        return "done"


@pytest.mark.integration
async def test_executor_and_verifier_layout(aredis, prefix) -> None:
    actuator = _Recorder(aredis, prefix)
    ex = ActionExecutor(aredis, {"restart": actuator}, prefix=prefix, timeout_s=5,
                        verifier=Verifier(aredis, prefix))
    d = _decision(verify_within_s="60", verify_below="1")
    await ex.run(d)  # schedules the verification with the done claim
    assert actuator.seen["lock:web-1"][0] == "string"
    await ex.compensate(d, Action(type="restart", target="web-1"))
    _assert_layout(await _layout(aredis, prefix), {
        "act:dc-1": ("string", 7 * DAY),
        "act:dc-1:compensation": ("string", 7 * DAY),
        "verify:dc-1": ("string", 7 * DAY + 60),
        "verify:due": ("zset", -1),
    })
    assert await aredis.get(f"{prefix}:act:dc-1") == b"done:succeeded"
    job = json.loads(await aredis.get(f"{prefix}:verify:dc-1"))
    assert await aredis.zscore(f"{prefix}:verify:due", "dc-1") == job["deadline"]


@pytest.mark.integration
async def test_approval_layout(aredis, prefix) -> None:
    store = ApprovalStore(aredis, prefix, ttl_s=900, keys=TEST_APPROVAL_KEYS)
    ev, _ = await store.request(_decision(Mode.needs_approval), now_ms=T0)
    assert ev.approval_id == "ap-1"
    assert await aredis.zscore(f"{prefix}:appr:pending", "ap-1") == ev.expires_at
    await store.resolve("ap-1", ApprovalStatus.approved, by="op", via="cli", now_ms=T0 + 1)
    _assert_layout(await _layout(aredis, prefix), {
        "appr:ap-1": ("hash", 30 * DAY),
        "appr:unfinished": ("zset", -1),
        "appr:index": ("zset", -1),
    })
    assert sorted(await aredis.hgetall(f"{prefix}:appr:ap-1")) == [
        b"at", b"by", b"decision", b"expires_at", b"nvotes", b"reason", b"request",
        b"request_sig", b"required", b"status", b"via", b"vote:op", b"voters"]
    assert await aredis.zscore(f"{prefix}:appr:index", "ap-1") == T0
    assert await aredis.zscore(f"{prefix}:appr:unfinished", "ap-1") == T0 + 1


@pytest.mark.integration
async def test_audit_state_layout(aredis, prefix) -> None:
    state = RedisAuditState(aredis, prefix)
    assert await state.acquire("host:1")
    await state.begin(None, Head(1, "h1"))
    assert await aredis.get(f"{prefix}:audit:pending") == b"1:h1"
    await state.commit(None, Head(1, "h1"), {"ia.decisions/0": 7})
    _assert_layout(await _layout(aredis, prefix), {
        "audit:head": ("string", -1),
        "audit:offsets": ("hash", -1),
        "audit:lease": ("string", 15),
    })
    assert await aredis.get(f"{prefix}:audit:head") == b"1:h1"
    assert await aredis.hgetall(f"{prefix}:audit:offsets") == {b"ia.decisions/0": b"7"}


# -- nothing but ia/core/keys.py spells a key ----------------------------------------------

PRODUCT = ("schemas", "features", "decisions", "actuators", "streams", "ia")
KEYS_MODULE = ROOT / "ia" / "core" / "keys.py"
# Key segments of the families (with their separators), as they would appear in a literal.
FAMILY_MARKERS = re.compile(r":(f:v1|claim|g|dfx|labels|model|act|lock|verify|appr|audit):"
                            r"|:paused\b")


def _names_prefix(node: ast.AST) -> bool:
    """Whether ``node`` is a variable or attribute called ``...prefix``."""
    name = node.id if isinstance(node, ast.Name) else \
        node.attr if isinstance(node, ast.Attribute) else ""
    return name.endswith("prefix")


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                          | ast.AsyncFunctionDef)
            and (body := node.body) and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)}


def _joins_prefix(node: ast.AST) -> bool:
    """``f"{prefix}:..."`` or ``":".join((prefix, ...))``."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(here, ast.FormattedValue) and _names_prefix(here.value)
                   and isinstance(nxt, ast.Constant) and str(nxt.value).startswith(":")
                   for here, nxt in itertools.pairwise(node.values))
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
        node.func.attr == "join" and isinstance(node.func.value, ast.Constant) and \
        node.func.value.value == ":" and \
        any(_names_prefix(n) for a in node.args for n in ast.walk(a))


def _key_spellings(tree: ast.AST) -> list[int]:
    """Lines that build a key from a prefix, or spell a family's segment."""
    docs = _docstrings(tree)
    lines = {node.lineno for node in ast.walk(tree) if _joins_prefix(node)}
    lines |= {node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs and not _is_lua(node.value)
              and FAMILY_MARKERS.search(node.value)}
    return sorted(lines)


def _is_lua(text: str) -> bool:
    return "redis.call(" in text


def _product_modules() -> list[Path]:
    return [p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts]


def test_only_the_keys_module_spells_a_key() -> None:
    found = {}
    for path in _product_modules():
        if path == KEYS_MODULE:
            continue
        lines = _key_spellings(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert found == {}, "build these keys with ia.core.keys.Keys"


def test_the_key_check_sees_a_key_spelled_elsewhere() -> None:
    spelled = ast.parse('k = f"{self.prefix}:act:{d}"\n'
                        'j = ":".join((prefix, "g", "win"))\n'
                        'lit = "ia:paused"\n'
                        'topic = f"{prefix}.telemetry"\n')
    assert _key_spellings(spelled) == [1, 2, 3]
    assert _key_spellings(ast.parse(KEYS_MODULE.read_text())) != []


# -- Lua scripts take their keys in KEYS[] ------------------------------------------------

# The first argument of every redis.call is the key it touches.
_CALL = re.compile(r"redis\.call\(\s*'(\w+)'\s*,\s*([^,)]+)")
_KEY_LOOP = re.compile(r"for\s+\w+\s*,\s*(\w+)\s+in\s+ipairs\(KEYS\)")
# A script that composes a key, with the reason it may.
COMPOSES_KEY = {
    "slot_release.lua": "the group is read inside the script (atomically with the release); "
                        "the slots key stem comes from Keys.slots('') in ARGV[1]",
}


def _lua_sources() -> dict[str, str]:
    lua_dir = resources.files("ia.decisions.guards").joinpath("lua")
    out = {p.name: p.read_text() for p in lua_dir.iterdir() if p.name.endswith(".lua")}
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    _is_lua(node.value):
                out[f"{path.relative_to(ROOT)}:{node.lineno}"] = node.value
    return out


def _keys_built(script: str) -> list[str]:
    loop_keys = set(_KEY_LOOP.findall(script))
    return [arg.strip() for _cmd, arg in _CALL.findall(script)
            if not re.fullmatch(r"KEYS\[[^\]]+\]", arg.strip()) and arg.strip() not in loop_keys]


def test_lua_scripts_receive_their_keys() -> None:
    sources = _lua_sources()
    assert len(sources) >= 15  # the guard scripts, the feature store's, approvals', audit's
    built = {name: _keys_built(src) for name, src in sources.items() if _keys_built(src)}
    assert set(built) == set(COMPOSES_KEY), built
    assert built["slot_release.lua"] == ["ARGV[1] .. group"]
