"""A real Prometheus and Alertmanager for tests, as plain context managers.

    with start_prometheus(render_prometheus_config(...), tmp_path) as prom:
        wait_for(lambda: query(prom.url, "up"), timeout=20)

Binaries come from Debian's packages. A missing one skips the test, except under CI=true where
it fails: CI must install them (apt-get install -y prometheus prometheus-alertmanager).
They are started by service/stack/supervisor.py, whose `free_port` and `wait_for` are re-exported here.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from service.stack.monitoring import alertmanager_command, prometheus_command, start_in_folder
from service.stack.supervisor import Child, free_port, wait_for

PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
PROMTOOL = "/usr/bin/promtool"
AMTOOL = "/usr/bin/amtool"
START_TIMEOUT_S = 30.0  # a test's Prometheus or Alertmanager answers /-/ready within this
PACKAGES = {
    PROMETHEUS: "prometheus",
    PROMTOOL: "prometheus",
    ALERTMANAGER: "prometheus-alertmanager",
    AMTOOL: "prometheus-alertmanager",
}


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
class Running(Child):
    """A started server (service/stack/supervisor.py's Child: `.url`, `.process`, `.log`, `.log_tail()`)
    and the folder it runs in."""

    workdir: Path = Path()

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
    """Start it the way `gradwatch up` does (service/stack/monitoring.py's command line, started by
    service/stack/supervisor.py), in its own folder under `tmpdir`; ChildFailed, naming its log, when it
    exits or is not ready within `timeout` seconds."""
    workdir = Path(tmpdir) / name
    child = start_in_folder(name, command, require(binary), config_text, workdir, timeout)
    running = Running(child.name, child.url, child.process, child.log, child.probe, workdir)
    try:
        yield running
    finally:
        running.stop()


def start_prometheus(config_text: str, tmpdir: Path | str, timeout: float = START_TIMEOUT_S):
    """Prometheus on a free 127.0.0.1 port with its own TSDB under `tmpdir`; `.url` is its base URL."""
    return _serve("prometheus", PROMETHEUS, config_text, tmpdir, prometheus_command, timeout)


def start_alertmanager(config_text: str, tmpdir: Path | str, timeout: float = START_TIMEOUT_S):
    """Alertmanager on a free 127.0.0.1 port, no cluster networking; `.url` is its base URL."""
    return _serve("alertmanager", ALERTMANAGER, config_text, tmpdir, alertmanager_command, timeout)


__all__ = [
    "Running",
    "free_port",
    "query",
    "require",
    "rules_evaluated_since",
    "start_alertmanager",
    "start_prometheus",
    "wait_for",
]
