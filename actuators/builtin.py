"""Built-in actuators: log, webhook, notify, command and the demo simulator's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from ia.actuators.approvals import approval_id_for
from ia.actuators.base import ActionFailed
from ia.schemas.models import Action, Decision

log = logging.getLogger("ia.actuators")
# httpx logs every request's full URL at INFO, and webhook URLs carry tokens.
logging.getLogger("httpx").setLevel(logging.WARNING)


class LogActuator:
    """Records the action in the log and does nothing else (dry runs, tests)."""

    name = "log"

    async def execute(self, action: Action, decision: Decision) -> str:
        log.info("action %s on %s for decision %s", action.type, action.target,
                 decision.decision_id)
        return f"logged {action.type} on {action.target}"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


def resolve_secret(value: str) -> str:
    """The destination ``value`` names: itself, or the secret an ``env:``/``file:`` reference holds.

    Webhook URLs often carry tokens. A policy may therefore give ``env:NAME``
    (an environment variable of the actuator) or ``file:PATH`` (a file's first
    line) instead, so decisions, approvals and the audit log carry only the
    reference and the secret is read only here, at execution time.
    """
    kind, _, ref = value.partition(":")
    if kind == "env":
        secret = os.environ.get(ref, "")
        if not secret:
            raise ActionFailed(f"secret {value} is not set in the actuator's environment",
                               attempts=0)
        return secret
    if kind == "file":
        try:
            lines = Path(ref).read_text().splitlines()
        except OSError as exc:
            raise ActionFailed(f"secret {value} cannot be read: {exc.strerror}",
                               attempts=0) from None
        if not lines or not lines[0].strip():
            raise ActionFailed(f"secret {value} is empty", attempts=0)
        return lines[0].strip()
    return value


def redact_url(url: str) -> str:
    """``url`` as outcomes and logs show it: scheme and host, the rest masked.

    Path, query and user info are where webhook tokens live (Slack's
    ``/services/T/B/token``, ``?token=``, ``user:pass@``); the host is enough
    to tell which receiver answered.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid url>"
    if not parsed.scheme or not parsed.host:
        return "<invalid url>"
    port = f":{parsed.port}" if parsed.port else ""
    masked = "/..." if parsed.raw_path not in (b"", b"/") or parsed.userinfo else ""
    return f"{parsed.scheme}://{parsed.host}{port}{masked}"


class WebhookActuator:
    """HTTP POST of the decision to ``params.url`` (or the default URL).

    Sends an ``Idempotency-Key`` header (the decision id) so receivers can
    deduplicate too; a compensation has its own key
    (``<decision id>:compensation``) and says so in its body, so a
    de-duplicating receiver does not drop it as a repeat of the action.
    Retries transport errors, 429 and 5xx with exponential backoff; 4xx is
    final. ``params.url`` may be a secret reference (:func:`resolve_secret`);
    outcomes and logs show only :func:`redact_url` of it.
    """

    name = "webhook"

    def __init__(self, default_url: str | None = None, retries: int = 3,
                 timeout_s: float = 5.0, backoff_s: float = 0.2) -> None:
        self.default_url = default_url
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._client: httpx.AsyncClient | None = None

    def url_for(self, action: Action) -> str:
        url = action.params.get("url") or self.default_url
        if not url:
            raise ActionFailed(f"{self.name}: no url in action params and no default configured",
                               attempts=0)
        return resolve_secret(url)

    def payload(self, action: Action, decision: Decision) -> dict:
        return {"decision_id": decision.decision_id, "action": action.model_dump(mode="json"),
                "entity": decision.entity, "metric": decision.metric,
                "anomaly_score": decision.anomaly_score, "mode": decision.mode.value}

    async def execute(self, action: Action, decision: Decision) -> str:
        return await self._post(self.url_for(action), self.payload(action, decision),
                                decision.decision_id)

    async def compensate(self, action: Action, decision: Decision) -> str:
        """POST the compensating ``action`` of ``decision`` (whose own action it undoes)."""
        undone = decision.action.model_dump(mode="json") if decision.action else None
        body = {**self.payload(action, decision), "phase": "compensation", "compensates": undone}
        return await self._post(self.url_for(action), body,
                                f"{decision.decision_id}:compensation")

    async def _post(self, url: str, body: dict, key: str) -> str:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        attempts = 0
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.retries + 1),
                wait=wait_exponential(multiplier=self.backoff_s, max=5.0),
                retry=retry_if_exception(_retryable), reraise=False,
            ):
                with attempt:
                    attempts += 1
                    resp = await self._client.post(url, json=body,
                                                   headers={"Idempotency-Key": key})
                    resp.raise_for_status()
        except RetryError as exc:
            raise ActionFailed(f"POST {self.describe(url)} failed after {attempts} attempts: "
                               f"{_error_text(exc.last_attempt.exception())}",
                               attempts) from exc
        except httpx.HTTPError as exc:
            raise ActionFailed(f"POST {self.describe(url)} failed: {_error_text(exc)}",
                               attempts) from exc
        return f"POST {self.describe(url)} -> {resp.status_code} after {attempts} attempt(s)"

    def describe(self, url: str) -> str:
        """How ``url`` appears in outcomes and logs: never its path, query or user info."""
        return redact_url(url)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class SimulatorActuator(WebhookActuator):
    """The demo fleet's control plane: restart, rollback, scale_out a service."""

    name = "simulator"

    def url_for(self, action: Action) -> str:
        if not self.default_url:
            raise ActionFailed("simulator: IA_SIMULATOR_URL is not set", attempts=0)
        return self.default_url.rstrip("/") + "/actions"


def _error_text(exc: BaseException | None) -> str:
    """What went wrong, without the URL httpx puts into its messages (in its own rendering)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}".strip()
    if isinstance(exc, httpx.HTTPError):
        return type(exc).__name__
    return type(exc).__name__ if exc is not None else "unknown error"


def slack_escape(text: str) -> str:
    """Slack mrkdwn control characters, so telemetry strings cannot ping or link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class NotifyActuator(WebhookActuator):
    """Posts a Slack-compatible incoming-webhook message about a decision.

    The payload has ``text`` (the fallback every Slack-compatible receiver
    shows: Slack, Mattermost, Rocket.Chat, Teams' Slack connector) and
    ``blocks`` with the details.  Incoming-webhook URLs are credentials, so
    outcomes and logs show only the host.  Params: ``message`` (a line of
    text to lead with), ``channel`` (for receivers that honour it) and
    ``notify_url`` (this rule's notification endpoint).

    Used for ``notify`` actions (:meth:`execute`), for ``notify``-mode
    decisions (:meth:`notify_instead`: the action is described, not run) and
    for announcing approval requests (:meth:`announce`).  The last two only
    ever go to a notification endpoint (``params.notify_url`` or
    ``IA_NOTIFY_URL``), never to the action's ``url``: that endpoint acts on
    what it receives, and must receive nothing before approval.  Each has its
    own idempotency key (``<decision id>:notify``, ``:announce``), so a
    de-duplicating receiver never mistakes the approved action for a repeat.
    """

    name = "notify"

    def url_for(self, action: Action) -> str:
        """``params.notify_url``, a ``notify`` action's own ``params.url``, or ``IA_NOTIFY_URL``."""
        own = action.params.get("url") if action.type == "notify" else None
        url = action.params.get("notify_url") or own or self.default_url
        if not url:
            raise ActionFailed("notify: no notify_url in action params and IA_NOTIFY_URL is not "
                               "set", attempts=0)
        return resolve_secret(url)

    async def notify_instead(self, decision: Decision) -> str:
        """Tell humans what a ``notify``-mode ``decision`` would have done."""
        return await self._about(decision, "notify")

    async def announce(self, decision: Decision) -> str:
        """Ask humans to answer the approval request of ``decision``."""
        return await self._about(decision, "announce")

    async def _about(self, decision: Decision, purpose: str) -> str:
        assert decision.action is not None
        notice = decision.action.model_copy(update={"params": {
            k: v for k, v in decision.action.params.items() if k != "url"}})
        return await self._post(self.url_for(notice), self.payload(notice, decision),
                                f"{decision.decision_id}:{purpose}")

    def describe(self, url: str) -> str:
        host = httpx.URL(url).host if "://" in url else "?"
        return f"notify webhook on {host}"

    def payload(self, action: Action, decision: Decision) -> dict:
        d = decision
        if action.type == "notify":  # the notification is the action
            headline = f"{d.entity}: {d.metric} = {d.value:g}"
        elif d.mode.value == "needs_approval":
            headline = (f"approval needed: {action.type} on {action.target} "
                        f"(ia approvals approve {approval_id_for(d.decision_id)})")
        else:
            headline = f"would run {action.type} on {action.target} (mode {d.mode.value})"
        lead = action.params.get("message", "")
        fields = [
            f"*entity* {d.entity}", f"*metric* {d.metric} = {d.value:g}",
            f"*score* {d.anomaly_score:.2f}  *confidence* {d.confidence:.2f}",
            f"*mode* {d.mode.value}",
        ]
        rule = d.chosen_rule
        guards = [f"{t.guard}: {t.reason}" for t in d.interventions()]
        if rule:
            fields.append(f"*rule* {rule}")
        fields += [f"*guard* {g}" for g in guards]
        text = slack_escape(" ".join(filter(None, [lead, f"[ia] {headline}"])))[:3000]
        body = slack_escape("\n".join(fields))[:3000]
        out: dict = {
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": text}},
                {"type": "section", "text": {"type": "mrkdwn", "text": body}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": slack_escape(
                    f"decision {d.decision_id} · policy {d.policy_version or '-'} · "
                    f"model {d.model.id}@{d.model.version}")[:3000]}]},
            ],
        }
        if action.params.get("channel"):
            out["channel"] = action.params["channel"]
        return out


class CommandActuator:
    """Runs a named argv list from the policy, never through a shell.

    The decision names the command (``params.command``); the argv comes only
    from the policy's ``commands`` section.  No telemetry string is ever
    interpolated: the process gets the decision id (a hex digest) in its
    environment and nothing else from the event.  ``commands`` is the map, or a
    callable returning the current one (the actuator's policy, so the map
    follows policy reloads).
    """

    name = "command"

    def __init__(self, commands: Mapping[str, list[str]] | Callable[[], Mapping[str, list[str]]],
                 timeout_s: float = 10.0) -> None:
        self._commands = commands
        self.timeout_s = timeout_s

    @property
    def commands(self) -> Mapping[str, list[str]]:
        """The command map in force now."""
        return self._commands() if callable(self._commands) else self._commands

    async def execute(self, action: Action, decision: Decision) -> str:
        name = action.params.get("command", "")
        argv = self.commands.get(name)
        if not argv:
            raise ActionFailed(f"command {name!r} is not declared in the policy", attempts=0)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "IA_DECISION_ID": decision.decision_id}
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            raise ActionFailed(f"{argv[0]} timed out after {self.timeout_s:g}s") from None
        finally:
            # Also when cancelled (the executor's own timeout): never leave it running.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        tail = out.decode(errors="replace")[-500:].strip()
        if proc.returncode != 0:
            raise ActionFailed(f"{argv[0]} exited with {proc.returncode}: {tail}")
        return f"{argv[0]} exited 0" + (f": {tail}" if tail else "")
