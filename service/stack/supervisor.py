"""Local server processes, the one place they are started and watched: free ports on 127.0.0.1, a poll
helper, a child server that is ready once its probe answers 200, and `gradwatch up` in a subprocess.

    child = start_child("prometheus", command, port, log)     # ChildFailed: it exited, or was not ready
    ...
    child.stop()

    service = ServiceProcess(data_dir, env=env, token=token)  # `gradwatch up` on a free port
    service.start()                                           # once GET /healthz answers 200
    service.kill()                                            # SIGKILL: no shutdown of its own runs
    service.start()                                           # the same port, data dir and log again
    service.stop()                                            # SIGTERM, then SIGKILL after a timeout

Every child runs in its own session (Ctrl-C in a terminal reaches only the parent, which stops it) and,
on Linux, dies with the parent should that be killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import httpx

from service.client import Client

LOOPBACK = "127.0.0.1"
READY_PATH = "/-/ready"  # Prometheus' and Alertmanager's readiness endpoint
HEALTH_PATH = "/healthz"  # the service's
START_TIMEOUT_S = 60.0  # a child server's time to answer its probe
STOP_TIMEOUT_S = 10.0  # a child server's time to exit on SIGTERM before it is killed
SERVICE_START_TIMEOUT_S = 90.0  # `gradwatch up`'s time to answer /healthz (it starts its monitoring first)
SERVICE_STOP_TIMEOUT_S = 30.0  # `gradwatch up`'s time to exit on SIGTERM (it stops its monitoring first)
PROBE_TIMEOUT_S = 2.0  # one readiness request
POLL_INTERVAL_S = 0.2  # between two readiness probes, and wait_for's default
WAIT_TIMEOUT_S = 30.0  # wait_for's default
LOG_TAIL_LINES = 20  # of a child's log, in the error when it fails

T = TypeVar("T")


class ChildFailed(RuntimeError):
    """A child server exited, or was not ready in time; the message names its log and shows its tail."""


def port_is_free(port: int) -> bool:
    """Whether `port` on 127.0.0.1 can be bound now."""
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that is free now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(
    fn: Callable[[], T | None], timeout: float = WAIT_TIMEOUT_S, interval: float = POLL_INTERVAL_S, what: str = ""
) -> T:
    """Call `fn` until it returns something truthy (returned, never None) or `timeout` seconds pass: then
    TimeoutError naming `what` (or `fn`) and its last result. A connection error counts as "not yet"."""
    if timeout < 0 or interval <= 0:
        raise ValueError(f"wait_for needs timeout >= 0 and interval > 0 seconds, got {timeout} and {interval}")
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except (httpx.HTTPError, OSError) as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"waited {timeout:.0f} s for {what or getattr(fn, '__name__', 'condition')}; last result: {last!r}"
            )
        time.sleep(interval)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # PR_SET_PDEATHSIG: a killed parent must not leave its servers behind.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class Child:
    """A started server: its name, base URL, process and log file; ready when GET `probe` answers 200."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    probe: str = READY_PATH

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def ready(self) -> bool:
        """Whether the probe answers 200; ChildFailed when the process has exited."""
        if self.process.poll() is not None:
            raise ChildFailed(f"{self.name} exited with {self.process.returncode} (log {self.log}):\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}{self.probe}", timeout=PROBE_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        try:
            wait_for(self.ready, timeout=timeout, interval=POLL_INTERVAL_S, what=f"{self.name} to be ready")
        except TimeoutError:
            raise ChildFailed(
                f"{self.name} did not answer {self.url}{self.probe} within {timeout:.0f} s "
                f"(log {self.log}):\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL and reap it (nothing of its own shutdown runs)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, and SIGKILL when it has not exited `timeout` seconds later."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_child(
    name: str,
    command: Sequence[str],
    port: int,
    log: Path,
    cwd: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    *,
    probe: str = READY_PATH,
    env: Mapping[str, str] | None = None,
) -> Child:
    """Start `command`, a server on 127.0.0.1:`port` logging to `log` (appended), and wait until GET
    `probe` answers 200; stopped again, with ChildFailed, when it exits or is not ready in `timeout` s."""
    if not probe.startswith("/"):
        raise ValueError(f"the readiness probe of {name} must be a path starting with '/', got {probe!r}")
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(command),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,  # Ctrl-C reaches the parent, which stops it
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
    except OSError as exc:
        raise ChildFailed(f"{name} could not be started ({command[0]}): {exc}") from exc
    child = Child(name, f"http://{LOOPBACK}:{port}", process, log, probe)
    try:
        child.wait_ready(timeout)
    except BaseException:
        child.stop()
        raise
    return child


def gradwatch_command() -> list[str]:
    """`gradwatch` of this interpreter's environment: its console script, else `python -m service.cli.main`."""
    script = Path(sys.executable).with_name("gradwatch")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli.main"]


class ServiceProcess:
    """`gradwatch up ARGS` in a subprocess of its own session on 127.0.0.1:`port` (default a free one), its
    data dir and log (`data_dir/service.log`, appended) the same across kill() and start() again.

    `env` (default this process's environment) is what it runs with, plus GRADWATCH_DATA_DIR and
    GRADWATCH_PORT, and GRADWATCH_TOKEN when `token` is given; `.env` may be changed before start().
    """

    def __init__(
        self,
        data_dir: Path,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        token: str | None = None,
        port: int | None = None,
        start_timeout: float = SERVICE_START_TIMEOUT_S,
        stop_timeout: float = SERVICE_STOP_TIMEOUT_S,
    ) -> None:
        if isinstance(args, str):
            raise TypeError(f"args is a list of `gradwatch up` arguments, not one string: {args!r}")
        self.data_dir = Path(data_dir)
        self.args = list(args)
        self.port = free_port() if port is None else port
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = self.data_dir / "service.log"
        self.token = token
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.env: dict[str, str] = {
            **(os.environ if env is None else env),
            "GRADWATCH_DATA_DIR": str(self.data_dir),
            "GRADWATCH_PORT": str(self.port),
        }
        if token is not None:
            self.env["GRADWATCH_TOKEN"] = token
        self.child: Child | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child else None

    @cached_property
    def client(self) -> Client:
        """A client of this service with its token (GRADWATCH_TOKEN of `.env` when first asked for)."""
        return Client(self.url, self.env.get("GRADWATCH_TOKEN"))

    def start(self) -> None:
        """Start it and wait until GET /healthz answers 200; ChildFailed (naming its log) when it does not."""
        if self.child is not None and self.child.process.poll() is None:
            raise RuntimeError(
                f"gradwatch up already runs at {self.url} (pid {self.child.process.pid}): stop() it first"
            )
        self.child = start_child(
            "gradwatch up",
            [*gradwatch_command(), "up", *self.args],
            self.port,
            self.log,
            timeout=self.start_timeout,
            probe=HEALTH_PATH,
            env=self.env,
        )

    def _started(self) -> Child:
        if self.child is None:
            raise RuntimeError(f"gradwatch up at {self.url} was never started: call start() first")
        return self.child

    def kill(self) -> None:
        """SIGKILL it: none of its own shutdown runs (its Prometheus and Alertmanager die with it)."""
        self._started().kill()

    def stop(self) -> None:
        """SIGTERM it, and SIGKILL it when it has not exited within the stop timeout; nothing when not running."""
        if self.child is not None:
            self.child.stop(self.stop_timeout)


__all__ = [
    "HEALTH_PATH",
    "READY_PATH",
    "Child",
    "ChildFailed",
    "ServiceProcess",
    "free_port",
    "gradwatch_command",
    "port_is_free",
    "start_child",
    "wait_for",
]
