"""Values that pass a type check but must not be stored: infinities, NaN, binary data, a job no cluster
can hold, and a job left in the queue past its max_queued. Through the HTTP app with an in-memory Ray
(FakeCluster: the scheduler's contract with Ray, as in test_api.py) and the real store."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from gradwatch.spec import SpecError, load_spec
from service.api.routes import create_app
from service.scheduler.launcher import Launcher
from service.settings import Settings
from service.store.store import Store
from tests.service.fakes import FakeCluster, spec

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = (
    "name: x\nmodel: {name: mlp, hidden: [16]}\ndata: {name: synthetic-classification, n_samples: 512}\n"
    "max_steps: 3\nscaling: {num_workers: 1}\n"
)


@pytest.fixture(autouse=True)
def testserver_is_an_allowed_host(monkeypatch):
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False, allow_user_code=True)


@pytest.fixture
def app(settings):
    return create_app(settings, cluster=FakeCluster(cpus=4))


@pytest.fixture
def api(app):
    with TestClient(app, headers=AUTH) as client:
        yield client


def stored(app) -> int:
    return sum(app.state.store.jobs.count_by_state().values())


def post_yaml(api, text: str):
    return api.post("/v1/jobs", content=text, headers={"Content-Type": "application/yaml"})


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("grad_clip: 1e999", "grad_clip"),
        ("grad_clip: .nan", "grad_clip"),
        ("timeout: .inf", "timeout"),
        ("telemetry: {detectors: {spike_z: .inf}}", "telemetry.detectors.spike_z"),
        ("timeout: '" + "9" * 400 + "'", "timeout"),
        ("max_queued: .inf", "max_queued"),
    ],
)
def test_a_non_finite_number_is_a_422_naming_its_field(api, app, extra, field):
    response = post_yaml(api, BASE + extra + "\n")
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    assert any(e.startswith(f"{field}: ") for e in errors), errors
    assert stored(app) == 0


def test_json_infinity_is_refused_too(api, app):
    body = '{"name": "x", "model": {"name": "mlp"}, "data": {"name": "digits"}, "max_steps": 3, "grad_clip": 1e999}'
    response = api.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and any(e.startswith("grad_clip: ") for e in response.json()["errors"])
    assert stored(app) == 0


def test_binary_dates_and_sets_in_train_config_are_a_422_not_a_500(api, app):
    text = (
        "name: x\nmax_steps: 3\nscaling: {num_workers: 1}\ntrain:\n  entrypoint: 'tests.workers.user_code:train'\n"
        "  config: {blob: !!binary /w==, day: 2001-02-03, tags: !!set {a: null}, far: .inf}\n"
    )
    response = post_yaml(api, text)
    assert response.status_code == 422, response.text
    errors = response.json()["errors"]
    for path, what in [
        ("train.config.blob", "binary data"),
        ("train.config.day", "date"),
        ("train.config.tags", "set"),
        ("train.config.far", "non-finite"),
    ]:
        assert any(e.startswith(f"{path}: ") and what in e and "base64" in e for e in errors), (path, errors)
    assert stored(app) == 0
    assert api.get("/v1/jobs").status_code == 200  # the service still answers


def test_a_bad_value_and_other_errors_come_together():
    with pytest.raises(SpecError) as refused:
        load_spec(BASE.replace("max_steps: 3", "max_steps: 0") + "grad_clip: .inf\n")
    fields = {line.split(":", 1)[0] for line in refused.value.errors}
    assert {"max_steps", "grad_clip"} <= fields


def test_a_job_bigger_than_the_whole_cluster_is_refused_at_submit(api, app):
    huge = spec("huge")
    huge["scaling"] = {"num_workers": 4096, "cpus_per_worker": 1024}
    response = api.post("/v1/jobs", json=huge)
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error.startswith("scaling: the job needs") and "the whole Ray cluster has 4 CPUs" in error
    assert "lower scaling.num_workers" in error
    assert stored(app) == 0
    fits = api.post("/v1/jobs", json=spec("fits", workers=2))
    assert fits.status_code == 201, fits.text


def test_a_cluster_that_cannot_be_reached_does_not_refuse_a_job(settings):
    cluster = FakeCluster(cpus=1)
    cluster.down = True
    with TestClient(create_app(settings, cluster=cluster), headers=AUTH) as api:
        response = api.post("/v1/jobs", json=spec("later", workers=8))
    assert response.status_code == 201, response.text  # the scheduler judges it when Ray answers


def test_a_job_queued_past_its_max_queued_ends_failed_with_what_it_waited_for(tmp_path):
    settings = Settings(data_dir=tmp_path, token="t", poll_interval=0.05)
    store = Store(settings.database_url)
    try:
        cluster = FakeCluster(cpus=1)
        launcher = Launcher(store, settings, cluster)
        blocker = store.jobs.create(load_spec(spec("blocker", workers=1, steps=100)))
        waiting = store.jobs.create(load_spec(spec("waiting", workers=1, max_queued="30m")))
        patient = store.jobs.create(load_spec(spec("patient", workers=1, max_queued=None)))
        launcher.tick()  # the blocker takes the cluster's one CPU
        assert store.jobs.get(blocker.id).state == "running"
        assert store.jobs.get(waiting.id).state == "queued" and store.jobs.get(waiting.id).reason
        with store.db.write() as session:  # the jobs were submitted 31 minutes ago
            for job_id in (waiting.id, patient.id):
                row = session.get(type(store.jobs.get(job_id)), job_id)
                row.created_at -= 31 * 60
        launcher.tick()
        ended = store.jobs.get(waiting.id)
        assert ended.state == "failed"
        assert ended.reason.startswith("queued for 31m") and "over its max_queued of 30m" in ended.reason
        assert "it was waiting for" in ended.reason
        assert store.jobs.get(patient.id).state == "queued"
    finally:
        store.close()
