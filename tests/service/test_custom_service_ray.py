"""The custom-loop example as a real 2-worker job through the service: metrics contract, a NaN skipped
on both ranks, and a SIGKILLed worker that resumes from the training function's own checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.contract import PER_RANK, RANK0_ONLY, samples, value
from tests.promstack import wait_for
from tests.stack import TOKEN, Service, checkout_on_path
from tests.workers.test_rank_output import MARKER, print_spec
from workers.metrics import series_per_job

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

MAX_STEPS, EVERY = 1100, 500


@pytest.fixture(scope="module")
def service(ray_head, tmp_path_factory):
    svc = Service(ray_head, tmp_path_factory.mktemp("gradwatch-custom"))
    svc.env["GRADWATCH_ALLOW_USER_CODE"] = "true"
    svc.start()
    yield svc
    for job in svc.client.jobs(state=["queued", "running"]):
        svc.client.cancel(job["id"])
    svc.stop()


def custom_spec() -> dict:
    spec = yaml.safe_load((EXAMPLES / "custom" / "autoencoder.yaml").read_text())
    # rank 1 sleeps 10 ms a step, so the run is paced on any machine; rank 1's loss is NaN at step 7
    spec["train"]["config"].update(nan_at_step=7, rank1_step_delay=0.01)
    spec.update(
        max_steps=MAX_STEPS,
        max_failures=1,
        checkpoint={"every_steps": EVERY, "keep": 1},
        validation={"every_steps": 100},
        telemetry={"interval": 5, "grace_seconds": 2},
    )
    return spec


def test_the_custom_example_runs_through_the_service_with_the_contract_guards_and_resume(service):
    client = service.client
    job_id = client.submit(custom_spec())["id"]

    def running_past_validation():
        job = client.get(job_id)
        assert job["state"] in ("queued", "running"), job
        return job if len(job["endpoints"]) == 2 and (job["step"] or 0) >= 150 else None

    job = wait_for(running_past_validation, timeout=300, interval=0.5, what="the custom job at step 150")
    texts = {
        str(e["rank"]): httpx.get(f"http://{e['host']}:{e['port']}/metrics", timeout=5).text for e in job["endpoints"]
    }
    fams = {rank: samples(text) for rank, text in texts.items()}
    for rank in ("0", "1"):
        for name in PER_RANK:
            assert fams[rank].get(name) and all(
                s.labels["job_id"] == job_id and s.labels["rank"] == rank for s in fams[rank][name]
            ), (rank, name)
        terms = {s.labels["term"] for s in fams[rank]["gradwatch_loss_term"]}
        assert terms == {"reconstruction", "regularisation"}
        # the NaN on rank 1 at step 7 was skipped by both ranks
        assert value(fams[rank], "gradwatch_skipped_steps", "gradwatch_skipped_steps_total") == 1
    assert value(fams["1"], "gradwatch_nonfinite", "gradwatch_nonfinite_total", kind="loss") == 1
    assert value(fams["0"], "gradwatch_nonfinite", "gradwatch_nonfinite_total", kind="loss") == 0
    for name in RANK0_ONLY:
        if name == "gradwatch_gradient_noise_scale" and not fams["0"].get(name):
            continue  # needs two measured steps: checked below once later
        assert fams["0"].get(name) and not fams["1"].get(name), name
    layers = {s.labels["layer"] for s in fams["0"]["gradwatch_layer_grad_norm"]}
    assert layers == {"encoder.0", "encoder.2", "decoder.0", "decoder.2"}
    assert value(fams["0"], "gradwatch_gradient_noise_scale") > 0
    # bounded: the documented count, less the accuracy series (none here), plus two named losses per rank
    total = sum(len(s) for f in fams.values() for s in f.values())
    assert total == series_per_job(world_size=2, layers=4) - 2 + 2 * 2

    crossed: dict[int, float] = {}

    def settled_past_a_checkpoint():
        job = client.get(job_id)
        step = job["step"] or 0
        if step >= EVERY:
            crossed.setdefault(step // EVERY * EVERY, time.monotonic())
        settled = time.monotonic() - crossed.get(step // EVERY * EVERY, time.monotonic()) > 1.5
        mid = 0 < step % EVERY <= EVERY - 100 and step < MAX_STEPS - 100
        return job if step >= EVERY and settled and mid and len(job["endpoints"]) == 2 else None

    job = wait_for(settled_past_a_checkpoint, timeout=300, interval=0.1, what="a settled checkpoint")
    run_dir = Path(service.env["GRADWATCH_DATA_DIR"]) / "runs" / job_id
    live = json.loads((run_dir / "status.json").read_text())  # the driver's status names each rank's process
    killed_at, pids = job["step"], {e["rank"]: e["pid"] for e in live["endpoints"]}
    os.kill(pids[1], signal.SIGKILL)  # rank 1's Ray Train worker

    done = wait_for(
        lambda: (j := client.get(job_id))["state"] not in ("queued", "running") and j,
        timeout=400,
        interval=0.5,
        what="the job to end",
    )
    assert done["state"] == "succeeded", done["reason"]
    assert done["step"] == MAX_STEPS and done["restarts"] == 1
    status = json.loads((run_dir / "status.json").read_text())
    assert killed_at - EVERY <= status["resumed_step"] < killed_at, (killed_at, status["resumed_step"])
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == MAX_STEPS and result["restarts"] == 1
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["param_hash"] == ranks[1]["param_hash"] and all(r["params_finite"] for r in ranks)
    assert [r["skipped_steps"] for r in ranks] == [1, 1]  # the skip survived the restart
    assert result["val_loss"] < result["first_val_loss"]


def test_gradwatch_logs_shows_and_follows_each_rank_s_prints(service):
    """What the training function prints on each rank reaches `gradwatch logs` as `[rank N] line`, while
    the job runs (`--follow`, started at once) and from the saved log once it ended; Ray's own noise not."""
    client = service.client
    job_id = client.submit(print_spec())["id"]
    env = {**os.environ, "GRADWATCH_URL": service.url, "GRADWATCH_TOKEN": TOKEN, "PYTHONPATH": checkout_on_path()}
    logs = [sys.executable, "-m", "service.cli.main", "logs", job_id]
    follow = subprocess.run([*logs, "--follow"], env=env, capture_output=True, text=True, timeout=240)
    assert follow.returncode == 0, follow.stderr[-3000:]
    job = client.get(job_id)
    assert job["state"] == "succeeded", job
    saved = subprocess.run(logs, env=env, capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0, saved.stderr[-3000:]
    for output in (follow.stdout, saved.stdout):
        lines = output.splitlines()
        for rank in (0, 1):
            for line in (MARKER, f"{MARKER} (stderr)", f"{MARKER} done at step 3"):
                assert f"[rank {rank}] {line}" in lines, output[-3000:]
        for noise in ("PlacementGroupCleaner", "RayTrainWorker pid=", "gradwatch-output-"):
            assert noise not in output, output[-3000:]
