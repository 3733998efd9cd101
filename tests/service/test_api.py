"""The HTTP API with an in-memory Ray: submit, list, inspect, cancel, logs, targets, alerts, metrics."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient

from service.api.routes import create_app
from service.settings import Settings
from tests.service.fakes import FakeCluster, spec

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def testserver_is_an_allowed_host(monkeypatch):
    """TestClient sends `Host: testserver`: a name these servers must answer to."""
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")


@pytest.fixture
def cluster():
    return FakeCluster(cpus=4)


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False, max_body_bytes=64 * 1024)


@pytest.fixture
def app(settings, cluster):
    return create_app(settings, cluster=cluster)


@pytest.fixture
def api(app):
    with TestClient(app, headers=AUTH) as client:
        yield client


def stored_jobs(app) -> int:
    return sum(app.state.store.jobs.count_by_state().values())


def submit(api, **kw) -> dict:
    response = api.post("/v1/jobs", json=spec(**kw))
    assert response.status_code == 201, response.text
    return response.json()


# ---------------------------------------------------------------- submit
def test_submit_json_and_yaml(api):
    job = submit(api, name="digits", workers=2, labels={"team": "vision"})
    assert job["id"].startswith("gw-") and job["state"] == "queued"
    assert job["spec"]["scaling"]["num_workers"] == 2 and job["labels"] == {"team": "vision"}
    assert [t["to_state"] for t in job["transitions"]] == ["queued"]
    response = api.post(
        "/v1/jobs", content=yaml.safe_dump(spec("from-yaml")), headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 201 and response.json()["name"] == "from-yaml"


def test_a_bad_spec_gets_every_error_and_nothing_is_stored(api, app):
    bad = {
        "name": "Bad Name",
        "model": {"name": "mlp", "hidden": [0]},
        "data": {"name": "nope"},
        "scaling": {"num_workers": 0},
        "learning_rate": 3,
    }
    response = api.post("/v1/jobs", json=bad)
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any(e.startswith("name: ") for e in errors)
    assert any(e.startswith("model.hidden.0: ") for e in errors)
    assert any(e.startswith("data: unknown data name") for e in errors)
    assert any(e.startswith("scaling.num_workers: ") for e in errors)
    assert "learning_rate: unknown field (not allowed here; check its spelling)" in errors
    assert len(errors) >= 5
    for body in (b"", b"[1, 2]", b"name: [unclosed", b"\xff\xfe"):
        response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml"})
        assert response.status_code == 422 and response.json()["errors"][0].startswith("<spec>: "), body
    assert stored_jobs(app) == 0


def test_user_code_is_refused_unless_the_server_allows_it(tmp_path, cluster):
    custom = spec("custom", model={"name": "mypkg.models:build"})
    denied = create_app(Settings(data_dir=tmp_path / "a", token=TOKEN, scheduler_enabled=False), cluster=cluster)
    with TestClient(denied, headers=AUTH) as api:
        response = api.post("/v1/jobs", json=custom)
        assert response.status_code == 422
        assert response.json()["errors"][0].startswith("model.name: user code (mypkg.models:build) is disabled")
    allowed = create_app(
        Settings(data_dir=tmp_path / "b", token=TOKEN, scheduler_enabled=False, allow_user_code=True),
        cluster=cluster,
    )
    with TestClient(allowed, headers=AUTH) as api:
        # not imported by the service: it runs where the workers are
        assert api.post("/v1/jobs", json=custom).status_code == 201


def test_bodies_over_the_limit_get_413(api, app, settings):
    big = json.dumps(spec("big", labels={"pad": "x"})) + " " * settings.max_body_bytes
    response = api.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "byte limit" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(100):
            yield b" " * 1024

    response = api.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/yaml"})
    assert response.status_code == 413
    response = api.post("/v1/alerts", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert stored_jobs(app) == 0


# ------------------------------------------------------------------- auth
@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs/gw-x"),
        ("get", "/v1/jobs/gw-x/logs"),
        ("post", "/v1/jobs/gw-x/cancel"),
        ("get", "/v1/targets"),
        ("post", "/v1/alerts"),
        ("get", "/v1/alerts"),
        ("get", "/metrics"),
    ],
)
def test_every_resource_needs_the_token(app, method, path):
    with TestClient(app) as anonymous:
        response = getattr(anonymous, method)(path)
        assert response.status_code == 401
        assert "missing bearer token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
        response = getattr(anonymous, method)(path, headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401 and "invalid bearer token" in response.json()["detail"]


def test_only_health_needs_no_token(app):
    with TestClient(app) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok", "scheduler": "paused"}
        assert anonymous.get("/metrics").status_code == 401


# ------------------------------------------------------------ list and get
def test_list_filters_and_pages_newest_first(api):
    ids = [submit(api, name=f"n{i % 2}", labels={"team": "vision" if i < 4 else "nlp"})["id"] for i in range(7)]
    newest_first = ids[::-1]
    assert [j["id"] for j in api.get("/v1/jobs").json()["data"]] == newest_first
    assert [j["id"] for j in api.get("/v1/jobs?limit=2&offset=2").json()["data"]] == newest_first[2:4]
    seen, cursor = [], None
    while True:
        page = api.get("/v1/jobs", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == newest_first
    vision = api.get("/v1/jobs", params={"label": "team=vision"}).json()["data"]
    assert [j["id"] for j in vision] == ids[:4][::-1]
    both = api.get("/v1/jobs", params=[("label", "team=vision"), ("name", "n1")]).json()["data"]
    assert [j["id"] for j in both] == [ids[3], ids[1]]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = api.get("/v1/jobs", params={"state": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    several = api.get("/v1/jobs", params=[("state", "cancelled"), ("state", "queued")]).json()["data"]
    assert len(several) == 7


@pytest.mark.parametrize(
    "query,error",
    [
        ("state=exploded", "query.state.0: "),
        ("limit=0", "query.limit: "),
        ("limit=501", "query.limit: "),
        ("offset=-1", "query.offset: "),
        ("label=team", "query.label: write key=value"),
        ("cursor=garbage", "query.cursor: cursor 'garbage' is not one this server gave out"),
    ],
)
def test_bad_list_queries_get_422_with_the_reason(api, query, error):
    response = api.get(f"/v1/jobs?{query}")
    assert response.status_code == 422
    assert response.json()["errors"][0].startswith(error), response.json()


def test_get_shows_spec_progress_endpoints_history_and_alerts(api, app, cluster):
    job = submit(api, name="watched", workers=2, steps=50)
    app.state.launcher.tick()
    cluster.advance(3)
    app.state.launcher.tick()
    post_alert(api, job["id"], "TrainingLossSpike", "firing")
    detail = api.get(f"/v1/jobs/{job['id']}").json()
    assert detail["state"] == "running" and detail["step"] == 2 and detail["max_steps"] == 50
    assert detail["train_loss"] == pytest.approx(0.5) and detail["phase"] == "rapid_learning"
    assert detail["world_size"] == 2 and detail["restarts"] == 0
    assert detail["endpoints"] == [
        {"rank": 0, "host": "10.0.0.7", "port": 40000, "pid": None, "node": "node-0"},
        {"rank": 1, "host": "10.0.0.7", "port": 40001, "pid": None, "node": "node-1"},
    ]
    assert detail["nodes"] == {"0": "node-0", "1": "node-1"} and detail["lost_nodes"] == []
    assert detail["spec"]["name"] == "watched" and detail["ray_submission_id"] == job["id"]
    assert [t["to_state"] for t in detail["transitions"]] == ["queued", "running"]
    assert [a["alertname"] for a in detail["alerts"]] == ["TrainingLossSpike"]
    assert api.get("/v1/jobs/gw-000000000000").status_code == 404


# ----------------------------------------------------------- cancel, logs
def test_cancel_queued_running_and_ended_jobs(api, app, cluster):
    queued = submit(api, name="q")
    response = api.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    running = submit(api, name="r", steps=100)
    app.state.launcher.tick()
    stopping = api.post(f"/v1/jobs/{running['id']}/cancel").json()
    assert stopping["state"] == "running" and stopping["stopping"] is True
    app.state.launcher.tick()
    assert api.get(f"/v1/jobs/{running['id']}").json()["state"] == "cancelled"
    again = api.post(f"/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and "already ended cancelled" in again.json()["detail"]
    assert api.post("/v1/jobs/gw-000000000000/cancel").status_code == 404


def test_logs_plain_and_followed_to_the_end(api, app, cluster):
    job = submit(api, name="logged", steps=3)
    assert api.get(f"/v1/jobs/{job['id']}/logs").text == ""
    app.state.launcher.tick()
    cluster.advance(5)
    app.state.launcher.tick()
    text = api.get(f"/v1/jobs/{job['id']}/logs").text
    assert "step 3/3" in text and text.startswith("Running entrypoint")
    followed = api.get(f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}).text
    assert followed == text  # the job ended: the stream gives everything, then closes


# ------------------------------------------------------------------ targets
def test_targets_list_running_workers_for_prometheus(api, app, cluster):
    running, other = submit(api, name="live", workers=2, steps=50), submit(api, name="done", steps=2)
    app.state.launcher.tick()
    cluster.advance(5)
    app.state.launcher.tick()
    assert api.get(f"/v1/jobs/{other['id']}").json()["state"] == "succeeded"
    assert api.get("/v1/targets").json() == [
        {"targets": ["10.0.0.7:40000"], "labels": {"job_id": running["id"], "rank": "0", "node": "node-0"}},
        {"targets": ["10.0.0.7:40001"], "labels": {"job_id": running["id"], "rank": "1", "node": "node-1"}},
    ]


# ------------------------------------------------------------------- alerts
def am_alert(job_id, name, status, starts="2026-01-02T03:04:05Z", ends="0001-01-01T00:00:00Z", fingerprint=None):
    return {
        "status": status,
        "labels": {"alertname": name, "job_id": job_id, "severity": "warning"},
        "annotations": {"summary": f"{name} on {job_id}", "description": "look at the loss"},
        "startsAt": starts,
        "endsAt": ends,
        "generatorURL": "http://prometheus/graph",
        "fingerprint": fingerprint or f"fp-{name}",
    }


def post_alert(api, job_id, name, status, **kw):
    payload = {
        "version": "4",
        "groupKey": "{}:{}",
        "status": status,
        "receiver": "gradwatch",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://am",
        "truncatedAlerts": 0,
        "alerts": [am_alert(job_id, name, status, **kw)],
    }
    response = api.post("/v1/alerts", json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def test_alertmanager_webhook_stores_firing_then_resolved_once(api):
    assert post_alert(api, "gw-aaa", "TrainingDiverging", "firing") == {
        "received": 1,
        "new": 1,
        "updated": 0,
        "refused": 0,
    }
    assert post_alert(api, "gw-aaa", "TrainingDiverging", "firing") == {
        "received": 1,
        "new": 0,
        "updated": 0,
        "refused": 0,
    }
    resolved = post_alert(api, "gw-aaa", "TrainingDiverging", "resolved", ends="2026-01-02T03:09:05Z")
    assert resolved == {"received": 1, "new": 0, "updated": 1, "refused": 0}
    post_alert(api, "gw-bbb", "TrainingStalled", "firing")
    rows = api.get("/v1/alerts", params={"job_id": "gw-aaa"}).json()["data"]
    assert len(rows) == 1
    alert = rows[0]
    assert (alert["status"], alert["alertname"], alert["severity"]) == (
        "resolved",
        "TrainingDiverging",
        "warning",
    )
    assert alert["starts_at"] == "2026-01-02T03:04:05.000Z" and alert["ends_at"] == "2026-01-02T03:09:05.000Z"
    assert alert["summary"] == "TrainingDiverging on gw-aaa"
    assert [a["job_id"] for a in api.get("/v1/alerts", params={"status": "firing"}).json()["data"]] == ["gw-bbb"]
    assert len(api.get("/v1/alerts").json()["data"]) == 2


def test_a_malformed_webhook_is_refused_with_reasons(api):
    response = api.post("/v1/alerts", json={"alerts": [{"status": "burning", "startsAt": "yesterday"}]})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any(e.startswith("alerts.0.status: ") for e in errors)
    assert any("startsAt must be an RFC 3339 time" in e for e in errors)


# ------------------------------------------------------------------ metrics
def test_metrics_count_jobs_by_state_and_requests_by_route(api, app):
    job = submit(api, name="metered")
    submit(api, name="other")
    api.post(f"/v1/jobs/{job['id']}/cancel")
    text = api.get("/metrics").text
    assert 'gradwatch_jobs{state="queued"} 1.0' in text
    assert 'gradwatch_jobs{state="cancelled"} 1.0' in text
    assert f'gradwatch_job_state{{job_id="{job["id"]}",state="cancelled"}} 1.0' in text
    assert f'gradwatch_job_state{{job_id="{job["id"]}",state="queued"}} 0.0' in text
    assert text.count(f'job_id="{job["id"]}"') == 6
    assert 'gradwatch_api_requests_total{code="201",method="POST",route="/v1/jobs"} 2.0' in text
    assert 'gradwatch_api_request_duration_seconds_count{method="POST",route="/v1/jobs/{job_id}/cancel"} 1.0' in text


def test_ended_jobs_leave_the_state_metric_after_a_while(tmp_path, cluster):
    app = create_app(
        Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False, terminal_metric_seconds=0),
        cluster=cluster,
    )
    with TestClient(app, headers=AUTH) as api:
        job = submit(api, name="gone")
        api.post(f"/v1/jobs/{job['id']}/cancel")
        text = api.get("/metrics").text
        assert f'job_id="{job["id"]}"' not in text
        assert 'gradwatch_jobs{state="cancelled"} 1.0' in text


def test_openapi_documents_the_spec_body(api):
    schema = api.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/JobSpec"}
    assert "ScalingSpec" in schema["components"]["schemas"]
