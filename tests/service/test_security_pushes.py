"""What a job's driver token may push, one test per hole: a pushed `/metrics` endpoint points
Prometheus only at a Ray node of the job's own workers on an unprivileged port, a push names its own
job only, and no string of a push is unbounded.

The real app (TestClient) with the in-memory Ray of tests/service/fakes.py, whose `hosts` are the
nodes every worker of a job runs on.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from gradwatch.status import Endpoint, RunResult, RunStatus
from service.api.routes import create_app
from service.auth import consumer_token
from service.scheduler.push import MAX_TEXT
from service.settings import Settings
from tests.service.fakes import FakeCluster, spec

ADMIN = "operator-s3cret"
OWN_HOST = "10.1.0.1"  # the Ray node the fake cluster runs the jobs' workers on


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cluster():
    cluster = FakeCluster(cpus=8)
    cluster.hosts = frozenset({OWN_HOST})
    return cluster


@pytest.fixture
def app(tmp_path, cluster):
    settings = Settings(data_dir=tmp_path / "data", token=ADMIN, allowed_hosts="testserver", scheduler_enabled=False)
    return create_app(settings, cluster=cluster)


@pytest.fixture
def http(app):
    with TestClient(app, headers=bearer(ADMIN)) as client:
        yield client


@pytest.fixture
def prometheus(app):
    return bearer(consumer_token(app.state.settings, "prometheus"))


def start(http, app, cluster, name: str = "job") -> tuple[str, dict[str, str]]:
    """A running job and its driver's token (the one minted for it at launch)."""
    job_id = http.post("/v1/jobs", json=spec(name, steps=50)).json()["id"]
    app.state.launcher.tick()
    assert http.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
    return job_id, bearer(cluster.envs[job_id]["GRADWATCH_PUSH_TOKEN"])


def status(job_id: str, step: int, *endpoints: tuple[str, int], **extra) -> dict:
    return RunStatus(
        job_id=job_id,
        state="running",
        step=step,
        max_steps=50,
        world_size=len(endpoints) or 1,
        endpoints=[Endpoint(rank=r, host=host, port=port) for r, (host, port) in enumerate(endpoints)],
        updated_at=time.time(),
        **extra,
    ).model_dump(mode="json")


def served(http, prometheus, job_id: str) -> list[str]:
    groups = http.get("/v1/targets", headers=prometheus).json()
    return [target for group in groups if group["labels"]["job_id"] == job_id for target in group["targets"]]


def refused_events(app, job_id: str) -> list[dict]:
    return [e for e in app.state.store.jobs.get(job_id).events or [] if e.get("kind") == "refused"]


@pytest.mark.parametrize(
    ("host", "port", "field", "words"),
    [
        ("169.254.169.254", 9100, "status.endpoints.0.host", "is not the address of a Ray node"),  # cloud metadata
        ("internal-db.corp/admin?x=", 9100, "status.endpoints.0.host", "is not the address of a Ray node"),
        ("a\nb", 9100, "status.endpoints.0.host", "is not the address of a Ray node"),
        (OWN_HOST, 80, "status.endpoints.0.port", "port 80 is outside 1024-65535"),
        (OWN_HOST, 1023, "status.endpoints.0.port", "port 1023 is outside 1024-65535"),
    ],
)
def test_a_pushed_endpoint_off_the_jobs_nodes_or_on_a_low_port_is_refused(
    http, app, cluster, prometheus, host, port, field, words
):
    job_id, driver = start(http, app, cluster)
    good = http.post(
        f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 1, (OWN_HOST, 9100))}, headers=driver
    )
    assert good.status_code == 200, good.text
    assert served(http, prometheus, job_id) == [f"{OWN_HOST}:9100"]  # the job's own node: served

    bad = http.post(f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 2, (host, port))}, headers=driver)
    assert bad.status_code == 422, bad.text
    errors = bad.json()["errors"]
    assert any(e.startswith(f"{field}: ") and words in e for e in errors), errors
    (event,) = refused_events(app, job_id)
    assert event["name"] == "endpoints" and event["step"] == 2 and words in event["detail"]
    # nothing of the refused push is kept, and Prometheus is never pointed at it
    assert http.get(f"/v1/jobs/{job_id}").json()["step"] == 1
    assert served(http, prometheus, job_id) == [f"{OWN_HOST}:9100"]


def test_endpoints_on_the_jobs_own_worker_nodes_are_accepted_and_served(http, app, cluster, prometheus):
    cluster.hosts = frozenset({OWN_HOST, "10.1.0.2"})
    job_id, driver = start(http, app, cluster)
    pushed = status(job_id, 1, (OWN_HOST, 9100), ("10.1.0.2", 65535), ("10.1.0.2", 1024))
    assert http.post(f"/v1/jobs/{job_id}/progress", json={"status": pushed}, headers=driver).status_code == 200
    assert sorted(served(http, prometheus, job_id)) == sorted([f"{OWN_HOST}:9100", "10.1.0.2:65535", "10.1.0.2:1024"])
    assert refused_events(app, job_id) == []


def test_a_worker_group_restarted_on_another_node_is_found(http, app, cluster, prometheus):
    job_id, driver = start(http, app, cluster)
    first = http.post(
        f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 1, (OWN_HOST, 9100))}, headers=driver
    )
    assert first.status_code == 200, first.text
    cluster.hosts = frozenset({"10.1.0.9"})  # Ray placed the workers again, elsewhere
    app.state.worker_hosts.refresh_s = 0.0  # asked again at once (a second's wait otherwise)
    moved = http.post(
        f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 2, ("10.1.0.9", 9100))}, headers=driver
    )
    assert moved.status_code == 200, moved.text
    assert served(http, prometheus, job_id) == ["10.1.0.9:9100"]


def test_while_ray_cannot_be_asked_a_push_is_kept_its_ports_checked_its_endpoints_not_served(
    http, app, cluster, prometheus
):
    job_id, driver = start(http, app, cluster)
    cluster.down = True
    kept = http.post(
        f"/v1/jobs/{job_id}/progress",
        json={"status": status(job_id, 3, (OWN_HOST, 9100), ("169.254.169.254", 9101))},
        headers=driver,
    )
    assert kept.status_code == 200, kept.text
    assert http.get(f"/v1/jobs/{job_id}").json()["step"] == 3  # the numbers are the job's own: kept
    assert served(http, prometheus, job_id) == []  # where its workers run is unknown: nothing served
    low = http.post(f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 4, (OWN_HOST, 22))}, headers=driver)
    assert low.status_code == 422 and any(
        e.startswith("status.endpoints.0.port: port 22 is outside") for e in low.json()["errors"]
    ), low.text
    assert http.get(f"/v1/jobs/{job_id}").json()["step"] == 3
    cluster.down = False  # Ray answers again: only the endpoint on the job's own node is served
    assert served(http, prometheus, job_id) == [f"{OWN_HOST}:9100"]


@pytest.mark.parametrize("route", ["progress", "result"])
def test_a_push_naming_another_job_is_refused(http, app, cluster, route):
    job_id, driver = start(http, app, cluster, "mine")
    other, _ = start(http, app, cluster, "other")
    if route == "progress":
        body = {"status": status(other, 7)}
    else:
        body = {
            "result": RunResult(
                job_id=other, state="succeeded", steps=3, world_size=1, wall_seconds=1.0, run_dir="/runs/x"
            ).model_dump(mode="json")
        }
    refused = http.post(f"/v1/jobs/{job_id}/{route}", json=body, headers=driver)
    assert refused.status_code == 422, refused.text
    field = "status" if route == "progress" else "result"
    assert any(
        e.startswith(f"{field}.job_id: a push to job {job_id} carries that job's id only")
        for e in refused.json()["errors"]
    ), refused.text
    for job in (job_id, other):
        stored = app.state.store.jobs.get(job)
        assert stored.run_status is None and stored.run_result is None


def test_a_string_over_the_bound_of_a_push_is_refused_naming_it(http, app, cluster):
    job_id, driver = start(http, app, cluster)
    huge = "x" * 200_000
    refused = http.post(f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 1, warning=huge)}, headers=driver)
    assert refused.status_code == 422, refused.text
    assert any(
        e.startswith("status.warning: a text of 200000 characters, over the") and f"{MAX_TEXT} limit" in e
        for e in refused.json()["errors"]
    ), refused.text
    event = {"kind": "anomaly", "name": "loss_spike", "step": 1, "detail": huge}
    in_event = http.post(
        f"/v1/jobs/{job_id}/progress", json={"status": status(job_id, 1), "events": [event]}, headers=driver
    )
    assert in_event.status_code == 422 and any(
        e.startswith("events.0.detail: a text of 200000 characters") for e in in_event.json()["errors"]
    ), in_event.text
    key = http.post(
        f"/v1/jobs/{job_id}/progress",
        json={"status": status(job_id, 1), "events": [{"k" * 1000: 1}]},
        headers=driver,
    )
    assert key.status_code == 422 and any("a key of 1000 characters" in e for e in key.json()["errors"]), key.text
    assert app.state.store.jobs.get(job_id).run_status is None and not app.state.store.jobs.get(job_id).events
