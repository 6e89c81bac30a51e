"""The example ACL users of docs/redis-users.conf (one per process, least privilege),
loaded into a real Redis: each user can do its own job and nothing else, and together
they cover every key family of ia/core/keys.py."""

from __future__ import annotations

import fnmatch
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from ia.core.keys import Keys
from ia.core.redis import sync_client
from ia.core.settings import RedisSettings
from ia.runtime import embedded

pytestmark = pytest.mark.integration

USERS_FILE = Path(__file__).resolve().parent.parent / "docs" / "redis-users.conf"
ROLES = ("worker", "actuator", "audit", "api", "operator", "ingest", "receiver")


def _users() -> dict[str, list[str]]:
    """user name -> its rules, from the example file."""
    return {m.group(1): m.group(2).split() for m in re.finditer(
        r"^user (\S+) (.*)$", USERS_FILE.read_text(), re.MULTILINE)}


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    """A Redis configured with the example file, each ``>change-me-...`` replaced by a
    fresh password (in a file per user, as a process would get it)."""
    tmp = tmp_path_factory.mktemp("acl")
    text, files = USERS_FILE.read_text(), {}
    for role in ROLES:
        password = secrets.token_urlsafe(24)
        text = text.replace(f">change-me-{role} ", f">{password} ")
        files[role] = tmp / f"{role}.password"
        files[role].write_text(password + "\n")
    assert " >change-me" not in text
    (tmp / "users.conf").write_text(text)
    # Not start_redis: its health check is a PING as the default user, which is off.
    port = embedded.free_port()
    argv = embedded._redis_argv(embedded.redis_binary(), port, tmp, config=tmp / "users.conf")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not embedded.port_open(port):
            assert proc.poll() is None and time.monotonic() < deadline, \
                "Redis did not start with the example users"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", files
    finally:
        proc.terminate()
        proc.wait(10)


def _as(acl_redis, role: str) -> redis.Redis:
    url, files = acl_redis
    return sync_client(RedisSettings(url=url, username=f"ia-{role}",
                                     password_file=files[role]))


K = Keys("ia")
# What each role must be able to write, and keys it must not touch.
ALLOWED = {
    "worker": [K.model("feedback"), K.entity("svc"), K.claim("cooldown:target:svc"),
               K.remembered_decision("dc-1"), K.slots("all"), K.label_quota("svc", 1)],
    "actuator": [K.action_claim("dc-1"), K.target_lock("svc"), K.verification("dc-1"),
                 K.approval("ap-1"), K.breaker_failures("webhook:svc")],
    "audit": [K.audit_head, K.audit_pending, K.audit_lease],
    "api": [K.approval("ap-2"), K.approvals_pending],
    "operator": [K.kill_switch, K.approval("ap-3")],
    "ingest": [K.cumulative("0" * 32)],
    "receiver": [K.alert_seen("0" * 32)],
}
DENIED = {
    "worker": [K.approval("ap-1"), K.kill_switch, K.action_claim("dc-1"), K.audit_head,
               K.breaker_failures("webhook:svc"), K.budget("global", "ok")],
    "actuator": [K.model("feedback"), K.kill_switch, K.entity("svc"), K.audit_head,
                 K.remembered_decision("dc-1")],
    "audit": [K.model("feedback"), K.kill_switch, K.approval("ap-1"), K.entity("svc")],
    "api": [K.model("feedback"), K.kill_switch, K.action_claim("dc-1"), K.audit_head],
    "operator": [K.model("feedback"), K.action_claim("dc-1"), K.entity("svc")],
    "ingest": [K.entity("svc"), K.kill_switch, K.alert_seen("0" * 32)],
    "receiver": [K.entity("svc"), K.kill_switch, K.cumulative("0" * 32)],
}


def test_nobody_gets_in_without_a_user(acl_redis) -> None:
    url, _files = acl_redis
    bare = redis.Redis.from_url(url)
    with pytest.raises((AuthenticationError, ResponseError), match=r"NOAUTH|authenticated"):
        bare.set(K.kill_switch, "1")
    bare.close()


@pytest.mark.parametrize("role", ROLES)
def test_each_process_writes_its_own_keys_only(acl_redis, role: str) -> None:
    r = _as(acl_redis, role)
    try:
        for key in ALLOWED[role]:
            assert r.set(key, b"x"), key
            r.delete(key)
        # What the stores do besides plain commands: cached scripts, WATCH + MULTI.
        sha = r.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
        assert r.evalsha(sha, 1, ALLOWED[role][0], b"y")
        with r.pipeline() as pipe:
            pipe.watch(ALLOWED[role][0])
            pipe.multi()
            pipe.delete(ALLOWED[role][0])
            assert pipe.execute() == [1]
        for key in DENIED[role]:
            with pytest.raises(NoPermissionError):
                r.set(key, b"forged")
            with pytest.raises(NoPermissionError):  # a script is checked just the same
                r.eval("return redis.call('SET', KEYS[1], 'forged')", 1, key)
        for command in (r.flushall, r.keys, lambda: r.config_get("requirepass")):
            with pytest.raises(NoPermissionError):
                command()
    finally:
        r.close()


def test_the_worker_reads_but_cannot_forge_outcome_state(acl_redis) -> None:
    """The worker's guards read the error budget and breaker failures the actuator
    records; only the actuator may write them."""
    actuator, worker = _as(acl_redis, "actuator"), _as(acl_redis, "worker")
    try:
        key = K.budget("global", "fail")
        actuator.zadd(key, {"dc-1": 1})
        assert worker.zcount(key, "-inf", "+inf") == 1
        with pytest.raises(NoPermissionError):
            worker.zrem(key, "dc-1")
        assert worker.get(K.kill_switch) is None  # reads the pause, cannot lift or set it
    finally:
        actuator.delete(K.budget("global", "fail"))
        actuator.close()
        worker.close()


def test_every_key_family_belongs_to_some_user() -> None:
    """A key family added to keys.py without a user that may touch it fails here."""
    patterns = [rule.split("~", 1)[1] for rules in _users().values() for rule in rules
                if "~" in rule]
    families = [K.entity("e"), K.claim("c"), K.window("w"), K.slots("g"), K.slot_of("dc-1"),
                K.group_of("dc-1"), K.fleet("g"), K.breaker("t:x"), K.breaker_failures("t:x"),
                K.budget("s", "ok"), K.kill_switch, K.remembered_decision("dc-1"),
                K.labels("dc-1"), K.model("m"), K.action_claim("dc-1"),
                K.compensation_claim("dc-1"), K.target_lock("x"), K.verification("dc-1"),
                K.verifications_due, K.approval("ap-1"), K.approvals_pending,
                K.approvals_unfinished, K.approvals_index, K.audit_head, K.audit_pending,
                K.audit_offsets, K.audit_lease, K.label_quota("e", 1), K.cumulative("s"),
                K.alert_seen("a"), K.scope_of("dc-1"), K.health_seen("g"),
                K.health_anomalies("g"), K.health_out("g")]
    families += [getattr(K, name) for name in dir(Keys) if isinstance(
        getattr(Keys, name), property) and name != "everything"]
    orphans = [key for key in families if not any(fnmatch.fnmatchcase(key, p)
                                                  for p in patterns)]
    assert orphans == []
    methods = {name for name in vars(Keys) if not name.startswith("_")} - {"prefix",
                                                                          "everything"}
    assert len(methods) == 36, "a new key family: add it to the ACL users and to this test"
    assert set(_users()) == {"default", *(f"ia-{role}" for role in ROLES)}
    assert _users()["default"] == ["off"]
