"""Drivers push progress and results over HTTP with a token good for their own job only.

The service here never sees the drivers' run folder (`ray_storage_path` is elsewhere), so all it
knows of a job comes from pushes; the in-memory Ray of fakes.py plays the cluster.
"""

from __future__ import annotations

import time

import httpx
import pytest
from fastapi.testclient import TestClient

from gradwatch.names import RAY_TRAIN_ENV
from gradwatch.status import Endpoint, RunResult, RunStatus
from service.api.routes import create_app
from service.settings import Settings
from tests.promstack import wait_for
from tests.service.fakes import FakeCluster, spec
from workers.push import Pusher

TOKEN = "s3cret"


@pytest.fixture(autouse=True)
def testserver_is_an_allowed_host(monkeypatch):
    """TestClient sends `Host: testserver`: a name these servers must answer to."""
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")


@pytest.fixture
def cluster():
    cluster = FakeCluster(cpus=4)
    cluster.hosts = frozenset({"10.1.0.1", "10.1.0.2"})  # the Ray nodes the jobs' workers run on
    cluster.pushing = False  # these tests push for the drivers, over HTTP
    return cluster


@pytest.fixture
def app(tmp_path, cluster):
    settings = Settings(
        data_dir=tmp_path / "service",
        token=TOKEN,
        scheduler_enabled=False,
        ray_storage_path=str(tmp_path / "ray-nodes"),
        push_url="http://gradwatch.internal:8765",
    )
    return create_app(settings, cluster=cluster)


@pytest.fixture
def api(app):
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def as_driver(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def running(job_id: str, step: int) -> RunStatus:
    """A driver's status as it pushes it."""
    return RunStatus(
        job_id=job_id,
        state="running",
        step=step,
        max_steps=3,
        world_size=2,
        train_loss=0.25,
        phase="rapid_learning",
        nodes={"0": "n-a", "1": "n-b"},
        endpoints=[
            Endpoint(rank=0, host="10.1.0.1", port=9001, node="n-a"),
            Endpoint(rank=1, host="10.1.0.2", port=9002, node="n-b"),
        ],
        updated_at=time.time(),
    )


def status(job_id: str, step: int) -> dict:
    return running(job_id, step).model_dump(mode="json")


def finished(job_id: str, train_loss: float, wall_seconds: float) -> RunResult:
    return RunResult(
        job_id=job_id,
        state="succeeded",
        steps=3,
        world_size=2,
        train_loss=train_loss,
        wall_seconds=wall_seconds,
        run_dir=f"/nodes/runs/{job_id}",
    )


def start_two(api, app, cluster) -> tuple[str, str]:
    a = api.post("/v1/jobs", json=spec("a", workers=2, steps=3)).json()["id"]
    b = api.post("/v1/jobs", json=spec("b", workers=1, steps=50)).json()["id"]
    app.state.launcher.tick()
    assert {api.get(f"/v1/jobs/{j}").json()["state"] for j in (a, b)} == {"running"}
    return a, b


def test_the_driver_gets_its_spec_the_service_url_and_a_token_for_its_job_only(api, app, cluster, tmp_path):
    a, b = start_two(api, app, cluster)
    env_a, env_b = cluster.envs[a], cluster.envs[b]
    assert env_a["GRADWATCH_PUSH_URL"] == "http://gradwatch.internal:8765"
    assert env_a["GRADWATCH_PUSH_TOKEN"] != env_b["GRADWATCH_PUSH_TOKEN"]
    assert app.state.auth.verify(env_a["GRADWATCH_PUSH_TOKEN"]).job_id == a
    assert '"name": "a"' in env_a["GRADWATCH_SPEC_JSON"]
    assert f"--storage-path {tmp_path / 'ray-nodes'}" in cluster.jobs[a].log[0]
    assert TOKEN not in str(env_a)  # the driver never holds the service's own token
    # Ray Train's controller is an actor of the job: it gets the job's settings, not Ray's defaults
    assert {k: env_a.get(k) for k in RAY_TRAIN_ENV} == RAY_TRAIN_ENV


def test_pushed_progress_events_and_result_are_all_the_service_needs(api, app, cluster, tmp_path):
    a, _ = start_two(api, app, cluster)
    driver = as_driver(cluster.envs[a]["GRADWATCH_PUSH_TOKEN"])
    cluster.advance(2)  # the fake driver writes its files where the service cannot look
    app.state.launcher.tick()
    assert api.get(f"/v1/jobs/{a}").json()["step"] is None
    event = {"kind": "anomaly", "name": "loss_spike", "step": 2, "raised": True}
    reply = api.post(f"/v1/jobs/{a}/progress", json={"status": status(a, 2), "events": [event]}, headers=driver)
    assert reply.status_code == 200 and reply.json() == {"state": "running", "stop_requested": None}
    detail = api.get(f"/v1/jobs/{a}").json()
    assert (detail["step"], detail["train_loss"], detail["nodes"]) == (2, 0.25, {"0": "n-a", "1": "n-b"})
    assert [t["targets"] for t in api.get("/v1/targets").json() if t["labels"]["job_id"] == a] == [
        ["10.1.0.1:9001"],
        ["10.1.0.2:9002"],
    ]
    app.state.launcher.tick()  # a pass with no status.json in reach keeps what was pushed
    assert api.get(f"/v1/jobs/{a}").json()["step"] == 2
    assert app.state.store.jobs.get(a).events == [event]

    result = finished(a, 0.125, 9.0).model_dump(mode="json")
    assert api.post(f"/v1/jobs/{a}/progress", json={"status": status(a, 3)}, headers=driver).status_code == 200
    assert api.post(f"/v1/jobs/{a}/result", json={"result": result}, headers=driver).status_code == 200
    cluster.advance(5)  # Ray reports the job ended
    app.state.launcher.tick()
    done = api.get(f"/v1/jobs/{a}").json()
    assert done["state"] == "succeeded" and done["reason"] == "finished 3 steps, train loss 0.125, in 9 s"
    assert done["step"] == 3 and done["endpoints"] == []
    assert not (tmp_path / "service" / "runs" / a).exists()
    # the job ended: its driver's token is void, and even the admin's report is refused
    assert api.post(f"/v1/jobs/{a}/progress", json={"status": status(a, 4)}, headers=driver).status_code == 401
    late = api.post(f"/v1/jobs/{a}/progress", json={"status": status(a, 4)})
    assert late.status_code == 409 and "no longer taken" in late.json()["detail"]


def test_a_driver_token_cannot_read_or_change_another_job(api, app, cluster):
    a, b = start_two(api, app, cluster)
    token_a = cluster.envs[a]["GRADWATCH_PUSH_TOKEN"]
    with TestClient(app) as anonymous:
        driver = as_driver(token_a)
        other = anonymous.post(f"/v1/jobs/{b}/progress", json={"status": status(b, 1)}, headers=driver)
        assert other.status_code == 403 and other.json()["detail"].startswith(f"only job {b}'s own token")
        assert anonymous.post(f"/v1/jobs/{b}/result", json={"result": {}}, headers=driver).status_code == 403
        for method, path in (
            ("GET", f"/v1/jobs/{b}"),
            ("GET", f"/v1/jobs/{a}"),
            ("GET", "/v1/jobs"),
            ("POST", f"/v1/jobs/{b}/cancel"),
            ("GET", "/v1/targets"),
            ("GET", "/v1/alerts"),
            ("GET", f"/v1/jobs/{b}/logs"),
        ):
            refused = anonymous.request(method, path, headers=driver)
            assert refused.status_code == 403 and "lacks scope" in refused.json()["detail"], (method, path)
        # no token gets nothing
        assert anonymous.post(f"/v1/jobs/{a}/progress", json={"status": status(a, 1)}).status_code == 401
    assert api.get(f"/v1/jobs/{b}").json()["state"] == "running" and api.get(f"/v1/jobs/{b}").json()["step"] is None


class FlakyService(TestClient):
    """The API, unreachable for the first `down` requests (a restarting service)."""

    def __init__(self, app, down: int):
        super().__init__(app)
        self.down, self.bodies = down, []

    def request(self, method, url, **kwargs):
        if self.down > 0:
            self.down -= 1
            raise httpx.ConnectError("connection refused")
        self.bodies.append(kwargs.get("json"))
        return super().request(method, url, **kwargs)


def test_the_driver_side_keeps_events_through_an_outage_and_delivers_the_result(api, app, cluster):
    a, _ = start_two(api, app, cluster)
    flaky = FlakyService(app, down=2)
    pusher = Pusher("http://unused", cluster.envs[a]["GRADWATCH_PUSH_TOKEN"], a, client=flaky)
    first = {"kind": "anomaly", "name": "plateau", "step": 1}
    second = {"kind": "phase", "name": "refinement", "step": 2}
    pusher.listener(running(a, 1), [first])
    pusher.listener(running(a, 2), [second])
    wait_for(
        lambda: (app.state.store.jobs.get(a).run_status or {}).get("step") == 2,
        timeout=20,
        what="the pushed status after the outage",
    )
    assert app.state.store.jobs.get(a).events == [first, second]  # none lost, none twice
    result = finished(a, 0.5, 2.0)
    assert pusher.finish(result)
    assert flaky.bodies[-1] == {"result": result.model_dump(mode="json")}
    assert app.state.store.jobs.get(a).final_result() == result
    cluster.advance(5)
    app.state.launcher.tick()
    assert api.get(f"/v1/jobs/{a}").json()["reason"].startswith("finished 3 steps, train loss 0.5")
