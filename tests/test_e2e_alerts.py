"""End to end: `gradwatch up` with the real Prometheus and Alertmanager it starts, on real Ray.

`gradwatch up` runs both from PATH with the shipped configs rendered for itself: Prometheus
discovers the workers through the service's /v1/targets, evaluates the shipped rules and sends
alerts to Alertmanager, which delivers them to the service's webhook, where `gradwatch alerts`
and `submit --follow` show them. The same scraped data then runs every dashboard panel's query,
with the template variables of a real job. The last test stops `gradwatch up` and looks for
leftover Prometheus and Alertmanager processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

from dashboards.build import panel_queries, substitute
from tests.conftest import DIVERGED, EXAMPLES, REPO
from tests.promstack import ALERTMANAGER, PROMETHEUS, free_port, query, require, rules_evaluated_since, wait_for
from tests.stack import BIN, TOKEN, Service

pytestmark = [pytest.mark.ray, pytest.mark.prometheus, pytest.mark.timeout(1200)]

DIVERGENCE_ALERTS = {"TrainingLossNonFinite", "TrainingDiverging"}
ALERT_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def stack(ray_head, tmp_path_factory):
    require(PROMETHEUS)
    require(ALERTMANAGER)
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "gradwatch").mkdir(exist_ok=True)
    prom_port, am_port = free_port(), free_port()
    svc = Service(
        ray_head, tmp / "gradwatch", args=["--prometheus-port", str(prom_port), "--alertmanager-port", str(am_port)]
    )
    svc.start()  # healthy only after Prometheus and Alertmanager answer
    prom = SimpleNamespace(url=f"http://127.0.0.1:{prom_port}")
    printed = svc.log.read_text()
    assert f"Prometheus     {prom.url}" in printed and f"Alertmanager   http://127.0.0.1:{am_port}" in printed
    yield SimpleNamespace(svc=svc, client=svc.client, prom=prom, data_dir=tmp / "gradwatch", started=time.time())
    if svc.process and svc.process.poll() is None:
        for job in svc.client.jobs(state=["queued", "running"]):
            svc.client.cancel(job["id"])
        svc.stop()


def submit(stack, example: str, **overrides) -> dict:
    job = stack.client.submit({**yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text()), **overrides})
    return job


def alert_names(stack, job_id: str) -> set[str]:
    return {a["alertname"] for a in stack.client.alerts(job_id=job_id)}


def wait_for_alert(stack, job_id: str, names: set[str], timeout: float) -> set[str]:
    def arrived():
        state = stack.client.get(job_id)["state"]
        assert state in ("queued", "running"), f"{job_id} ended {state} before any of {names} arrived"
        return alert_names(stack, job_id) & names

    return wait_for(arrived, timeout=timeout, interval=1, what=f"{'/'.join(sorted(names))} for {job_id}")


@pytest.fixture(scope="module")
def healthy_run(stack) -> dict:
    """A healthy job run to its end, then its last scrapes evaluated by every rule."""
    # long enough on an idle machine for Prometheus to scrape it many times: the panel test reads it
    job = submit(stack, "digits-mlp", max_steps=2000)
    done = stack.client.wait(job["id"], timeout=400)
    wait_for(lambda: not stack.client.targets(), timeout=30, what="the finished job to leave /v1/targets")
    left = time.time()
    wait_for(lambda: rules_evaluated_since(stack.prom.url, left), timeout=60, what="a rule evaluation after the run")
    return done


def test_a_healthy_run_raises_no_alert(stack, healthy_run):
    assert healthy_run["state"] == "succeeded", healthy_run["reason"]
    assert healthy_run["step"] == 2000
    # nothing fired or was pending (ALERTS holds both) at any evaluation of its series
    fired = query(stack.prom.url, f'count_over_time(ALERTS{{job_id="{healthy_run["id"]}"}}[30m])')
    assert fired == [], fired
    assert alert_names(stack, healthy_run["id"]) == set()


def cli(stack, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "GRADWATCH_URL": stack.svc.url, "GRADWATCH_TOKEN": TOKEN, "COLUMNS": "200"}
    return subprocess.Popen(
        [str(BIN / "gradwatch"), *args], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )


def first_nonfinite(stack, job_id: str) -> dict | None:
    """The run's first non-finite step from its history (rank 0 records every one, with its time)."""
    path = stack.data_dir / "runs" / job_id / "history.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((r for r in records if r.get("nonfinite")), None)


@pytest.fixture(scope="module")
def followed_divergence(stack) -> SimpleNamespace:
    """The diverging example submitted with `gradwatch submit --follow` and followed to its end: its job id,
    when `gradwatch alerts` first listed TrainingLossNonFinite, and what --follow printed, with times. It
    fired a divergence alert, so the boards' alert panels read it too."""
    follow = cli(stack, "submit", str(EXAMPLES / "diverging.yaml"), "--follow")
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in follow.stdout:
            lines.append((time.time(), line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    job_id = wait_for(
        lambda: next((m[1] for _, line in lines if (m := re.match(r"submitted (gw-\w+)", line))), None),
        timeout=30,
        what="the submitted job id",
    )

    def alert_listed() -> float | None:
        out = subprocess.run(
            [str(BIN / "gradwatch"), "alerts", job_id, "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, "GRADWATCH_URL": stack.svc.url, "GRADWATCH_TOKEN": TOKEN},
        )
        assert out.returncode == 0, out.stdout + out.stderr
        if "TrainingLossNonFinite" in {a["alertname"] for a in json.loads(out.stdout)}:
            return time.time()
        first = first_nonfinite(stack, job_id)
        assert not first or time.time() - first["time"] < ALERT_WITHIN_S + 5, (
            f"no TrainingLossNonFinite {time.time() - first['time']:.0f} s after step {first['step']}"
        )
        return None

    listed_at = wait_for(alert_listed, timeout=300, interval=0.5, what=f"TrainingLossNonFinite for {job_id}")
    exit_code = follow.wait(timeout=300)
    reader.join(timeout=10)
    return SimpleNamespace(job_id=job_id, listed_at=listed_at, lines=lines, exit_code=exit_code)


def test_a_diverging_run_alerts_within_seconds_and_ends_failed(stack, followed_divergence):
    job_id, listed_at, lines = followed_divergence.job_id, followed_divergence.listed_at, followed_divergence.lines
    assert followed_divergence.exit_code == 1
    text = "\n".join(line for _, line in lines)
    first = first_nonfinite(stack, job_id)
    assert first, f"{job_id} never had a non-finite step:\n{text}"
    followed_at = next((t for t, line in lines if re.search(r"ALERT firing TrainingLossNonFinite", line)), None)
    assert followed_at, f"submit --follow never showed TrainingLossNonFinite:\n{text}"
    assert listed_at - first["time"] <= ALERT_WITHIN_S, (listed_at - first["time"], first)
    assert followed_at - first["time"] <= ALERT_WITHIN_S, (followed_at - first["time"], first)

    # Its updates were all skipped: the run ends failed, saying so, within max_skipped_steps steps.
    job = stack.client.get(job_id)
    limit = job["spec"]["max_skipped_steps"]
    assert job["state"] == "failed", job["reason"]
    reason = DIVERGED.fullmatch(job["reason"])
    assert reason and int(reason["steps"] or reason["of"]) == limit, job["reason"]
    assert int(reason["since"]) == first["step"] and int(reason["last"]) == first["step"] - 1
    assert job["step"] <= first["step"] + limit
    assert f"{job_id} failed: {job['reason']}" in text.replace("\n", " ")
    assert job["warning"] is None


def test_a_stalled_run_is_reported_as_stalled(stack):
    job = submit(stack, "stalled")
    wait_for_alert(stack, job["id"], {"TrainingStalled"}, timeout=400)
    alert = next(a for a in stack.client.alerts(job_id=job["id"]) if a["alertname"] == "TrainingStalled")
    assert alert["severity"] == "warning"
    assert not alert_names(stack, job["id"]) & DIVERGENCE_ALERTS
    stack.client.cancel(job["id"])
    ended = stack.client.wait(job["id"], timeout=60)
    assert ended["state"] == "cancelled"


# Panels that cannot return data for a healthy job, and why.
NO_DATA_FOR_A_HEALTHY_JOB = {
    ("gradwatch-run", "Alerts for this run"): "an alert list: a healthy run has no alert",
    ("gradwatch-run", "annotation: Alerts"): "alert annotations: a healthy run has no alert",
    # System series that exist only where they are known (workers/system.py); the healthy run is digits-mlp on CPU
    ("gradwatch-run", "Tokens/s per rank"): "an MLP on digits: its batches have no tokens",
    ("gradwatch-run", "MFU per rank"): "the spec gives no telemetry.flops_per_sample and peak_flops",
    ("gradwatch-run", "GPU utilisation per rank"): "CPU workers: no GPU (NVML)",
    ("gradwatch-run", "GPU memory per rank"): "CPU workers: no GPU (NVML)",
    ("gradwatch-run", "GPU temperature per rank"): "CPU workers: no GPU (NVML)",
    ("gradwatch-run", "GPU power per rank"): "CPU workers: no GPU (NVML)",
    ("gradwatch-ranks", "GPU utilisation per rank"): "CPU workers: no GPU (NVML)",
    ("gradwatch-ranks", "GPU memory per rank"): "CPU workers: no GPU (NVML)",
}


def test_every_dashboard_panel_returns_data(stack, healthy_run, followed_divergence):
    variables = {"job_id": healthy_run["id"], "team": "vision", "project": "demo", "state": ".*"}
    start, end = stack.started, time.time()
    problems, ran = [], 0
    for path in sorted((REPO / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for title, expr in panel_queries(board):
            promql = substitute(expr, variables)
            response = httpx.get(
                f"{stack.prom.url}/api/v1/query_range",
                params={"query": promql, "start": start, "end": end, "step": 2},
                timeout=30,
            )
            body = response.json()
            ran += 1
            if body.get("status") != "success":
                problems.append(f"{board['uid']} / {title}: error {body.get('error')} in {promql}")
            elif not body["data"]["result"] and (board["uid"], title) not in NO_DATA_FOR_A_HEALTHY_JOB:
                problems.append(f"{board['uid']} / {title}: no data for {promql}")
    assert ran >= 30
    assert not problems, "\n".join(problems)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            if state != "Z":
                found[int(stat.parent.name)] = (
                    int(ppid),
                    (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                )
        except (OSError, ValueError):
            continue
    return found


def test_up_stops_its_prometheus_and_alertmanager(stack):
    binaries = (PROMETHEUS, ALERTMANAGER)
    children = {
        pid: cmd
        for pid, (ppid, cmd) in processes().items()
        if ppid == stack.svc.process.pid and cmd.split(" ")[0] in binaries
    }
    assert sorted(cmd.split(" ")[0] for cmd in children.values()) == sorted(binaries), children
    assert all(str(stack.data_dir / "monitoring") in cmd for cmd in children.values())
    stack.svc.stop()
    assert stack.svc.process.returncode == 0

    def left() -> dict[int, str]:
        now = processes()
        return {pid: cmd for pid, cmd in children.items() if pid in now and now[pid][1] == cmd}

    wait_for(lambda: not left(), timeout=15, what="Prometheus and Alertmanager to exit")
