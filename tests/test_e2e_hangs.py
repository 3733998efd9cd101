"""End to end: a rank that blocks forever, seen by `gradwatch up` (its own Prometheus and Alertmanager) on real Ray.

A real 2-worker DDP job (tests/hang_entrypoint.py, the spec's train.entrypoint) whose rank 1 blocks in its
data loading at step 200 on its first attempt: the driver's hang watch raises a `hang` event naming rank 1,
its node and the step, with its Python stack, and Prometheus' TrainingHang reaches the service through
Alertmanager; `on_hang` then restarts the job from its checkpoint (it succeeds) or fails it. One stack
serves every case, and the three jobs (on_hang alert, restart, fail) run side by side on it: each worker
asks for 0.3 CPU, so all six fit the shared 2-CPU head at once.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from tests.promstack import ALERTMANAGER, PROMETHEUS, free_port, require, wait_for
from tests.stack import Service

pytestmark = [pytest.mark.ray, pytest.mark.prometheus, pytest.mark.timeout(900)]

BLOCK_AT = 200
HANG_AFTER = 10.0  # the spec's minimum (telemetry.hang_after)
SEEN_WITHIN_S = 90.0
ON_HANG = ("alert", "restart", "fail")


@pytest.fixture(scope="module")
def stack(ray_head, tmp_path_factory):
    require(PROMETHEUS)
    require(ALERTMANAGER)
    data_dir = tmp_path_factory.mktemp("hangs") / "gradwatch"
    data_dir.mkdir()
    svc = Service(
        ray_head, data_dir, args=["--prometheus-port", str(free_port()), "--alertmanager-port", str(free_port())]
    )
    svc.env["GRADWATCH_ALLOW_USER_CODE"] = "true"  # the job's train.entrypoint is user code
    svc.start()
    yield SimpleNamespace(svc=svc, client=svc.client, data_dir=data_dir)
    if svc.process and svc.process.poll() is None:
        for job in svc.client.jobs(state=["queued", "running"]):
            svc.client.cancel(job["id"])
        svc.stop()


def submit(stack, on_hang: str) -> dict:
    return stack.client.submit(
        {
            "name": f"hang-{on_hang}",
            "train": {
                "entrypoint": "tests.hang_entrypoint:train_func",
                "config": {"block_at": BLOCK_AT, "every": 50, "step_delay": 0.01},
            },
            "max_steps": 300,
            "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.3},
            "telemetry": {"hang_after": HANG_AFTER, "grace_seconds": 2},
            "on_hang": on_hang,
            "timeout": "10m",
        }
    )


@pytest.fixture(scope="module")
def jobs(stack) -> dict[str, dict]:
    """One job per on_hang action, submitted together so they hang (and are judged) side by side."""
    return {on_hang: submit(stack, on_hang) for on_hang in ON_HANG}


def blocked_at(stack, job_id: str) -> float:
    """When rank 1 blocked (the entrypoint writes it just before), once it did."""
    path = stack.data_dir / "runs" / job_id / "blocked.json"

    def blocked() -> float | None:
        if path.exists():  # written once, on the first attempt: the job may have moved on since
            return json.loads(path.read_text())["time"]
        state = stack.client.get(job_id)["state"]
        assert state in ("queued", "running"), f"{job_id} ended {state} before rank 1 blocked"
        return None

    block = wait_for(blocked, timeout=300, interval=0.5, what=f"rank 1 of {job_id} to block")
    assert json.loads(path.read_text())["step"] == BLOCK_AT
    return block


def hang_events(job: dict) -> list[dict]:
    return [e for e in job.get("events", []) if e.get("name") == "hang"]


def check_hang_event(event: dict, on_hang: str) -> None:
    assert event["kind"] == "anomaly" and event["rank"] == 1 and event["step"] == BLOCK_AT, event
    assert event["phase"] == "data" and event["on_hang"] == on_hang, event
    assert event["detail"].startswith(f"rank 1 on node {event['node']} stuck in data loading of step {BLOCK_AT} for ")
    assert event["detail"].endswith(f"; rank 0 waits in the gradient all-reduce of step {BLOCK_AT}"), event["detail"]
    # the stuck rank's Python stack, down to the line that blocks
    assert "train_func (tests/hang_entrypoint.py:" in event["stack"], event["stack"]
    assert "Event.wait" in event["stack"], event["stack"]


def rank_1_hang_alerts(stack, job_id: str) -> list[dict]:
    """The job's TrainingHang alerts that name rank 1. On a loaded machine a TrainingHang naming rank 0
    (in the all-reduce) has once come first: the rule's "every rank waits in the collective" branch names
    rank 0 whenever Prometheus holds no stuck series of rank 1, and why it held none then is not known."""
    return [
        a
        for a in stack.client.alerts(job_id=job_id)
        if a["alertname"] == "TrainingHang" and a["labels"].get("rank") == "1"
    ]


def test_a_hung_rank_raises_a_hang_event_and_training_hang_naming_it(stack, jobs):
    job = jobs["alert"]
    block = blocked_at(stack, job["id"])
    seen: dict[str, float] = {}

    def both_seen() -> bool:
        detail = stack.client.get(job["id"])
        assert detail["state"] == "running", detail["reason"]
        if hang_events(detail):
            seen.setdefault("event", time.time())
        if rank_1_hang_alerts(stack, job["id"]):
            seen.setdefault("alert", time.time())
        return len(seen) == 2

    wait_for(
        both_seen, timeout=SEEN_WITHIN_S + 30, interval=0.5, what=f"the hang event and TrainingHang of {job['id']}"
    )
    assert seen["event"] - block <= SEEN_WITHIN_S and seen["alert"] - block <= SEEN_WITHIN_S, (seen, block)
    detail = stack.client.get(job["id"])
    events = hang_events(detail)
    assert len(events) == 1, events  # reported once
    check_hang_event(events[0], "alert")
    assert events[0]["stuck_seconds"] >= HANG_AFTER
    alert = rank_1_hang_alerts(stack, job["id"])[0]
    assert alert["severity"] == "critical" and alert["labels"]["step_phase"] == "data", alert
    assert alert["summary"] == f"Rank 1 of job {job['id']} is stuck in its data phase"
    # the stack is in the job's logs and its run directory too
    logs = "\n".join(stack.client.logs(job["id"]))
    assert f"HANG rank 1 on node {events[0]['node']} stuck in data loading of step {BLOCK_AT}" in logs
    assert "stack of rank 1:" in logs
    kept = stack.data_dir / "runs" / job["id"] / f"hang-step{BLOCK_AT}-rank1.txt"
    assert "train_func (tests/hang_entrypoint.py:" in kept.read_text()
    # on_hang: alert leaves the job hung (the process group's timeout is far off): it is cancelled here
    stack.client.cancel(job["id"])
    assert stack.client.wait(job["id"], timeout=120)["state"] == "cancelled"


def test_on_hang_restart_resumes_from_its_checkpoint_and_succeeds(stack, jobs):
    job = jobs["restart"]
    blocked_at(stack, job["id"])
    done = stack.client.wait(job["id"], timeout=400)
    assert done["state"] == "succeeded", done["reason"]
    assert done["step"] == 300 and done["restarts"] == 1, (done["step"], done["restarts"])
    events = hang_events(done)
    assert len(events) == 1, events
    check_hang_event(events[0], "restart")


def test_on_hang_fail_ends_failed_with_the_reason(stack, jobs):
    job = jobs["fail"]
    block = blocked_at(stack, job["id"])
    done = stack.client.wait(job["id"], timeout=300)
    assert done["state"] == "failed", done["reason"]
    assert done["reason"].startswith("hung: rank 1 on node "), done["reason"]
    assert f"stuck in data loading of step {BLOCK_AT}" in done["reason"] and done["reason"].endswith("(on_hang: fail)")
    events = hang_events(done)
    assert len(events) == 1, events
    check_hang_event(events[0], "fail")
    assert events[0]["time"] - block <= SEEN_WITHIN_S
