"""Worker crashes and runs that go wrong, on real 2-worker DDP jobs on a real local Ray."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.spec import load_spec
from gradwatch.status import RunResult, RunStatus
from tests.conftest import EXAMPLES, small_spec
from tests.promstack import wait_for
from workers.driver import run_job

pytestmark = pytest.mark.ray


def test_a_killed_worker_resumes_from_its_checkpoint(local_ray, tmp_path):
    # rank 1 sleeps 10 ms a step, pacing the job at <= 100 steps/s on any machine, so the kill window is wide
    spec = load_spec(
        small_spec(
            model={"name": "tests.workers.user_code:build", "options": {"delay": 0.01}},
            max_steps=1200,
            max_failures=2,
            checkpoint={"every_steps": 500},
            telemetry={"interval": 5, "grace_seconds": 0},
            validation={"every_steps": 250},
        )
    )
    seen: list[RunStatus] = []
    outcome: dict[str, RunResult] = {}

    def run() -> None:
        outcome["result"] = run_job(spec, storage_path=tmp_path, listeners=[lambda status, _: seen.append(status)])

    thread = threading.Thread(target=run)
    thread.start()
    crossed: dict[int, float] = {}  # checkpoint step -> when the run was first seen past it

    def running_past_a_checkpoint():
        assert thread.is_alive(), "the job ended before the worker could be killed"
        status = seen[-1] if seen else None
        ends = {e.rank: e for e in status.endpoints} if status else {}
        step = (status.step if status else None) or 0
        if step >= 500:
            crossed.setdefault(step // 500 * 500, time.monotonic())
        # Ray Train's controller registers a checkpoint at its next health check (0.5 s): kill well after
        # one, well before the next
        settled = time.monotonic() - crossed.get(step // 500 * 500, time.monotonic()) > 1.5
        mid_interval = 0 < step % 500 <= 400 and step < 1100  # not at the final checkpoint either
        return (step, ends) if step >= 500 and settled and mid_interval and len(ends) == 2 else None

    killed_at, endpoints = wait_for(running_past_a_checkpoint, timeout=240, interval=0.1, what="a settled checkpoint")
    os.kill(endpoints[1].pid, signal.SIGKILL)  # rank 1's Ray Train worker process

    def resumed_endpoint():
        status = seen[-1]
        ends = {e.rank: e for e in status.endpoints}
        fresh = 1 in ends and ends[1].pid != endpoints[1].pid and ends[0].pid != endpoints[0].pid
        return ends if fresh and status.restarts == 1 else None

    ends = wait_for(resumed_endpoint, timeout=240, interval=0.2, what="the restarted worker group")
    metrics = text_string_to_metric_families(httpx.get(f"http://{ends[0].target}/metrics").text)
    restarts = {s.name: s.value for f in metrics for s in f.samples if s.name == "gradwatch_restarts_total"}
    assert restarts == {"gradwatch_restarts_total": 1.0}

    thread.join(timeout=300)
    assert not thread.is_alive(), "the job did not end"
    result = outcome["result"]
    assert result.state == "succeeded", result.error
    assert result.steps == 1200
    assert result.restarts == 1
    # the restarted group trained on (running) and then ended; all of it from one checkpoint
    after = [s for s in seen if s.restarts == 1]
    assert after[0].state == "running" and after[-1].state == "succeeded"
    assert any(s.state == "running" and (s.step or 0) > killed_at for s in after)
    resumed_at = {s.resumed_step for s in after}
    assert len(resumed_at) == 1, resumed_at
    # the run never went back further than one checkpoint interval
    resumed_step = resumed_at.pop()
    assert resumed_step is not None and killed_at - 500 <= resumed_step < killed_at, (killed_at, resumed_step)
    assert result.ranks[0].param_hash is not None and result.ranks[0].param_hash == result.ranks[1].param_hash


def diverging(mode: str):
    """The diverging example in `mode`, with a checkpoint every 50 steps, not 10 (each a Ray Train report)."""
    data = yaml.safe_load((EXAMPLES / "diverging.yaml").read_text())
    data["telemetry"]["grace_seconds"] = 0
    return load_spec({**data, "on_divergence": mode, "max_steps": 500, "checkpoint": {"every_steps": 50, "keep": 1}})


def test_rollback_brings_a_diverging_run_back(local_ray, tmp_path):
    result = run_job(diverging("rollback"), storage_path=tmp_path)
    assert result.state == "succeeded", result.error
    assert result.rollbacks >= 1
    assert result.steps == 500
    assert result.train_loss is not None and result.val_loss is not None  # a non-finite one comes back null
    assert result.first_val_loss is not None and result.val_loss < result.first_val_loss
    assert len(result.ranks) == 2
    for report in result.ranks:  # no update ever applied a non-finite gradient
        assert report.params_finite


def test_stop_ends_a_diverging_run_failed_naming_the_divergence(local_ray, tmp_path):
    result = run_job(diverging("stop"), storage_path=tmp_path)
    assert result.state == "failed"
    assert "diverged" in result.error and "on_divergence is stop" in result.error
