"""How long a hung rank takes to be reported, and what watching for one costs per step.

Detection: starts a Ray head of its own on free ports and `gradwatch up` with its own Prometheus and
Alertmanager (as a user runs them), then runs a real 2-worker DDP job whose rank 1 blocks forever in the
data loading of step BLOCK_AT (`train_func` below, the spec's train.entrypoint), once with
`telemetry.hang_after` at its default and once at its minimum. For each it times, from the moment
rank 1 blocked (it writes the time just before):

- the `hang` event: the driver's hang watch naming the rank, its node, the step and its stack;
- the `TrainingHang` alert: Prometheus' rule over the heartbeat series, through Alertmanager, as the
  service received it;

against the anchor: without gradwatch nothing reports the hang until gloo/NCCL raise at the process
group's timeout, which gradwatch sets to `process_group_timeout(hang_after)` (Ray Train's own default
when nobody sets it is TorchConfig.timeout_s, 1800 s).

Cost: then runs bench/telemetry_overhead.py's parts path (the default telemetry with and without the
heartbeat and the system sampler, side by side in one run) unless --no-cost.

Each part writes its section of bench/RESULTS.md. The detection's last line is
`hang_event_seconds_default=S1 hang_alert_seconds_default=S2 hang_event_seconds_min=S3
hang_alert_seconds_min=S4`.

    python bench/hang_detection.py              # both, about 4 minutes on 2 cores
    python bench/hang_detection.py --no-cost    # the detection alone
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not on the path
    sys.path.insert(0, str(REPO))

TOKEN = "bench-hang-token"
BLOCK_AT = 100  # the step whose data loading never ends on rank 1
STEP_DELAY_S = 0.01  # seconds per step: the block comes a few seconds after the start on any machine


# ------------------------------------------------------------------ the job's training function
def train_func(config: dict) -> None:
    """Each rank's training (the spec's train.entrypoint): rank 1 blocks forever at step `block_at`."""
    import threading

    import ray.train.torch
    import torch

    import gradwatch

    run = gradwatch.start()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 1))
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    if run.max_steps is None:
        raise ValueError("the hang bench's job needs max_steps in its spec")
    while run.step < run.max_steps:
        if run.rank == 1 and run.step + 1 == config["block_at"]:
            if run.run_dir is not None:  # when it blocked, for the bench to time the detection from
                (run.run_dir / "blocked.json").write_text(json.dumps({"time": time.time()}))
            threading.Event().wait()  # a data loader that never returns
        time.sleep(config["step_delay"])
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))
        optimizer.step()


# ------------------------------------------------------------------ a local stack of its own
def _head_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@contextmanager
def gradwatch_up(ray_address: str, data_dir: Path) -> Iterator[Any]:
    """`gradwatch up` with its own Prometheus and Alertmanager on free ports; its client."""
    from service.stack.supervisor import ServiceProcess

    env = {**os.environ, "RAY_ADDRESS": ray_address, "GRADWATCH_ALLOW_USER_CODE": "true"}  # the job's code: here
    service = ServiceProcess(data_dir, ["--prometheus-port", "0", "--alertmanager-port", "0"], env=env, token=TOKEN)
    service.start()
    try:
        yield service.client
    finally:
        service.stop()  # Prometheus and Alertmanager stop with it


# ------------------------------------------------------------------ one measurement
def measure(client: Any, data_dir: Path, hang_after: float | None, timeout: float) -> dict[str, float]:
    """Submit the blocking job with this hang_after (None: the spec's default); seconds from the block to the
    hang event and to TrainingHang, and the job's threshold."""
    from gradwatch.spec import JobSpec
    from service.stack.supervisor import wait_for

    telemetry: dict[str, Any] = {"grace_seconds": 2}
    if hang_after is not None:
        telemetry["hang_after"] = hang_after
    spec = {
        "name": f"bench-hang-{'default' if hang_after is None else int(hang_after)}",
        "train": {
            "entrypoint": "bench.hang_detection:train_func",
            "config": {"block_at": BLOCK_AT, "step_delay": STEP_DELAY_S},
        },
        "max_steps": BLOCK_AT + 50,
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "telemetry": telemetry,
        "on_hang": "alert",  # the job stays hung: the alert has the time it needs, then it is cancelled
        "timeout": "15m",
    }
    threshold = JobSpec.model_validate(spec, context={"user_code": "skip"}).telemetry.hang_after
    job = client.submit(spec)
    blocked_file = data_dir / "runs" / job["id"] / "blocked.json"

    def blocked() -> float | None:
        state = client.get(job["id"])["state"]
        if state not in ("queued", "running"):
            raise RuntimeError(f"job {job['id']} ended {state} before rank 1 blocked: {client.get(job['id'])}")
        return json.loads(blocked_file.read_text())["time"] if blocked_file.exists() else None

    block = wait_for(blocked, timeout=timeout, interval=0.5, what=f"rank 1 of {job['id']} to block")

    def event_time() -> float | None:
        events = [e for e in client.get(job["id"]).get("events", []) if e.get("name") == "hang"]
        return events[0]["time"] if events else None

    def alert_time() -> float | None:
        for alert in client.alerts(job_id=job["id"]):
            if alert["alertname"] == "TrainingHang":
                return datetime.fromisoformat(alert["received_at"]).timestamp()
        return None

    event = wait_for(event_time, timeout=threshold + timeout, what=f"the hang event of {job['id']}")
    alert = wait_for(alert_time, timeout=threshold + timeout, what=f"TrainingHang for {job['id']}")
    client.cancel(job["id"])
    client.wait(job["id"], timeout=120)
    return {"hang_after": threshold, "event": event - block, "alert": alert - block}


def detection(cpus: int, timeout: float) -> dict[str, dict[str, float]]:
    from gradwatch.spec_telemetry import TelemetrySpec
    from service.scheduler.local_ray import private_ray_head

    minimum = TelemetrySpec.model_fields["hang_after"].metadata[0].ge
    results = {}
    head = private_ray_head(cpus, env=_head_env(), prefix="gwbench-")
    with tempfile.TemporaryDirectory(prefix="gw-hang-bench-") as tmp_name, head as address:
        data_dir = Path(tmp_name) / "gradwatch"
        data_dir.mkdir()
        with gradwatch_up(address, data_dir) as client:
            for name, hang_after in (("default", None), ("min", float(minimum))):
                results[name] = measure(client, data_dir, hang_after, timeout)
                r = results[name]
                print(
                    f"hang_after {r['hang_after']:g} s: hang event {r['event']:.1f} s, TrainingHang {r['alert']:.1f} s "
                    "after the block",
                    flush=True,
                )
    return results


def report(results: dict[str, dict[str, float]]) -> tuple[str, str]:
    from workers.heartbeat import HEARTBEAT_SECONDS, process_group_timeout

    rows = [
        "| hang_after | hang event | TrainingHang alert | anchor: process group timeout | anchor / alert |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        anchor = process_group_timeout(r["hang_after"])
        rows.append(
            f"| {r['hang_after']:g} s ({name}) | {r['event']:.1f} s | {r['alert']:.1f} s | {anchor:g} s "
            f"| {anchor / r['alert']:.1f}x |"
        )
    line = " ".join(
        f"hang_{kind}_seconds_{name}={r[kind]:.1f}" for name, r in results.items() for kind in ("event", "alert")
    )
    return (
        f"A real 2-worker DDP job (gloo, CPU) under `gradwatch up` and its own Prometheus and Alertmanager "
        f"(1 s scrape and rule evaluation); rank 1 blocks forever in the data loading of step {BLOCK_AT}. Seconds "
        "from the block to the driver's `hang` event (rank, node, step, stack) and to the TrainingHang alert as "
        f"the service received it. Heartbeats are posted every {HEARTBEAT_SECONDS:g} s. The anchor is when gloo/"
        "NCCL would raise without gradwatch: the process group's timeout gradwatch sets (configured, not "
        "measured here; Ray Train's default TorchConfig.timeout_s is 1800 s).\n\n" + "\n".join(rows) + f"\n\n`{line}`"
    ), line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-cost", action="store_true", help="measure the detection alone")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the Ray head (1 per worker)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each wait may take before failing")
    parser.add_argument("--cost-steps", type=int, default=1000, help="measured steps per config of the cost part")
    args = parser.parse_args(argv)
    if args.cpus < 2:
        parser.error("--cpus must be at least 2: the job has 2 workers of 1 CPU each")
    from bench.results import write_section

    started = time.time()
    results = detection(args.cpus, args.timeout)
    body, line = report(results)
    print(body)
    write_section("hang-detection", "How long a hung rank takes to be reported", body)
    print(f"detection measured in {time.time() - started:.0f} s")
    if not args.no_cost:
        from bench import telemetry_overhead

        telemetry_overhead.main(["--path", "parts", "--steps", str(args.cost_steps)])
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
