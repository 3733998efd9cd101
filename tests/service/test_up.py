"""`gradwatch up` beside a Ray head that is already running: reused with its token, named without it.

Both tests point `gradwatch up` at the session's Ray head (tests/conftest.py) by its dashboard port,
without RAY_ADDRESS, as a second `gradwatch up` on the same machine would find it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.promstack import free_port, wait_for
from tests.stack import BIN

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def up(ray_head: str, data_dir: Path, *args: str, **env: str) -> tuple[list[str], dict[str, str]]:
    command = [
        str(BIN / "gradwatch"),
        "up",
        "--data-dir",
        str(data_dir),
        "--port",
        str(free_port()),
        "--ray-dashboard-port",
        str(urlsplit(ray_head).port),
        *args,
    ]
    environ = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "GRADWATCH_RAY_ADDRESS")}
    return command, {**environ, "RAY_USAGE_STATS_ENABLED": "0", **env}


def test_a_ray_head_with_another_token_is_named_with_both_ways_out(ray_head, tmp_path):
    command, env = up(ray_head, tmp_path, "--no-monitoring", RAY_AUTH_TOKEN="not-this-clusters-token")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    message = " ".join(done.stderr.split())
    assert f"a Ray cluster already runs at {ray_head} and refused the token in RAY_AUTH_TOKEN" in message
    assert "Forbidden: Invalid authentication token" in message
    assert "reuse it: RAY_AUTH_TOKEN=<its token> gradwatch up" in message  # way out 1
    assert "or stop it: `ray stop`" in message  # way out 2
    assert not (tmp_path / "ray.log").exists()  # no `ray start` was tried
    assert "gradwatch API" not in done.stdout


def test_a_ray_head_that_takes_our_token_is_reused(ray_head, tmp_path):
    # Without Prometheus and Alertmanager on PATH, up says how to install them and runs without alerts.
    command, env = up(ray_head, tmp_path, PATH=str(BIN))
    port = command[command.index("--port") + 1]
    with open(tmp_path / "up.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
            timeout=60,
            what="gradwatch up",
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    printed = " ".join((tmp_path / "up.log").read_text().split())
    assert f"using the Ray cluster already running at {ray_head}" in printed
    assert f"Ray dashboard {ray_head}" in printed
    assert "no alerts: prometheus and prometheus-alertmanager not found on PATH" in printed
    assert "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager" in printed
    assert "gradwatch up --no-monitoring" in printed
    assert "Prometheus http" not in printed
    assert not (tmp_path / "ray.log").exists()
