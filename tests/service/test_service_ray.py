"""The service on a real local Ray: `gradwatch up` as a subprocess, the real driver, a real Prometheus.

One Ray head with 2 logical CPUs serves the whole module. A 1-worker job asks
for 1 CPU (Ray Train V2's controller and the job's entrypoint ask for none), so
two of them fill the cluster and a 2-worker job has to wait for both.

The head runs as `ray start --block` in its own session and is stopped by
signalling that process, not `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from service.client import Client
from service.scheduler.local_ray import ray_token
from tests.promstack import query, start_prometheus, wait_for
from tests.stack import TOKEN, Service

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


# Seconds rank 0 sleeps in each forward (tests/workers/user_code.py) in the jobs that must run for a while:
# their length is set by the pace, not by how fast a loaded machine steps, and they leave the CPUs free.
PACE = 0.01
PACED_MODEL = {"name": "tests.workers.user_code:build", "options": {"delay": PACE, "ranks": [0]}}


def job_spec(name: str, *, workers: int = 1, steps: int = 200, paced: bool = False) -> dict:
    return {
        "name": name,
        "labels": {"team": "it"},
        "model": PACED_MODEL if paced else {"name": "mlp", "hidden": [16]},
        "data": {"name": "synthetic-classification", "n_samples": 512},
        "max_steps": steps,
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        # no scrape grace at the end (15 s by default): nothing here scrapes an ended job
        "telemetry": {"grace_seconds": 0},
    }


@pytest.fixture(scope="module")
def service(ray_head, tmp_path_factory):
    svc = Service(ray_head, tmp_path_factory.mktemp("gradwatch"))
    svc.env["GRADWATCH_ALLOW_USER_CODE"] = "true"  # the paced model of tests/workers/user_code.py
    svc.start()
    yield svc
    for job in svc.client.jobs(state=["queued", "running"]):
        svc.client.cancel(job["id"])
    svc.stop()


def wait_state(client: Client, job_id: str, states: set[str], timeout: float) -> dict:
    return wait_for(
        lambda: (j := client.get(job_id))["state"] in states and j,
        timeout=timeout,
        interval=0.5,
        what=f"{job_id} to be {'/'.join(sorted(states))}",
    )


def live_train_workers(ray_address: str, ray_job_id: str) -> list[dict]:
    body = httpx.get(
        f"{ray_address}/api/v0/actors",
        headers={"Authorization": f"Bearer {ray_token()}"},
        params={
            "filter_keys": ["job_id", "class_name"],
            "filter_predicates": ["=", "="],
            "filter_values": [ray_job_id, "RayTrainWorker"],
        },
        timeout=10,
    ).json()
    return [a for a in body["data"]["result"]["result"] if a["state"] != "DEAD"]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found


PAIR_STEPS = 3000  # at least 30 s each at PACE: both train at once although a loaded Ray starts them apart


def test_two_jobs_share_the_cluster_a_bigger_one_waits_and_prometheus_scrapes_them(service, tmp_path):
    client = service.client
    config = f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: gradwatch-workers
    scrape_interval: 1s
    http_sd_configs:
      - url: {service.url}/v1/targets
        refresh_interval: 1s
        authorization: {{type: Bearer, credentials: {TOKEN}}}
"""
    with start_prometheus(config, tmp_path) as prom:
        a = client.submit(job_spec("pair-a", steps=PAIR_STEPS, paced=True))
        b = client.submit(job_spec("pair-b", steps=PAIR_STEPS, paced=True))
        big = client.submit(job_spec("needs-two", workers=2, steps=200))

        def both_training():
            jobs = {j["id"]: j for j in client.jobs(labels={"team": "it"}, limit=10)}
            training = [jobs[x["id"]]["state"] == "running" and (jobs[x["id"]]["step"] or 0) > 0 for x in (a, b)]
            return all(training) and jobs

        jobs = wait_for(both_training, timeout=240, interval=0.5, what="both 1-worker jobs to train at once")
        waiting = jobs[big["id"]]
        assert waiting["state"] == "queued"
        assert waiting["reason"].startswith("waiting for 2 CPUs; 0 CPUs free of 2 CPUs"), waiting["reason"]

        def both_listed():
            targets = client.targets()
            return {t["labels"]["job_id"] for t in targets} >= {a["id"], b["id"]} and targets

        targets = wait_for(both_listed, timeout=60, what="worker endpoints in /v1/targets")
        assert {t["labels"]["rank"] for t in targets} == {"0"}
        assert all(":" in t["targets"][0] for t in targets)
        scraped = wait_for(
            lambda: query(prom.url, f'gradwatch_step{{job_id="{a["id"]}"}} > 0'),
            timeout=60,
            what="Prometheus to scrape job a's worker",
        )
        assert scraped[0]["metric"]["rank"] == "0"

        def big_started():
            snapshot = {x["id"]: client.get(x["id"]) for x in (a, b, big)}
            return snapshot if snapshot[big["id"]]["state"] != "queued" else None

        at_start = wait_for(big_started, timeout=300, interval=0.3, what="the 2-worker job to start")
        # it waited: when it started, the jobs that held the CPUs were not both still training
        still_training = [
            x
            for x in (a, b)
            if at_start[x["id"]]["state"] == "running" and (at_start[x["id"]]["step"] or 0) < PAIR_STEPS
        ]
        assert len(still_training) < 2, at_start
        done_a = wait_state(client, a["id"], {"succeeded", "failed"}, timeout=300)
        done_b = wait_state(client, b["id"], {"succeeded", "failed"}, timeout=300)
        assert done_a["state"] == "succeeded", done_a["reason"]
        assert done_b["state"] == "succeeded", done_b["reason"]
        assert done_a["step"] == done_b["step"] == PAIR_STEPS
    done_big = wait_state(client, big["id"], {"succeeded", "failed"}, timeout=300)
    assert done_big["state"] == "succeeded", done_big["reason"]
    assert done_big["world_size"] == 2
    assert done_big["started_at"] > max(done_a["started_at"], done_b["started_at"])
    assert client.targets() == []


def test_cancel_stops_a_running_job_and_leaves_no_worker(service, ray_head):
    client = service.client
    job = client.submit(job_spec("to-cancel", steps=10_000_000, paced=True))
    wait_for(lambda: (client.get(job["id"])["step"] or 0) > 0, timeout=240, interval=0.5, what="the job to train")
    ray_job_id = httpx.get(
        f"{ray_head}/api/jobs/{job['id']}", timeout=10, headers={"Authorization": f"Bearer {ray_token()}"}
    ).json()["job_id"]
    assert live_train_workers(ray_head, ray_job_id)
    started = time.monotonic()
    client.cancel(job["id"])
    ended = wait_state(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
    assert ended["state"] == "cancelled", ended["reason"]
    assert ended["reason"] == "cancelled on request"
    assert live_train_workers(ray_head, ray_job_id) == []
    wait_for(
        lambda: not processes_mentioning(job["id"]),
        timeout=max(1.0, 30 - (time.monotonic() - started)),
        what="the job's driver and workers to exit",
    )
    assert [t["to_state"] for t in client.get(job["id"])["transitions"]] == ["queued", "running", "cancelled"]


def test_a_restarted_service_keeps_tracking_its_job(service):
    client = service.client
    steps = 3000  # at least 30 s at PACE: the service is killed and started again meanwhile
    job = client.submit(job_spec("survivor", steps=steps, paced=True))
    wait_for(lambda: (client.get(job["id"])["step"] or 0) > 0, timeout=240, interval=0.5, what="the job to train")
    service.kill()
    assert processes_mentioning(job["id"]), "the job must outlive the service"
    service.start()
    again = client.get(job["id"])
    assert again["state"] == "running", again["reason"]
    done = wait_state(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done["state"] == "succeeded", done["reason"]
    assert done["step"] == steps
    assert [t["to_state"] for t in done["transitions"]] == ["queued", "running", "succeeded"]
    assert f"step {steps}/{steps}" in "\n".join(client.logs(job["id"]))
