"""Tenants: a person reads their own jobs only. Another user's job is a 404 on every route that reads
it (the same answer as for no job at all, so its id does not leak) and absent from their lists; a
`read-all` token (operators) and the admin read every job; the service's /metrics, which names every
job, needs Prometheus' scope or read-all.

Bounds on values, on a job bigger than the cluster and on serving (log streams per user, header timeout,
max connections) are tested in test_spec_values.py and test_serving_limits.py.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from gradwatch.spec import load_spec
from gradwatch.status import RunStatus
from service.api.routes import create_app
from service.auth import consumer_token
from service.settings import Settings
from tests.service.fakes import FakeCluster, spec

ADMIN = "operator-s3cret"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def cluster():
    return FakeCluster(cpus=8)


@pytest.fixture
def app(tmp_path, cluster):
    settings = Settings(data_dir=tmp_path / "data", token=ADMIN, allowed_hosts="testserver", scheduler_enabled=False)
    return create_app(settings, cluster=cluster)


@pytest.fixture
def http(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def tokens(app):
    store = app.state.store
    return {
        "alice": bearer(store.users.add("alice", ["submit"])),
        "bob": bearer(store.users.add("bob", ["submit"])),
        "reader": bearer(store.users.add("reader", ["read"])),
        "operator": bearer(store.users.add("operator", ["read-all"])),
        "admin": bearer(ADMIN),
        "prometheus": bearer(consumer_token(app.state.settings, "prometheus")),
        "alertmanager": bearer(consumer_token(app.state.settings, "alertmanager")),
    }


@pytest.fixture
def alices_job(http, app, cluster, tokens) -> str:
    """A running job of alice's with an event, a pushed status and an alert."""
    job_id = http.post("/v1/jobs", json=spec("alices", steps=50), headers=tokens["alice"]).json()["id"]
    app.state.launcher.tick()
    driver = bearer(cluster.envs[job_id]["GRADWATCH_PUSH_TOKEN"])
    status = RunStatus(job_id=job_id, state="running", step=4, max_steps=50, world_size=1, updated_at=time.time())
    event = {"kind": "anomaly", "name": "loss_spike", "step": 4, "raised": True}
    pushed = http.post(
        f"/v1/jobs/{job_id}/progress",
        json={"status": status.model_dump(mode="json"), "events": [event]},
        headers=driver,
    )
    assert pushed.status_code == 200, pushed.text
    alert = {
        "status": "firing",
        "labels": {"alertname": "TrainingDiverging", "job_id": job_id, "severity": "critical"},
        "annotations": {"summary": f"{job_id} diverges"},
        "startsAt": "2026-01-02T03:04:05Z",
        "fingerprint": f"fp-{job_id}",
    }
    body = {"version": "4", "status": "firing", "receiver": "gradwatch", "alerts": [alert]}
    assert http.post("/v1/alerts", json=body, headers=tokens["alertmanager"]).status_code == 200
    return job_id


def reads_of(job_id: str) -> list[tuple[str, dict]]:
    """Every route that reads one job (its detail holds the spec, events and alerts)."""
    return [
        (f"/v1/jobs/{job_id}", {}),
        (f"/v1/jobs/{job_id}/logs", {}),
        (f"/v1/jobs/{job_id}/logs", {"follow": "true"}),
        (f"/v1/jobs/{job_id}/report", {}),
    ]


def test_another_users_job_is_a_404_on_every_read_and_absent_from_their_lists(http, tokens, alices_job):
    bob = tokens["bob"]
    nothing = http.get("/v1/jobs/gw-does-not-exist", headers=bob)
    assert nothing.status_code == 404
    for path, params in reads_of(alices_job):
        response = http.get(path, params=params, headers=bob)
        assert response.status_code == 404, (path, params, response.status_code, response.text)
        assert response.json()["detail"] == f"no job {alices_job!r}: `gradwatch jobs` lists the jobs"
        assert "alices" not in response.text and "loss_spike" not in response.text
    assert http.post(f"/v1/jobs/{alices_job}/cancel", headers=bob).status_code == 404
    assert http.get("/v1/jobs", headers=bob).json()["data"] == []
    assert http.get("/v1/jobs", params={"name": "alices"}, headers=bob).json()["data"] == []
    assert http.get("/v1/alerts", headers=bob).json()["data"] == []
    assert http.get("/v1/alerts", params={"job_id": alices_job}, headers=bob).json()["data"] == []
    # bob's own job is his to read, and it is all his list shows
    own = http.post("/v1/jobs", json=spec("bobs"), headers=bob).json()["id"]
    assert http.get(f"/v1/jobs/{own}", headers=bob).status_code == 200
    assert [j["id"] for j in http.get("/v1/jobs", headers=bob).json()["data"]] == [own]


@pytest.mark.parametrize("who", ["alice", "operator", "admin"])
def test_the_owner_a_read_all_token_and_the_admin_read_the_job(http, tokens, alices_job, who):
    headers = tokens[who]
    for path, params in reads_of(alices_job):
        if params.get("follow"):
            continue  # a stream lasts as long as the job: the plain read stands for it
        response = http.get(path, params=params, headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
    detail = http.get(f"/v1/jobs/{alices_job}", headers=headers).json()
    assert detail["owner"] == "alice" and detail["spec"]["name"] == "alices" and detail["step"] == 4
    assert [e["name"] for e in detail["events"]] == ["loss_spike"]
    assert [a["alertname"] for a in detail["alerts"]] == ["TrainingDiverging"]
    assert alices_job in [j["id"] for j in http.get("/v1/jobs", headers=headers).json()["data"]]
    listed = http.get("/v1/alerts", params={"job_id": alices_job}, headers=headers).json()["data"]
    assert [a["job_id"] for a in listed] == [alices_job]


def test_a_read_token_reads_its_own_users_jobs_only(http, app, tokens, alices_job):
    reader = tokens["reader"]
    assert http.get(f"/v1/jobs/{alices_job}", headers=reader).status_code == 404
    assert http.get("/v1/jobs", headers=reader).json()["data"] == []
    # a job of the reader's own (a read token cannot submit: stored directly) is visible to it
    app.state.store.jobs.create(load_spec(json.dumps(spec("readers"))), owner="reader")
    assert [j["owner"] for j in http.get("/v1/jobs", headers=reader).json()["data"]] == ["reader"]


@pytest.mark.parametrize(
    ("who", "code"),
    [
        ("prometheus", 200),
        ("operator", 200),
        ("admin", 200),
        ("reader", 403),
        ("alice", 403),
        ("alertmanager", 403),
    ],
)
def test_the_services_metrics_need_targets_read_or_read_all(http, tokens, alices_job, who, code):
    response = http.get("/metrics", headers=tokens[who])
    assert response.status_code == code, response.text
    if code == 200:
        assert f'gradwatch_job_state{{job_id="{alices_job}",state="running"}} 1.0' in response.text
    else:
        assert "lacks scope targets:read or read-all" in response.json()["detail"]
        assert alices_job not in response.text
