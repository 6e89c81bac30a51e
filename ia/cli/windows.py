"""``ia windows add|list|remove``: freeze and maintenance windows added at run time.

They are kept with the guard state in Redis (``{prefix}:g:freeze``) and honoured
by every worker and actuator of the prefix within half a second, next to the
windows the policy declares.  Every change is recorded (who, when, why, the
window) in ``{prefix}:g:freeze-log``, which ``ia windows list --log`` shows.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import re
from typing import Any

import click

from ia.cli.common import redis_client, settings, when
from ia.core.errors import UsageError

FREEZE_LOG_LEN = 1000
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise UsageError(f"cannot read duration {text!r}: use e.g. 90s, 30m, 2h or 1d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _labels(pairs: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, glob = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {pair!r}: give NAME=GLOB")
        out.setdefault(key, []).append(glob)
    return out


def build_window(name: str, *, effect: str, start: str, end: str | None, for_: str | None,
                 rrule: str | None, duration: str | None, expires: str | None, tz: str,
                 entity: tuple[str, ...], label: tuple[str, ...], action: tuple[str, ...],
                 owner: str, reason: str, by: str, now: int):
    """The window ``ia windows add`` describes, validated as a policy window is."""
    from pydantic import ValidationError

    from ia.core.times import parse_time
    from ia.decisions.windows import FreezeWindow, instant_ms

    def instant(text: str) -> str | int:
        # Epoch ms, now and -2h are read here; ISO times go to the window (naive: in tz).
        return text if re.match(r"^\d{4}-\d\d-\d\d", text.strip()) else parse_time(text, now)

    data: dict[str, Any] = {
        "name": name, "effect": effect, "owner": owner, "reason": reason, "tz": tz,
        "start": instant(start), "added_by": by, "added_at": now,
        "match": {"entity": list(entity) or ["*"], "labels": _labels(label),
                  "action": list(action) or ["*"]}}
    if rrule is not None:
        data.update(rrule=rrule, duration_s=_seconds(duration) if duration else None,
                    expires=instant(expires) if expires else None)
    elif for_ is not None and end is not None:
        raise UsageError("give --end or --for, not both")
    try:
        if rrule is None and for_ is not None:
            # The start as the window reads it (in tz), then its length on top.
            data["end"] = instant_ms(data["start"], tz) + int(_seconds(for_) * 1000)
        elif rrule is None:
            data["end"] = instant(end) if end else None
        window = FreezeWindow.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"window {name!r}: {where + ': ' if where else ''}{err['msg']}"
                         ) from None
    if window.expires_ms <= now:
        raise UsageError(f"window {name!r} has already ended")
    return window


async def _log(client, prefix: str, entry: dict[str, Any]) -> None:
    from ia.core.keys import Keys

    key = Keys(prefix).freeze_log
    async with client.pipeline(transaction=True) as pipe:
        pipe.lpush(key, json.dumps(entry, sort_keys=True))
        pipe.ltrim(key, 0, FREEZE_LOG_LEN - 1)
        await pipe.execute()


def _run(work):
    async def go():
        from ia.decisions.guards import RedisGuardStore

        s = settings()
        client = redis_client(s)
        try:
            return await work(client, s.redis.prefix, RedisGuardStore(client, s.redis.prefix))
        finally:
            await client.aclose()

    return asyncio.run(go())


@click.group()
def windows() -> None:
    """Freeze and maintenance windows added at run time (beside the policy's)."""


@windows.command("add")
@click.argument("name")
@click.option("--effect", type=click.Choice(["block", "needs_approval"]), default="block",
              show_default=True, help="Block actions, or downgrade auto to needs_approval.")
@click.option("--reason", required=True, help="Why (shown in every decision it holds).")
@click.option("--owner", default=None, help="Who owns the window (default: $USER).")
@click.option("--start", default="now", show_default=True,
              help="ISO 8601 (in --tz unless it has an offset), epoch ms, now, -1h.")
@click.option("--end", default=None, help="When a one-off window ends.")
@click.option("--for", "for_", default=None, help="Or its length: 90m, 2h, 1d.")
@click.option("--rrule", default=None,
              help='Recurring: an RFC 5545 RRULE, e.g. "FREQ=WEEKLY;BYDAY=SA" (start is '
                   "the first occurrence).")
@click.option("--duration", default=None, help="Length of each occurrence (with --rrule).")
@click.option("--expires", default=None, help="When a recurring window ends (mandatory).")
@click.option("--tz", default="UTC", show_default=True, help="IANA time zone.")
@click.option("--entity", multiple=True, help="Entity glob (repeatable; default all).")
@click.option("--label", multiple=True, help="NAME=GLOB on the event's labels (repeatable).")
@click.option("--action", multiple=True, help="Action-type glob (repeatable; default all).")
@click.option("--by", default=None, help="Who adds it (default: $USER).")
def add(name: str, effect: str, reason: str, owner: str | None, start: str, end: str | None,
        for_: str | None, rrule: str | None, duration: str | None, expires: str | None,
        tz: str, entity: tuple[str, ...], label: tuple[str, ...], action: tuple[str, ...],
        by: str | None) -> None:
    """Add a window; workers and actuators honour it within a second."""
    from ia.core.clock import now_ms

    now, who = now_ms(), by or getpass.getuser()
    if rrule is None and end is None and for_ is None:
        raise UsageError("give --end or --for (a one-off window), or --rrule with "
                         "--duration and --expires: every window ends")
    window = build_window(name, effect=effect, start=start, end=end, for_=for_, rrule=rrule,
                          duration=duration, expires=expires, tz=tz, entity=entity,
                          label=label, action=action, owner=owner or who, reason=reason,
                          by=who, now=now)

    async def work(client, prefix, store):
        from ia.decisions.guards.stores import FREEZE_RETENTION_MS

        for old in await store.freeze_windows():
            # Housekeeping: windows long over are forgotten (and that is recorded).
            if old.expires_ms < now - FREEZE_RETENTION_MS and \
                    await store.remove_freeze_window(old.name) is not None:
                await _log(client, prefix, {"at": now, "by": who, "op": "remove",
                                            "reason": "expired over 7 days ago",
                                            "window": old.describe()})
        if not await store.add_freeze_window(window):
            raise UsageError(f"a window called {name!r} exists: remove it first")
        await _log(client, prefix, {"at": now, "by": who, "op": "add",
                                    "window": window.describe()})

    _run(work)
    click.echo(json.dumps({"added": window.describe()}, sort_keys=True))


@windows.command("remove")
@click.argument("name")
@click.option("--reason", required=True, help="Why it is lifted (recorded).")
@click.option("--by", default=None, help="Who removes it (default: $USER).")
def remove(name: str, reason: str, by: str | None) -> None:
    """Remove a window added with `ia windows add` (policy windows live in the policy)."""
    from ia.core.clock import now_ms

    now, who = now_ms(), by or getpass.getuser()

    async def work(client, prefix, store):
        gone = await store.remove_freeze_window(name)
        if gone is None:
            raise UsageError(f"no window called {name!r} was added at run time "
                             "(ia windows list)")
        await _log(client, prefix, {"at": now, "by": who, "op": "remove", "reason": reason,
                                    "window": gone.describe()})
        return gone

    gone = _run(work)
    click.echo(json.dumps({"removed": gone.name, "by": who, "reason": reason}))


@windows.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per window.")
@click.option("--policy", "policy_file", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="Also list this policy's windows (default: IA_POLICY_FILE).")
@click.option("--log", "show_log", is_flag=True, help="Show the record of changes instead.")
def list_(as_json: bool, policy_file: str | None, show_log: bool) -> None:
    """Windows in Redis and in the policy, and whether each is in force now."""
    from ia.core.clock import now_ms
    from ia.core.keys import Keys

    now = now_ms()

    async def work(client, prefix, store):
        if show_log:
            return [json.loads(x) for x in await client.lrange(Keys(prefix).freeze_log, 0, -1)]
        return await store.freeze_windows()

    found = _run(work)
    if show_log:
        for entry in found:
            click.echo(json.dumps(entry, sort_keys=True) if as_json else
                       f"{when(entry['at'])}  {entry['op']:6} {entry['window']['name']} by "
                       f"{entry['by']}" + (f": {entry['reason']}" if entry.get("reason")
                                           else ""))
        return
    rows = [("runtime", w) for w in found] + [("policy", w) for w in _policy_windows(
        policy_file)]
    for source, w in rows:
        occ = w.in_force(now)
        if as_json:
            click.echo(json.dumps({**w.describe(), "source": source,
                                   "in_force": occ is not None}, sort_keys=True))
            continue
        state = f"IN FORCE until {when(occ[1])}" if occ else f"expires {when(w.expires_ms)}"
        click.echo(f"{w.name:24} {source:7} {w.effect:14} {state}  owner {w.owner}: "
                   f"{w.reason}")


def _policy_windows(path: str | None) -> list:
    from ia.decisions.policy import Policy

    file = path or settings().policy_file
    return list(Policy.from_file(file).doc.windows) if file else []
