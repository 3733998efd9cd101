"""Time from the onset of a problem in a real job to its alert reaching the service.

Starts a local stack on 127.0.0.1 (a Ray head, `gradwatch up`, Debian's Prometheus and
Alertmanager with the shipped configs at 1 s scrape and evaluation intervals), then runs:

- examples/diverging.yaml: onset is the wall time of the first non-finite step, read from the
  run's history.jsonl (every non-finite step is recorded there); the alert is TrainingLossNonFinite.
- examples/stalled.yaml: its learning rate is 1e-7, so the loss is flat from the first step;
  onset is that step's time, and the alert is TrainingStalled (the detectors' judgement,
  `lr_too_low` after 3 measurements or `plateau` from step 250, and the rule's `for: 30s` are
  part of what is measured).

Arrival is the service's `received_at` of the alert. The last line is exactly
`nonfinite_to_alert_seconds=S1 stall_to_alert_seconds=S2`; the table is written to the
`alert-latency` section of bench/RESULTS.md (`--no-write` leaves it as it is).

    python bench/alert_latency.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from deploy.render import render_alertmanager_config, render_prometheus_config  # noqa: E402
from service.scheduler.local_ray import private_ray_head  # noqa: E402
from service.stack.monitoring import (  # noqa: E402
    alertmanager_command,
    find_binaries,
    prometheus_command,
    start_in_folder,
)
from service.stack.supervisor import Child, ServiceProcess, wait_for  # noqa: E402

SCRAPE = EVAL = "1s"
GOAL_NONFINITE_S = 10.0
TOKEN = "bench-alert-token"
POLL_INTERVAL = "0.5"  # GRADWATCH_POLL_INTERVAL of the bench's service


def history(data_dir: Path, job_id: str) -> list[dict]:
    path = next(data_dir.rglob(f"{job_id}/history.jsonl"), None)
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alert_time(client, job_id: str, name: str, timeout: float) -> float:
    def arrived():
        for alert in client.alerts(job_id=job_id):
            if alert["alertname"] == name:
                return datetime.fromisoformat(alert["received_at"]).timestamp()
        return None

    return wait_for(arrived, timeout=timeout, interval=0.2, what=f"{name} for {job_id}")


def run(client, data_dir: Path, example: str, alert: str, onset_of) -> float:
    spec = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    job = client.submit(spec)
    arrived = alert_time(client, job["id"], alert, timeout=600)
    onset = onset_of(history(data_dir, job["id"]))
    client.cancel(job["id"])
    latency = arrived - onset
    RUNS.append((example, alert, onset, arrived))
    print(
        f"{example:10s} {alert:22s} onset {datetime.fromtimestamp(onset):%H:%M:%S.%f} "
        f"alert received {datetime.fromtimestamp(arrived):%H:%M:%S.%f} -> {latency:.2f} s",
        flush=True,
    )
    return latency


RUNS: list[tuple[str, str, float, float]] = []  # (example, alert, onset, arrival) of each run


def section(line: str) -> str:
    """The markdown of this run for bench/RESULTS.md: one row per alert, against its goal."""
    goals = {
        "TrainingLossNonFinite": lambda s: f"<= {GOAL_NONFINITE_S:g} s: {'met' if s <= GOAL_NONFINITE_S else 'missed'}",
        "TrainingStalled": lambda s: "none set (the rule's `for: 30s` and the detectors' judgement are in it)",
    }
    rows = "\n".join(
        f"| `examples/{example}.yaml` | {alert} | {datetime.fromtimestamp(onset):%H:%M:%S.%f} "
        f"| {datetime.fromtimestamp(arrived):%H:%M:%S.%f} | {arrived - onset:.2f} | {goals[alert](arrived - onset)} |"
        for example, alert, onset, arrived in RUNS
    )
    return (
        "A local stack on 127.0.0.1: a Ray head (2 CPUs), `gradwatch up`, Prometheus and Alertmanager with the "
        f"shipped configs at {SCRAPE} scrape and {EVAL} rule evaluation, Alertmanager group_wait 1s. Onset: the "
        "diverging job's first non-finite step, and the stalled job's (lr 1e-7) first step, both from the run's "
        "history.jsonl; arrival: the service's `received_at` of the alert. One run of each.\n\n"
        "| job | alert | onset | received | seconds | goal |\n| --- | --- | --- | --- | --- | --- |\n"
        f"{rows}\n\n`{line}`"
    )


def first_nonfinite(records: list[dict]) -> float:
    return min(r["time"] for r in records if r.get("nonfinite"))


def first_step(records: list[dict]) -> float:
    return min(r["time"] for r in records if r.get("step") == 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing bench/RESULTS.md")
    args = parser.parse_args(argv)
    print(f"scrape interval {SCRAPE}, rule evaluation interval {EVAL}, Alertmanager group_wait 1s", flush=True)
    prometheus_bin, alertmanager_bin = find_binaries()
    head = private_ray_head(2, env={**os.environ, "PYTHONPATH": str(REPO)}, prefix="gwbench-")
    with tempfile.TemporaryDirectory(prefix="gw-alert-bench-") as tmp_name, head as address:
        tmp = Path(tmp_name)
        data_dir = tmp / "gradwatch"
        data_dir.mkdir()
        env = {**os.environ, "RAY_ADDRESS": address, "GRADWATCH_POLL_INTERVAL": POLL_INTERVAL}
        svc = ServiceProcess(data_dir, ["--no-monitoring"], env=env, token=TOKEN)
        svc.start()
        token_file = tmp / "token"
        token_file.write_text(TOKEN)
        children: list[Child] = []
        try:
            am_config = render_alertmanager_config(
                webhook_url=f"{svc.url}/v1/alerts", token_file=token_file, group_wait="1s", group_interval="1s"
            )
            am = start_in_folder(
                "alertmanager", alertmanager_command, alertmanager_bin, am_config, tmp / "alertmanager"
            )
            children.append(am)
            prom_config = render_prometheus_config(
                service_url=svc.url,
                token_file=token_file,
                alertmanager_url=am.url,
                scrape_interval=SCRAPE,
                eval_interval=EVAL,
                sd_refresh_interval="1s",
            )
            children.append(
                start_in_folder("prometheus", prometheus_command, prometheus_bin, prom_config, tmp / "prometheus")
            )
            nonfinite = run(svc.client, data_dir, "diverging", "TrainingLossNonFinite", first_nonfinite)
            time.sleep(2)
            stall = run(svc.client, data_dir, "stalled", "TrainingStalled", first_step)
        finally:
            for child in reversed(children):  # Prometheus first (it sends to Alertmanager)
                child.stop()
            svc.stop()
    line = f"nonfinite_to_alert_seconds={nonfinite:.2f} stall_to_alert_seconds={stall:.2f}"
    if not args.no_write:
        from bench.results import write_section

        write_section("alert-latency", "From a problem's onset to its alert reaching the service", section(line))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
