"""Jobs across several Ray nodes: placement, node labels in Prometheus, and a whole node lost mid-run.

A multi-node Ray of its own (`ray_cluster`: a head without CPUs and two worker nodes of 2 logical CPUs
each, started with ray.cluster_utils.Cluster) serves the module, with one `gradwatch up`, a real
Prometheus that finds the workers through the service's /v1/targets and a real Alertmanager that sends
alerts back to it. The service shares no folder with the Ray nodes: drivers write their runs where the
service never looks (`ray_storage_path`) and push everything it shows over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import pytest

from deploy.render import render_alertmanager_config, render_prometheus_config
from service.auth import consumer_token_file
from service.settings import Settings
from tests.conftest import small_spec
from tests.promstack import query, start_alertmanager, start_prometheus, wait_for
from tests.raycluster import multi_node_ray
from tests.stack import BIN, TOKEN, Service

pytestmark = [pytest.mark.ray, pytest.mark.prometheus, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_cluster():
    """A multi-node Ray on this machine (ray.cluster_utils.Cluster): a head with no CPUs and two worker
    nodes of 2 logical CPUs each, for this module alone (no other needs several nodes; stopped after it,
    it loads the machine no longer). A test that removes nodes puts them back (`restore`) for the next."""
    with multi_node_ray(workers=2, cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def stack(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    svc = Service(ray_cluster.dashboard, tmp / "gradwatch")
    (tmp / "gradwatch").mkdir()
    svc.env["GRADWATCH_ALLOW_USER_CODE"] = "true"  # the paced model of tests/workers/user_code.py
    svc.env["GRADWATCH_RAY_STORAGE_PATH"] = str(tmp / "ray-nodes")  # the Ray side's folder, not the service's
    svc.start()
    # Prometheus and Alertmanager each with their own narrow token, as deployed.
    settings = Settings(data_dir=tmp / "gradwatch")
    am_config = render_alertmanager_config(
        webhook_url=f"{svc.url}/v1/alerts",
        token_file=consumer_token_file(settings, "alertmanager"),
        group_wait="1s",
        group_interval="1s",
    )
    with start_alertmanager(am_config, tmp) as am:
        config = render_prometheus_config(
            service_url=svc.url,
            token_file=consumer_token_file(settings, "prometheus"),
            alertmanager_url=am.url,
            scrape_interval="1s",
            eval_interval="1s",
            sd_refresh_interval="1s",
        )
        with start_prometheus(config, tmp) as prom:
            yield SimpleNamespace(
                svc=svc,
                client=svc.client,
                prom=prom,
                ray=ray_cluster,
                runs=tmp / "ray-nodes",
                service_runs=tmp / "gradwatch" / "runs",
            )
    for job in svc.client.jobs(state=["queued", "running"]):
        svc.client.cancel(job["id"])
    svc.stop()
    ray_cluster.restore(workers=2)


def paced_spec(name: str, **overrides) -> dict:
    # rank 1 sleeps 10 ms a step, so the job runs long enough, at the same pace on any machine, to be
    # looked at and to lose a node mid-interval
    return small_spec(
        name=name, model={"name": "tests.workers.user_code:build", "options": {"delay": 0.01}}, **overrides
    )


def running_on_both_nodes(stack, job_id: str, *, past: int = 0, every: int = 0):
    """The job's status once both ranks run (on two different nodes), past `past` steps and, with
    `every`, 1.5 s after crossing a checkpoint (Ray Train registers one at its next health check)."""
    crossed: dict[int, float] = {}

    def ready():
        job = stack.client.get(job_id)
        assert job["state"] in ("queued", "running"), f"{job_id} ended {job['state']}: {job['reason']}"
        step, nodes = job.get("step") or 0, job.get("nodes") or {}
        if len(job["endpoints"]) < 2 or len(set(nodes.values())) < 2 or step < past:
            return None
        if every:
            mark = step // every * every
            crossed.setdefault(mark, time.monotonic())
            if time.monotonic() - crossed[mark] < 1.5 or not 0 < step % every <= every * 0.6:
                return None
        return job

    return wait_for(ready, timeout=300, interval=0.2, what=f"{job_id} running on two nodes")


def test_strict_spread_puts_one_rank_per_node_and_prometheus_sees_both_nodes(stack):
    workers = set(stack.ray.worker_nodes)
    job = stack.client.submit(paced_spec("spread-2", max_steps=3000, scaling={"placement": "strict_spread"}))
    job = running_on_both_nodes(stack, job["id"])
    nodes = job["nodes"]
    assert set(nodes) == {"0", "1"} and set(nodes.values()) == workers  # one rank on each worker node
    assert {e["rank"]: e["node"] for e in job["endpoints"]} == {0: nodes["0"], 1: nodes["1"]}
    targets = {t["labels"]["rank"]: t["labels"] for t in stack.client.targets() if t["labels"]["job_id"] == job["id"]}
    assert {r: labels["node"] for r, labels in targets.items()} == nodes

    def scraped_on_both_nodes():
        series = query(stack.prom.url, f'gradwatch_step{{job_id="{job["id"]}"}}')
        return (
            series if {(s["metric"]["rank"], s["metric"].get("node")) for s in series} == set(nodes.items()) else None
        )

    series = wait_for(scraped_on_both_nodes, timeout=60, interval=1, what="both ranks scraped with node labels")
    assert all(float(s["value"][1]) > 0 for s in series)
    # the ranks board's queries keep the node: one line per rank and node
    by_node = query(stack.prom.url, f'sum by (rank, node) (gradwatch_samples_total{{job_id="{job["id"]}"}})')
    assert {(s["metric"]["rank"], s["metric"]["node"]) for s in by_node} == set(nodes.items())
    stack.client.cancel(job["id"])
    assert stack.client.wait(job["id"], timeout=120)["state"] == "cancelled"

    # three ranks cannot each have a node of their own on two nodes: refused before any worker starts
    too_many = stack.client.submit(
        small_spec(name="spread-3", scaling={"num_workers": 3, "cpus_per_worker": 0.5, "placement": "strict_spread"})
    )
    ended = stack.client.wait(too_many["id"], timeout=180)
    assert ended["state"] == "failed"
    assert (
        "strict_spread puts each of the 3 workers on a node of its own, but only 2 of the cluster's 3 alive "
        "nodes have room for one worker (0.5 CPUs)" in ended["reason"]
    ), ended["reason"]
    assert not ended["nodes"]


def gradwatch_status(stack, job_id: str) -> str:
    done = subprocess.run(
        [str(BIN / "gradwatch"), "status", job_id, "--url", stack.svc.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**stack.svc.env, "GRADWATCH_TOKEN": TOKEN, "COLUMNS": "300"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_job_survives_losing_a_whole_node_and_resumes_from_its_checkpoint(stack):
    spec = paced_spec(
        "node-loss",
        max_steps=1500,
        max_failures=2,
        checkpoint={"every_steps": 300, "keep": 2},
        validation={"every_steps": 500},
        scaling={"placement": "strict_spread"},
    )
    job = stack.client.submit(spec)
    running = running_on_both_nodes(stack, job["id"], past=300, every=300)
    lost, kept = running["nodes"]["1"], running["nodes"]["0"]
    killed_at = running["step"]
    stack.ray.remove_node(lost)  # rank 1's node: its raylet, its workers, everything on it

    # one node left cannot hold a strict_spread pair: the job says so while it waits, never silently
    def waiting():
        now = stack.client.get(job["id"])
        assert now["state"] == "running", now["reason"]
        return (
            now
            if (now.get("waiting") or "").startswith(f"cannot place the workers since node {lost} was lost")
            else None
        )

    waits = wait_for(waiting, timeout=120, interval=0.5, what="the job to say what it waits for")
    assert "only 1 of the cluster's 2 alive nodes have room for one worker" in waits["waiting"], waits["waiting"]
    joined = stack.ray.add_node()  # a node joins: the group is placed again, on it

    done = stack.client.wait(job["id"], timeout=400)
    assert done["state"] == "succeeded", done["reason"]
    assert done["reason"].startswith("finished 1500 steps")  # the pushed result
    assert done["step"] == 1500 and done["restarts"] == 1
    assert not (stack.service_runs / job["id"]).exists()  # nothing of it reached the service's disk
    [loss] = done["lost_nodes"]
    assert loss["node"] == lost and loss["ranks"] == [1]
    assert set(done["nodes"].values()) == {kept, joined}  # one rank per node again, one of them new
    result = json.loads((stack.runs / job["id"] / "result.json").read_text())
    assert [w["steps"] for w in result["workers"]] == [1500, 1500]
    assert result["workers"][0]["param_hash"] == result["workers"][1]["param_hash"]
    resumed = json.loads((stack.runs / job["id"] / "status.json").read_text())["resumed_step"]
    assert killed_at - 300 <= resumed < killed_at, (killed_at, resumed)  # at most one interval lost
    text = gradwatch_status(stack, job["id"])
    assert "restarts" in text and lost in text and "lost nodes" in text, text
    assert any(line.split()[:2] == ["restarts", "1"] for line in text.splitlines()), text


def test_without_failures_allowed_a_lost_node_fails_the_job_naming_it(stack):
    spec = paced_spec("node-loss-fatal", max_steps=3000, max_failures=0, scaling={"placement": "strict_spread"})
    job = stack.client.submit(spec)
    running = running_on_both_nodes(stack, job["id"], past=20)
    lost = running["nodes"]["0"]
    stack.ray.remove_node(lost)
    done = stack.client.wait(job["id"], timeout=300)
    assert done["state"] == "failed"
    assert done["reason"].startswith(f"node {lost}") and "was lost at step" in done["reason"], done["reason"]
    assert [n["node"] for n in done["lost_nodes"]] == [lost]
    stack.ray.restore(workers=2)
    # the service's failed state reaches Prometheus, the rule fires, Alertmanager sends it back
    alert = wait_for(
        lambda: [a for a in stack.client.get(job["id"])["alerts"] if a["alertname"] == "TrainingJobFailed"],
        timeout=60,
        interval=1,
        what="TrainingJobFailed for the job",
    )
    assert alert[0]["status"] == "firing" and alert[0]["severity"] == "critical"
