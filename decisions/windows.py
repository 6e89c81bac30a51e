"""Freeze and maintenance windows: when actions in a scope are blocked or need approval.

A window is declared in the policy (``windows:``) or added at run time
(``ia windows add``, kept with the guard state).  Both are the same object,
:class:`FreezeWindow`, judged by the ``freeze_window`` guard
(:mod:`ia.decisions.guards.builtin`) at the decision's clock: wall time live,
event time in replay and backtests.

Two shapes::

    - name: black-friday                   # one-off: start and end
      start: 2025-11-28T00:00:00
      end: 2025-12-01T08:00:00
      tz: America/New_York                 # naive times are in tz (default UTC)
      effect: block                        # or needs_approval (auto is downgraded)
      match: {labels: {env: prod}}         # entity / labels / action globs; default: all
      owner: sre-oncall
      reason: code freeze over the sales weekend

    - name: saturday-maintenance           # recurring: an RFC 5545 RRULE
      rrule: "FREQ=WEEKLY;BYDAY=SA;BYHOUR=2;BYMINUTE=0"
      start: 2025-01-04T02:00:00           # the first occurrence (DTSTART), wall clock in tz
      duration_s: 7200
      tz: Europe/Paris
      expires: 2026-01-01T00:00:00         # mandatory: no window is forever
      effect: needs_approval
      owner: db-team
      reason: weekly database maintenance

Every window ends: a one-off at ``end``, a recurring one at ``expires``, and
neither may last longer than :data:`MAX_WINDOW_DAYS`.  There is no "until the
incident resolves" form: incidents do not exist yet, so a window lasting as
long as one is a one-off with a generous ``end``, shortened with
``ia windows remove`` when the incident is over.

Recurrence is an RRULE (RFC 5545, the format of calendar invites, which is how
maintenance is usually announced) read by ``python-dateutil``: DTSTART carries
the time zone (``zoneinfo``), so "02:00 every Saturday in Paris" stays 02:00
across daylight-saving changes.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrule, rrulestr
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

MAX_WINDOW_DAYS = 366
# Finer recurrences are not maintenance windows, and dateutil would enumerate
# every occurrence since DTSTART to find the current one.
_HOURLY = 4  # dateutil's frequencies: YEARLY 0, MONTHLY 1, WEEKLY 2, DAILY 3, HOURLY 4, ...
WINDOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _instant(v: object) -> object:
    """A time as YAML, JSON or the CLI gives it: a datetime, an ISO 8601 string,
    a date, or epoch milliseconds (an int)."""
    if isinstance(v, bool):
        raise ValueError("give a time: ISO 8601 or epoch milliseconds")
    if isinstance(v, int | float):
        return dt.datetime.fromtimestamp(v / 1000, dt.UTC)
    if isinstance(v, dt.datetime):
        return v
    if isinstance(v, dt.date):
        return dt.datetime(v.year, v.month, v.day)
    if isinstance(v, str):
        try:
            return dt.datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"cannot read time {v!r}: use ISO 8601 (e.g. "
                             "2025-11-28T00:00:00, in tz unless it has an offset)") from None
    raise ValueError("give a time: ISO 8601 or epoch milliseconds")


Instant = Annotated[dt.datetime, BeforeValidator(_instant)]


def _globs(v: object) -> object:
    return [v] if isinstance(v, str) else v


class WindowScope(BaseModel):
    """Which decisions a window holds: globs on the entity, the event's labels
    (a missing label is ``""``) and the action type; all must match."""

    model_config = ConfigDict(extra="forbid")

    entity: Annotated[list[str], BeforeValidator(_globs)] = Field(default_factory=lambda: ["*"])
    labels: dict[str, list[str]] = Field(default_factory=dict)
    action: Annotated[list[str], BeforeValidator(_globs)] = Field(default_factory=lambda: ["*"])

    @field_validator("labels", mode="before")
    @classmethod
    def _label_globs(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    def covers(self, entity: str, labels: Mapping[str, str], action_type: str) -> bool:
        return (_any(self.entity, entity) and _any(self.action, action_type)
                and all(_any(g, labels.get(k, "")) for k, g in self.labels.items()))


def _any(globs: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, g) for g in globs)


class FreezeWindow(BaseModel):
    """One freeze or maintenance window (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    effect: Literal["block", "needs_approval"]
    match: WindowScope = Field(default_factory=WindowScope)
    owner: str = Field(min_length=1, max_length=256)
    reason: str = Field(min_length=1, max_length=1024)
    tz: str = "UTC"
    start: Instant
    end: Instant | None = None
    rrule: str | None = Field(default=None, min_length=1, max_length=512)
    duration_s: float | None = Field(default=None, gt=0)
    expires: Instant | None = None
    # Who added it at run time, and when (ia windows add); empty for policy windows.
    added_by: str = ""
    added_at: int = 0

    _rule: rrule | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not WINDOW_NAME.match(v):
            raise ValueError("a window name is letters, digits, '.', '_' or '-' "
                             "(starting with a letter or digit)")
        return v

    @field_validator("owner", "reason")
    @classmethod
    def _said(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank: every window names who owns it and why")
        return v

    @field_validator("tz")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as "
                             "Europe/Paris or UTC") from None
        return v

    @model_validator(mode="after")
    def _shape(self) -> FreezeWindow:
        zone = ZoneInfo(self.tz)
        # Naive times are wall-clock times in the window's zone.
        for name in ("start", "end", "expires"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.replace(tzinfo=zone) if value.tzinfo is None
                        else value.astimezone(zone))
        if self.rrule is None:
            self._one_off()
        else:
            self._recurring()
        last = self.end if self.rrule is None else self.expires
        assert last is not None
        if last - self.start > dt.timedelta(days=MAX_WINDOW_DAYS):
            raise ValueError(f"a window may last at most {MAX_WINDOW_DAYS} days from its "
                             "start: declare a new one when it ends")
        return self

    def _one_off(self) -> None:
        if self.end is None:
            raise ValueError("a one-off window needs an end (or give rrule, duration_s "
                             "and expires for a recurring one)")
        if self.duration_s is not None or self.expires is not None:
            raise ValueError("duration_s and expires belong to recurring windows (rrule); "
                             "a one-off window has start and end")
        if self.end <= self.start:
            raise ValueError("the window ends before it starts")

    def _recurring(self) -> None:
        if self.end is not None:
            raise ValueError("a recurring window has duration_s and expires, not end")
        if self.duration_s is None:
            raise ValueError("a recurring window needs duration_s (how long each "
                             "occurrence lasts)")
        if self.expires is None:
            raise ValueError("a recurring window needs expires: no window is forever")
        if self.expires <= self.start:
            raise ValueError("the window expires before it starts")
        if "DTSTART" in self.rrule.upper():
            raise ValueError("give the first occurrence as start, not DTSTART in the rrule")
        try:
            rule = rrulestr(self.rrule, dtstart=self.start, cache=True)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"cannot read rrule {self.rrule!r}: {exc}") from None
        if not isinstance(rule, rrule):
            raise ValueError("give one RRULE (not a set of rules or dates)")
        if rule._freq > _HOURLY:
            raise ValueError("recurrence finer than HOURLY is not a maintenance window")
        self._rule = rule

    def __eq__(self, other: object) -> bool:
        # The parsed recurrence is a cache, not part of the window.
        return isinstance(other, FreezeWindow) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]

    # -- when ---------------------------------------------------------------------------

    @property
    def recurring(self) -> bool:
        return self.rrule is not None

    @property
    def expires_ms(self) -> int:
        """When the window stops for good (a one-off's end)."""
        last = self.expires if self.rrule is not None else self.end
        assert last is not None
        return _ms(last)

    def in_force(self, now_ms: int) -> tuple[int, int] | None:
        """The occurrence (start, end in ms) holding ``now_ms``, or None."""
        start = _ms(self.start)
        if now_ms < start or now_ms >= self.expires_ms:
            return None
        if self.rrule is None:
            return start, self.expires_ms
        if self._rule is None:  # a model_construct'ed copy: rebuild lazily
            self._rule = rrulestr(self.rrule, dtstart=self.start, cache=True)  # type: ignore[assignment]
        moment = dt.datetime.fromtimestamp(now_ms / 1000, ZoneInfo(self.tz))
        occurrence = self._rule.before(moment, inc=True)  # type: ignore[union-attr]
        if occurrence is None:
            return None
        begin = _ms(occurrence)
        end = min(begin + int((self.duration_s or 0) * 1000), self.expires_ms)
        return (begin, end) if now_ms < end else None

    def covers(self, entity: str, labels: Mapping[str, str], action_type: str) -> bool:
        return self.match.covers(entity, labels, action_type)

    def describe(self) -> dict[str, Any]:
        """The window as JSON (``ia windows list``), with its times in UTC ms too."""
        out = self.model_dump(mode="json", exclude_defaults=False)
        out["start_ms"], out["expires_ms"] = _ms(self.start), self.expires_ms
        return out


def instant_ms(value: object, tz: str = "UTC") -> int:
    """``value`` (as a window's ``start`` takes it; naive in ``tz``) in epoch ms."""
    t = _instant(value)
    assert isinstance(t, dt.datetime)
    return _ms(t.replace(tzinfo=ZoneInfo(tz)) if t.tzinfo is None else t)


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def iso_utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The rule trace names the window that held a decision in this form; the backtest
# counts held decisions per window by reading it back (:func:`held_by`).
_HELD = re.compile(r"^window '([A-Za-z0-9._-]+)' ")


def held_reason(w: FreezeWindow, occurrence: tuple[int, int], what: str) -> str:
    """The rule-trace reason of a decision ``w`` holds: ``what`` is what it did."""
    added = f", added by {w.added_by}" if w.added_by else ""
    return (f"window '{w.name}' ({w.effect}) in force {iso_utc(occurrence[0])} - "
            f"{iso_utc(occurrence[1])}, owner {w.owner}{added}: {w.reason}; {what}")


def held_by(reason: str) -> str | None:
    """The window a ``freeze_window`` trace reason names (None: none)."""
    m = _HELD.match(reason)
    return m.group(1) if m else None


Effect = Literal["block", "needs_approval"]
