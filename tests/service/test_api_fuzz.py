"""The published OpenAPI document tells the truth for every kind of token: `schemathesis run --checks all`
against one live service (uvicorn, real store, scheduler paused, no Ray to ask) once per scope (read,
read-all, submit, admin and a job driver's job:progress token) finds no failure of any kind: no 5xx, no
undocumented status code, content type or body, no schema-valid request refused and no invalid one
accepted, `Allow` listing every method of a path.

Per scope the hooks also hold the token to what it may do: a read or read-all token gets 403 from every
route that changes something, and the jobs and alerts are as before its run; a job's token opens no
route but its own job's pushes (its job id is the one in every path and push body). Settings
and their reasons: tests/service/schemathesis.toml; the hook checks: tests/service/schemathesis_hooks.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gradwatch.spec import load_spec
from service.settings import Settings
from service.store.store import Store
from tests.promstack import free_port, wait_for
from tests.service.fakes import spec

pytestmark = pytest.mark.timeout(600)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
TOKEN = "fuzz-token"  # the admin's
# Per scope: the phases, the test cases per operation and phase, and the fewest cases the run must
# generate (a run that tests almost nothing fails). Seeded, so a run is repeatable (change the seed to
# look elsewhere). The admin reaches every route's inner code: every phase. The job's token gets the
# coverage phase (each route's boundaries, its pushes on its own job among them); the others fuzz only,
# so all five take about as long as one admin run of every phase at 30 cases did.
RUNS = {
    "job:progress": ("coverage,fuzzing", 2, 500),
    "read": ("fuzzing", 2, 13),
    "read-all": ("fuzzing", 2, 13),
    "submit": ("fuzzing", 3, 13),
    "admin": ("examples,coverage,fuzzing,stateful", 12, 500),
}
SEED = 20261201


class Service:
    def __init__(self, url: str, log: Path, tokens: dict[str, str], job_id: str):
        self.url, self.log, self.tokens, self.job_id = url, log, tokens, job_id

    def snapshot(self) -> tuple[object, object]:
        """Every job and alert as the admin reads them."""
        admin = {"Authorization": f"Bearer {TOKEN}"}
        jobs = httpx.get(f"{self.url}/v1/jobs", params={"limit": 500}, headers=admin, timeout=30).json()
        alerts = httpx.get(f"{self.url}/v1/alerts", params={"limit": 1000}, headers=admin, timeout=30).json()
        return jobs, alerts


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("fuzz-service")) as running:
        yield running


@contextmanager
def serving(data: Path) -> Iterator[Service]:
    # The people's tokens and a running job of the submitter's with its driver's token, stored before
    # the service starts on the same store.
    store = Store(Settings(data_dir=data, token=TOKEN).database_url)
    tokens = {scope: store.users.add(f"fuzz-{scope.replace(':', '-')}", [scope]) for scope in ("read", "read-all")}
    tokens["submit"] = store.users.add("submitter", ["submit"])
    job = store.jobs.create(load_spec(json.dumps(spec("driven", steps=100))), owner="submitter")
    store.jobs.transition(job.id, "running", "placed by the test", expect={"queued"})
    tokens["job:progress"] = store.users.issue_token("submitter", ["job:progress"], job_id=job.id)
    tokens["admin"] = TOKEN
    store.engine.dispose()
    port = free_port()
    env = {
        **os.environ,
        "GRADWATCH_TOKEN": TOKEN,
        "GRADWATCH_DATA_DIR": str(data),
        "GRADWATCH_SCHEDULER_ENABLED": "false",
        # Ray is never there: a closed port, not whatever cluster this machine may run on Ray's default
        "GRADWATCH_RAY_ADDRESS": f"http://127.0.0.1:{free_port()}",
    }
    log = open(data / "service.log", "wb")
    process = subprocess.Popen(
        [str(BIN / "uvicorn"), "service.api.main:create_app", "--factory", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout=60, what="uvicorn")
        yield Service(url, data / "service.log", tokens, job.id)
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def schemathesis(service: Service, scope: str, workdir: Path, phases: str | None = None, n: int | None = None) -> str:
    """One `schemathesis run --checks all` with the token of `scope`; its report, asserted clean."""
    config = (HERE / "schemathesis.toml").read_text()
    if scope == "job:progress":
        # Every path names the job this token is for, so its pushes get past the token check.
        pin = {
            "path.job_id": service.job_id,
            "body.status.job_id": service.job_id,
            "body.result.job_id": service.job_id,
        }
        config = "parameters = { " + ", ".join(f'"{k}" = "{v}"' for k, v in pin.items()) + " }\n" + config
    (workdir / "schemathesis.toml").write_text(config)
    command = [
        str(BIN / "schemathesis"),
        "--config-file",
        str(workdir / "schemathesis.toml"),
        "run",
        f"{service.url}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {service.tokens[scope]}",
        "--max-examples",
        str(n or RUNS[scope][1]),
        "--phases",
        phases or RUNS[scope][0],
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
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks",
        "PYTHONPATH": str(REPO),
        "GRADWATCH_FUZZ_SCOPE": scope,
        "GRADWATCH_FUZZ_TOKEN": service.tokens[scope],
        "GRADWATCH_FUZZ_JOB": service.job_id,
    }
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=540)
    report = out.stdout + out.stderr
    (workdir / "report.txt").write_text(report)
    assert out.returncode == 0, report[-20_000:] + "\n--- service log ---\n" + service.log.read_text()[-3000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and counts[1] == counts[2] and int(counts[1]) >= RUNS[scope][2], report[-5000:]
    return report


# The job's token first: the admin's run may cancel its job, which voids that token.
@pytest.mark.parametrize("scope", ["job:progress", "read", "read-all", "submit", "admin"])
def test_schemathesis_finds_no_failure(service, tmp_path, scope):
    before = service.snapshot()
    schemathesis(service, scope, tmp_path)
    if scope in ("read", "read-all"):
        assert service.snapshot() == before, f"a {scope} token changed the service's jobs or alerts"
