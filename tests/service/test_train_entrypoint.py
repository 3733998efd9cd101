"""A spec that names its own training function: refused unless the server allows user code."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.routes import create_app
from service.settings import Settings
from tests.service.fakes import FakeCluster

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def testserver_is_an_allowed_host(monkeypatch):
    """TestClient sends `Host: testserver`: a name these servers must answer to."""
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")


def entrypoint_spec() -> dict:
    return {
        "name": "own-loop",
        "train": {"entrypoint": "mypkg.train:train_func", "config": {"lr": 0.1}},
        "max_steps": 100,
        "scaling": {"num_workers": 2},
    }


def test_an_entrypoint_is_refused_with_a_clear_422_when_user_code_is_off(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False), cluster=FakeCluster())
    with TestClient(app, headers=AUTH) as api:
        response = api.post("/v1/jobs", json=entrypoint_spec())
        assert response.status_code == 422
        body = response.json()
        assert body["errors"] == [
            "train.entrypoint: user code (mypkg.train:train_func) is disabled on this server: use a built-in name, "
            "or ask the operator to allow user code (GRADWATCH_ALLOW_USER_CODE=true) (got 'mypkg.train:train_func')"
        ]
        assert api.get("/v1/jobs").json()["data"] == []


def test_an_entrypoint_job_is_accepted_and_launched_when_user_code_is_on(tmp_path):
    cluster = FakeCluster()
    settings = Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False, allow_user_code=True)
    app = create_app(settings, cluster=cluster)
    with TestClient(app, headers=AUTH) as api:
        response = api.post("/v1/jobs", json=entrypoint_spec())
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["spec"]["train"] == {"entrypoint": "mypkg.train:train_func", "config": {"lr": 0.1}}
        assert job["spec"]["model"] is None and job["spec"]["data"] is None
        app.state.launcher.tick()
        assert cluster.submitted == [job["id"]]
    # a model next to an entrypoint is a mistake worth naming
    with TestClient(app, headers=AUTH) as api:
        response = api.post("/v1/jobs", json={**entrypoint_spec(), "model": {"name": "mlp"}})
        assert response.status_code == 422
        assert response.json()["errors"][0].startswith("model: a train.entrypoint job builds its own model")
