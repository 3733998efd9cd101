"""The published OpenAPI document tells the truth: `schemathesis run --checks all` against a live service
(uvicorn, real store, scheduler paused) finds no failure of any kind: no 5xx, no undocumented status
code, content type or body, no schema-valid request refused and no invalid one accepted, `Allow` listing
every method of a path. Settings and their reasons: tests/service/schemathesis.toml; the check that
narrows its one allowance: tests/service/schemathesis_hooks.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.promstack import free_port, wait_for

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
TOKEN = "fuzz-token"
# Test cases per operation and phase; seeded, so a run is repeatable (change the seed to look elsewhere).
MAX_EXAMPLES = 30
SEED = 20261201


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz-service")
    port = free_port()
    env = {
        **os.environ,
        "GRADWATCH_TOKEN": TOKEN,
        "GRADWATCH_DATA_DIR": str(data),
        "GRADWATCH_SCHEDULER_ENABLED": "false",
    }
    log = open(data / "service.log", "wb")
    process = subprocess.Popen(
        [str(BIN / "uvicorn"), "service.main:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=60, what="uvicorn")
        yield url, data / "service.log"
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def test_schemathesis_finds_no_failure(service, tmp_path):
    url, service_log = service
    command = [
        str(BIN / "schemathesis"),
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "120",  # a loaded CI machine; a slow answer is not what this test is about
        "--no-color",
        "--output-truncate",
        "true",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks", "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-20_000:] + "\n--- service log ---\n" + service_log.read_text()[-5000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and counts[1] == counts[2] and int(counts[1]) > 500, report[-5000:]
