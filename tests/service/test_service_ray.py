"""The service on a real local Ray: `gradwatch up` as a subprocess, the real driver, a real Prometheus.

One Ray head with 2 logical CPUs serves the whole module. A 1-worker job asks
for 1 CPU (Ray Train V2's controller and the job's entrypoint ask for none), so
two of them fill the cluster and a 2-worker job has to wait for both.

The head runs as `ray start --block` in its own session and is stopped by
signalling that process, not `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from service.client import Client
from service.launcher import ray_token
from tests.promstack import free_port, query, start_prometheus, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

BIN = Path(sys.executable).parent
TOKEN = "integration-token"
CPUS = 2


def job_spec(name: str, *, workers: int = 1, steps: int = 200) -> dict:
    return {
        "name": name,
        "labels": {"team": "it"},
        "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "synthetic-classification", "n_samples": 512},
        "max_steps": steps,
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
    }


@pytest.fixture(scope="module")
def ray_head():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    if ray_token() is None:
        subprocess.run(
            [str(BIN / "ray"), "get-auth-token", "--generate"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    temp_dir = tempfile.mkdtemp(prefix="gwray-", dir="/tmp")  # Ray's socket paths must stay short
    dashboard_port = free_port()
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={CPUS}",
            "--disable-usage-stats",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {ray_token()}"}

    def ready() -> bool:
        if head.poll() is not None:
            output = (Path(temp_dir) / "ray-start.log").read_text()
            raise RuntimeError(f"ray start exited {head.returncode}: {output}")
        body = httpx.get(f"{address}/api/cluster_status", headers=headers, timeout=5).json()
        return bool(((body.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport"))

    try:
        wait_for(ready, timeout=120, interval=1, what="the Ray head")
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
        try:
            head.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()


class Service:
    """`gradwatch up` in a subprocess that the tests can SIGKILL and start again."""

    def __init__(self, ray_address: str, data_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "service.log"
        self.env = {
            **os.environ,
            "RAY_ADDRESS": ray_address,
            "GRADWATCH_TOKEN": TOKEN,
            "GRADWATCH_DATA_DIR": str(data_dir),
            "GRADWATCH_PORT": str(self.port),
            "GRADWATCH_POLL_INTERVAL": "0.5",
        }
        self.process: subprocess.Popen | None = None
        self.client = Client(self.url, TOKEN)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(BIN / "gradwatch"), "up"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200,
            timeout=60,
            what="gradwatch up",
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def service(ray_head, tmp_path_factory):
    svc = Service(ray_head, tmp_path_factory.mktemp("gradwatch"))
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
        a = client.submit(job_spec("pair-a", steps=5000))
        b = client.submit(job_spec("pair-b", steps=5000))
        big = client.submit(job_spec("needs-two", workers=2, steps=200))

        def both_training():
            jobs = {j["id"]: j for j in client.jobs(labels={"team": "it"}, limit=10)}
            training = [
                jobs[x["id"]]["state"] == "running" and (jobs[x["id"]]["step"] or 0) > 0 for x in (a, b)
            ]
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

        done_a = wait_state(client, a["id"], {"succeeded", "failed"}, timeout=300)
        done_b = wait_state(client, b["id"], {"succeeded", "failed"}, timeout=300)
        assert done_a["state"] == "succeeded", done_a["reason"]
        assert done_b["state"] == "succeeded", done_b["reason"]
        assert done_a["step"] == done_b["step"] == 5000
    done_big = wait_state(client, big["id"], {"succeeded", "failed"}, timeout=300)
    assert done_big["state"] == "succeeded", done_big["reason"]
    assert done_big["world_size"] == 2
    # it waited: it started only after the jobs holding the CPUs had ended
    assert done_big["started_at"] > min(done_a["ended_at"], done_b["ended_at"])
    assert client.targets() == []


def test_cancel_stops_a_running_job_and_leaves_no_worker(service, ray_head):
    client = service.client
    job = client.submit(job_spec("to-cancel", steps=10_000_000))
    wait_for(
        lambda: (client.get(job["id"])["step"] or 0) > 0, timeout=240, interval=0.5, what="the job to train"
    )
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
    job = client.submit(job_spec("survivor", steps=10_000))
    wait_for(
        lambda: (client.get(job["id"])["step"] or 0) > 0, timeout=240, interval=0.5, what="the job to train"
    )
    service.kill()
    assert processes_mentioning(job["id"]), "the job must outlive the service"
    service.start()
    again = client.get(job["id"])
    assert again["state"] == "running", again["reason"]
    done = wait_state(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done["state"] == "succeeded", done["reason"]
    assert done["step"] == 10_000
    assert [t["to_state"] for t in done["transitions"]] == ["queued", "running", "succeeded"]
    assert "step 10000/10000" in "\n".join(client.logs(job["id"]))
