"""A real Prometheus and Alertmanager for tests, as plain context managers.

    with start_prometheus(render_prometheus_config(...), tmp_path) as prom:
        wait_for(lambda: query(prom.url, "up"), timeout=20)

Binaries come from Debian's packages. A missing one skips the test, except under CI=true where
it fails: CI must install them (apt-get install -y prometheus prometheus-alertmanager).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from service.stack.monitoring import MonitoringUnavailable, alertmanager_command, prometheus_command, start_child

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
PROMTOOL = "/usr/bin/promtool"
AMTOOL = "/usr/bin/amtool"
PACKAGES = {
    PROMETHEUS: "prometheus",
    PROMTOOL: "prometheus",
    ALERTMANAGER: "prometheus-alertmanager",
    AMTOOL: "prometheus-alertmanager",
}

T = TypeVar("T")


def require(binary: str) -> str:
    """The binary's path; otherwise skip the test, or fail it under CI=true."""
    found = shutil.which(binary) or shutil.which(Path(binary).name)
    if found:
        return found
    package = PACKAGES.get(binary, Path(binary).name)
    message = f"{binary} is not installed: apt-get install -y {package}"
    import pytest  # only reached from tests; the helpers themselves need no pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI=true: a missing binary fails instead of skipping)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn: Callable[[], T], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> T:
    """Call `fn` until it returns something truthy (returned) or `timeout` seconds pass."""
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


def query(url: str, promql: str) -> list[dict[str, Any]]:
    """Instant query against Prometheus at `url`: the `data.result` list."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    body = response.json()
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    return body["data"]["result"]


def rules_evaluated_since(url: str, since: float) -> bool:
    """Whether Prometheus at `url` has evaluated every rule group after `since` (unix seconds)."""
    response = httpx.get(f"{url}/api/v1/rules", timeout=10)
    response.raise_for_status()
    groups = response.json()["data"]["groups"]
    return bool(groups) and all(_unix(g.get("lastEvaluation", "")) > since for g in groups)


def _unix(rfc3339: str) -> float:
    """Prometheus's times (nanosecond fractions, Z) as unix seconds; 0 for the zero time."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", rfc3339)
    if not match or rfc3339.startswith("0001-"):
        return 0.0
    whole, fraction, zone = match.groups()
    at = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone)).timestamp()
    return at + (float(fraction) if fraction else 0.0)


@dataclass
class Running:
    """A started server: its base URL, process, working folder and log."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def reload(self) -> None:
        """Re-read the config file (both servers run with the lifecycle API on)."""
        httpx.post(f"{self.url}/-/reload", timeout=10).raise_for_status()


@contextmanager
def _serve(
    name: str,
    binary: str,
    config_text: str,
    tmpdir: Path | str,
    command: Callable[[str, Path, Path, int], list[str]],
    timeout: float,
) -> Iterator[Running]:
    """Start it the way `gradwatch up` does (service/stack/monitoring.py), in its own folder under `tmpdir`."""
    path = require(binary)
    workdir = Path(tmpdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yml"
    config.write_text(config_text)
    port = free_port()
    log = workdir / f"{name}.log"
    try:
        child = start_child(name, command(path, config, workdir / "data", port), port, log, workdir, timeout)
    except MonitoringUnavailable as exc:
        raise TimeoutError(str(exc)) from None
    try:
        yield Running(name, child.url, child.process, workdir, log)
    finally:
        child.stop()


def start_prometheus(config_text: str, tmpdir: Path | str, timeout: float = 30.0):
    """Prometheus on a free 127.0.0.1 port with its own TSDB under `tmpdir`; `.url` is its base URL."""
    return _serve("prometheus", PROMETHEUS, config_text, tmpdir, prometheus_command, timeout)


def start_alertmanager(config_text: str, tmpdir: Path | str, timeout: float = 30.0):
    """Alertmanager on a free 127.0.0.1 port, no cluster networking; `.url` is its base URL."""
    return _serve("alertmanager", ALERTMANAGER, config_text, tmpdir, alertmanager_command, timeout)
