"""Every Redis key the system uses, spelled in one place.

Workers, actuators, the audit writer and the CLI of one deployment share one
Redis and tell their data apart by a prefix (``settings.redis.prefix``,
default ``ia``; the shadow pipeline uses ``<prefix>.shadow``).  A store is
built with that prefix and asks :class:`Keys` for its key names, so a key
family is renamed, audited or documented here and nowhere else.  There is no
migration of stored data: a changed spelling orphans what is stored under the
old one, so ``tests/test_redis_keys.py`` pins every family.

``docs/redis-layout.md`` is the full specification (fields, encodings,
atomicity).  The families, for the prefix ``ia``:

====================  =================================  ======  ===================  ==============
family                key                                type    writers / readers    TTL
====================  =================================  ======  ===================  ==============
entity                ia:f:v1:{entity}                   hash    worker / worker,     14 d, renewed
                                                                 verifier, CLI
claim                 ia:claim:{guard key}               string  worker               24 h
window                ia:g:win:{guard key}               zset    worker               window + 24 h
slots                 ia:g:slots:{group}                 zset    worker, actuator     2*lease + 60 s
slot-of               ia:g:slot-of:{decision id}         string  worker, actuator     2*lease + 60 s
group-of              ia:g:group-of:{decision id}        string  worker / actuator    7 d
fleet                 ia:g:fleet:{group}                 set     worker               7 d
breaker               ia:g:cb:{type}:{target}            hash    worker, actuator     7 d
breaker failures      ia:g:cb-fail:{type}:{target}       zset    actuator / worker,   7 d
                                                                 actuator
budget                ia:g:eb:{scope}:{ok|fail}          zset    actuator / worker    7 d
freeze windows        ia:g:freeze                        hash    CLI / worker,        none
                                                                 actuator
freeze log            ia:g:freeze-log                    list    CLI                  1000 kept
scope                 ia:g:scope:{decision id}           string  worker / actuator    7 d
health seen           ia:g:hl-seen:{group}               zset    worker               7 d
health anomalies      ia:g:hl-sick:{group}               zset    worker               7 d
health out            ia:g:hl-out:{group}                zset    worker, actuator     2*lease+60 s
kill switch           ia:paused                          string  CLI / worker,        none
                                                                 actuator
remembered            ia:dfx:{decision id}               string  worker               30 d
labels                ia:labels:{decision id}            hash    worker               30 d
model                 ia:model:{name}                    hash    worker               none
action claim          ia:act:{decision id}               string  actuator             7 d
compensation claim    ia:act:{decision id}:compensation  string  actuator             7 d
target lock           ia:lock:{target}                   string  actuator             timeout + 5 s
verification          ia:verify:{decision id}            string  actuator             window + 7 d
verifications due     ia:verify:due                      zset    actuator             none
approval              ia:appr:{approval id}              hash    actuator, API, CLI   TTL + 30 d
approvals pending     ia:appr:pending                    zset    actuator, API, CLI   none
approvals unfinished  ia:appr:unfinished                 zset    actuator, API, CLI   none
approvals index       ia:appr:index                      zset    actuator / API, CLI  none
audit head            ia:audit:head                      string  audit writer / CLI   none
audit pending         ia:audit:pending                   string  audit writer / CLI   none
audit offsets         ia:audit:offsets                   hash    audit writer         none
audit lease           ia:audit:lease                     string  audit writer         15 s, renewed
cumulative            ia:ingest:cum:{series id}          string  ingest               1 d, renewed
alert seen            ia:ingest:alert:{alert id}         string  receiver             7 d
====================  =================================  ======  ===================  ==============

"writers / readers" is one list where each of them does both.

Key arguments are used verbatim: the guard keys (``cooldown:target:web-1``,
``rate:{rule}``, ``{type}:{target}``, ``type:{type}``, ...) are spelled by the
guards in :mod:`ia.decisions.guards.builtin`, because the memory guard store
uses the same names.  One Lua script composes a key itself:
``slot_release.lua`` appends the group it reads to ``Keys.slots("")``, which
it receives in ``ARGV``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one deployment prefix (see the module docstring)."""

    prefix: str = "ia"

    @property
    def everything(self) -> str:
        """``SCAN MATCH`` pattern of every key of this prefix (benchmark clean-up)."""
        return f"{self.prefix}:*"

    # -- feature store (ia.features.store) ------------------------------------------

    def entity(self, entity: str) -> str:
        """The entity's hash: its features, detector state and remembered decisions.
        ``v1`` is the hash layout's version."""
        return f"{self.prefix}:f:v1:{entity}"

    # -- guards (ia.decisions.guards) -------------------------------------------------

    def claim(self, name: str) -> str:
        """A cooldown claim: ``owner|until_ts``."""
        return f"{self.prefix}:claim:{name}"

    def window(self, name: str) -> str:
        """A rate limit's sliding window."""
        return self._guard("win", name)

    def slots(self, group: str) -> str:
        """A blast-radius group's in-flight slots."""
        return self._guard("slots", group)

    def slot_of(self, decision_id: str) -> str:
        """The group whose slot a decision holds."""
        return self._guard("slot-of", decision_id)

    def group_of(self, decision_id: str) -> str:
        """The blast-radius group the worker assigned a decision to."""
        return self._guard("group-of", decision_id)

    def fleet(self, group: str) -> str:
        """The entities seen in a blast-radius group."""
        return self._guard("fleet", group)

    def breaker(self, name: str) -> str:
        """A circuit breaker's state."""
        return self._guard("cb", name)

    def breaker_failures(self, name: str) -> str:
        """A circuit breaker's recent failures."""
        return self._guard("cb-fail", name)

    def budget(self, scope: str, result: str) -> str:
        """An error budget's recent ``ok`` or ``fail`` outcomes."""
        return self._guard("eb", scope, result)

    @property
    def freeze_windows(self) -> str:
        """Freeze and maintenance windows added at run time (``ia windows``)."""
        return self._guard("freeze")

    @property
    def freeze_log(self) -> str:
        """Who added or removed which window, when and why (newest first)."""
        return self._guard("freeze-log")

    def scope_of(self, decision_id: str) -> str:
        """A decision's labels and the windows that held it, for the execution check."""
        return self._guard("scope", decision_id)

    def health_seen(self, group: str) -> str:
        """When each entity of a capacity-floor group last sent a sample."""
        return self._guard("hl-seen", group)

    def health_anomalies(self, group: str) -> str:
        """When each entity of a capacity-floor group last had an anomalous sample."""
        return self._guard("hl-sick", group)

    def health_out(self, group: str) -> str:
        """Targets that admitted actions keep out of a group's healthy count."""
        return self._guard("hl-out", group)

    @property
    def kill_switch(self) -> str:
        """Set while automation is paused (``ia pause``)."""
        return f"{self.prefix}:paused"

    def _guard(self, *parts: str) -> str:
        return ":".join((self.prefix, "g", *parts))

    # -- learning (ia.decisions.learning, ia.decisions.checkpoint) --------------------

    def remembered_decision(self, decision_id: str) -> str:
        """What a later label needs of an action decision."""
        return f"{self.prefix}:dfx:{decision_id}"

    def labels(self, decision_id: str) -> str:
        """What a decision's labels have done (each step once)."""
        return f"{self.prefix}:labels:{decision_id}"

    def label_quota(self, entity: str, window: int) -> str:
        """Labels counted for an entity in one window (the feedback cap)."""
        return f"{self.prefix}:fbq:{window}:{entity}"

    def model(self, name: str) -> str:
        """A shared model's versioned checkpoint."""
        return f"{self.prefix}:model:{name}"

    # -- actuator (ia.actuators) ------------------------------------------------------

    def action_claim(self, decision_id: str) -> str:
        """At most one action outcome per decision."""
        return f"{self.prefix}:act:{decision_id}"

    def compensation_claim(self, decision_id: str) -> str:
        """At most one compensating action per decision."""
        return f"{self.prefix}:act:{decision_id}:compensation"

    def target_lock(self, target: str) -> str:
        """One action per target at a time."""
        return f"{self.prefix}:lock:{target}"

    def verification(self, decision_id: str) -> str:
        """A pending verification of an action's effect."""
        return f"{self.prefix}:verify:{decision_id}"

    @property
    def verifications_due(self) -> str:
        """Pending verifications by deadline."""
        return f"{self.prefix}:verify:due"

    def approval(self, approval_id: str) -> str:
        """One approval request and its answer."""
        return f"{self.prefix}:appr:{approval_id}"

    @property
    def approvals_pending(self) -> str:
        """Unanswered approval requests by expiry."""
        return f"{self.prefix}:appr:pending"

    @property
    def approvals_unfinished(self) -> str:
        """Answered approvals whose outcome is not produced yet."""
        return f"{self.prefix}:appr:unfinished"

    @property
    def approvals_index(self) -> str:
        """Every approval request by time requested (for listing)."""
        return f"{self.prefix}:appr:index"

    # -- audit log (ia.governance.audit_store) ----------------------------------------

    @property
    def audit_head(self) -> str:
        """``seq:hash`` of the log's last committed record."""
        return f"{self.prefix}:audit:head"

    @property
    def audit_pending(self) -> str:
        """``seq:hash`` of a batch being appended."""
        return f"{self.prefix}:audit:pending"

    @property
    def audit_offsets(self) -> str:
        """Last source offset recorded, per topic and partition."""
        return f"{self.prefix}:audit:offsets"

    @property
    def audit_lease(self) -> str:
        """The single writer's lease."""
        return f"{self.prefix}:audit:lease"

    # -- ingest (ia.ingest) -----------------------------------------------------------

    def cumulative(self, series_id: str) -> str:
        """A cumulative OTLP series' last points (ia.ingest.cumulative)."""
        return f"{self.prefix}:ingest:cum:{series_id}"

    def alert_seen(self, alert_id: str) -> str:
        """An Alertmanager alert state already sent on (ia.ingest.alertmanager)."""
        return f"{self.prefix}:ingest:alert:{alert_id}"
