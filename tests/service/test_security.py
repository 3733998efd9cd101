"""The service's security model, one test per hole it closes: who may do what with which token,
what a web page can no longer send, what a spec can no longer read, and the bounds on inputs.

Everything runs against the real app (FastAPI's TestClient, or uvicorn for the CLI) with the
in-memory Ray of tests/service/fakes.py.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import event

from gradwatch.spec import DATA_ROOTS_ENV, MAX_SPEC_NODES
from service.api.routes import JobReporter, create_app
from service.auth import JOB_TOKEN_FILE_ENV, consumer_token, consumer_token_file, split_token
from service.scheduler.launcher import Launcher
from service.scheduler.local_ray import ray_environment
from service.settings import Settings
from service.store.alerts import AlertUpdate
from tests.service.fakes import FakeCluster, spec

ADMIN = "operator-s3cret"
REPO = Path(__file__).resolve().parents[2]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = {
        "data_dir": tmp_path / "data",
        "token": ADMIN,
        "allowed_hosts": "testserver",
        "scheduler_enabled": False,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def cluster():
    return FakeCluster(cpus=8)


@pytest.fixture
def app(tmp_path, cluster):
    return create_app(make_settings(tmp_path), cluster=cluster)


@pytest.fixture
def http(app):
    with TestClient(app) as client:
        yield client


@pytest.fixture
def tokens(app):
    store = app.state.store
    return {
        "alice": store.users.add("alice", ["submit"]),
        "bob": store.users.add("bob", ["submit"]),
        "reader": store.users.add("reader", ["read"]),
        "operator": store.users.add("operator", ["read-all"]),
        "opsubmit": store.users.add("opsubmit", ["read-all", "submit"]),
        "admin": ADMIN,
        "prometheus": consumer_token(app.state.settings, "prometheus"),
        "alertmanager": consumer_token(app.state.settings, "alertmanager"),
    }


def submit_as(http, token, body=None, **kw):
    return http.post("/v1/jobs", json=body or spec(**kw), headers=bearer(token))


# ------------------------------------------------------------ users and scopes
def test_tokens_are_shown_once_and_stored_hashed(app, tokens):
    db = Path(app.state.settings.database_url.split("///", 1)[1])
    stored = db.read_bytes() + b"".join(p.read_bytes() for p in db.parent.glob("gradwatch.db-*"))
    secret = split_token(tokens["alice"])[1]  # the secret may hold "_" itself: split as the service does
    assert secret.encode() not in stored and tokens["alice"].encode() not in stored
    assert app.state.store.users.authenticate(tokens["alice"]).user == "alice"
    last = tokens["alice"][-1]
    assert app.state.store.users.authenticate(tokens["alice"][:-1] + ("y" if last == "x" else "x")) is None


def test_owner_is_the_token_user_never_the_spec(http, tokens):
    job = submit_as(http, tokens["alice"], name="mine").json()
    assert job["owner"] == "alice" and job["spec"]["owner"] == "alice"
    forged = submit_as(http, tokens["alice"], owner="bob")
    assert forged.status_code == 422
    assert forged.json()["errors"][0].startswith("owner: a job belongs to the user of the token that submits it")


def test_only_the_owner_or_an_admin_cancels(http, tokens):
    job = submit_as(http, tokens["alice"]).json()
    # bob cannot see alice's job: the same 404 as for no job at all
    unseen = http.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens["bob"]))
    assert unseen.status_code == 404 and unseen.json()["detail"].startswith(f"no job {job['id']!r}")
    # an operator who reads every job (read-all) and submits still cancels only their own
    refused = http.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens["opsubmit"]))
    assert refused.status_code == 403
    assert refused.json()["detail"] == (f"job {job['id']} belongs to alice: only its owner or an admin may cancel it")
    assert http.get(f"/v1/jobs/{job['id']}", headers=bearer(tokens["alice"])).json()["state"] == "queued"
    own = http.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(tokens["alice"]))
    assert own.status_code == 200 and own.json()["state"] == "cancelled"
    other = submit_as(http, tokens["bob"]).json()
    by_admin = http.post(f"/v1/jobs/{other['id']}/cancel", headers=bearer(tokens["admin"]))
    assert by_admin.status_code == 200 and by_admin.json()["state"] == "cancelled"


def test_a_priority_above_the_ceiling_needs_an_admin(http, tokens, app):
    ceiling = app.state.settings.max_priority
    refused = submit_as(http, tokens["alice"], priority=100)
    assert refused.status_code == 403
    assert refused.json()["detail"].startswith(f"priority 100 is above this server's ceiling of {ceiling}")
    assert submit_as(http, tokens["alice"], priority=ceiling).status_code == 201
    assert submit_as(http, tokens["admin"], priority=100).status_code == 201


def test_a_read_token_reads_and_changes_nothing(http, tokens):
    job = submit_as(http, tokens["alice"]).json()
    reader, operator = bearer(tokens["reader"]), bearer(tokens["operator"])
    assert http.get("/v1/jobs", headers=reader).status_code == 200
    assert http.get(f"/v1/jobs/{job['id']}/logs", headers=operator).status_code == 200
    assert http.get("/v1/alerts", headers=reader).status_code == 200
    for response in (
        submit_as(http, tokens["reader"]),
        http.post(f"/v1/jobs/{job['id']}/cancel", headers=reader),
        http.post(f"/v1/jobs/{job['id']}/cancel", headers=operator),
        http.post("/v1/alerts", json=webhook(alert("gw-x")), headers=reader),
        submit_as(http, tokens["operator"]),
    ):
        assert response.status_code == 403, response.text
        assert "lacks scope" in response.json()["detail"]
    assert http.get("/v1/targets", headers=reader).status_code == 403


def test_prometheus_and_alertmanager_tokens_open_only_their_routes(http, tokens):
    prometheus, alertmanager = bearer(tokens["prometheus"]), bearer(tokens["alertmanager"])
    assert http.get("/v1/targets", headers=prometheus).status_code == 200
    assert http.get("/metrics", headers=prometheus).status_code == 200
    assert http.post("/v1/alerts", json=webhook(alert("gw-x")), headers=alertmanager).status_code == 200
    for headers, method, path in (
        (prometheus, "get", "/v1/jobs"),
        (prometheus, "post", "/v1/alerts"),
        (alertmanager, "get", "/v1/jobs"),
        (alertmanager, "get", "/v1/targets"),
        (alertmanager, "post", "/v1/jobs"),
    ):
        kwargs = {"json": webhook(alert("gw-y"))} if method == "post" else {}
        assert getattr(http, method)(path, headers=headers, **kwargs).status_code == 403, (method, path)


def test_a_person_cannot_rewrite_a_firing_alert(http, tokens):
    firing = alert("gw-victim", status="firing", severity="critical")
    assert http.post("/v1/alerts", json=webhook(firing), headers=bearer(tokens["alertmanager"])).status_code == 200
    forged = {**firing, "status": "resolved", "endsAt": "2026-01-02T03:05:00Z"}
    for who in ("alice", "reader"):
        response = http.post("/v1/alerts", json=webhook(forged), headers=bearer(tokens[who]))
        assert response.status_code == 403
    stored = http.get("/v1/alerts", params={"job_id": "gw-victim"}, headers=bearer(tokens["operator"])).json()["data"]
    assert [(a["status"], a["severity"]) for a in stored] == [("firing", "critical")]


def test_a_revoked_user_is_refused_at_once(http, app, tokens):
    assert http.get("/v1/jobs", headers=bearer(tokens["bob"])).status_code == 200
    assert app.state.store.users.revoke("bob") == 1
    response = http.get("/v1/jobs", headers=bearer(tokens["bob"]))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_queued_jobs_are_capped_per_user_and_in_all(tmp_path, cluster):
    app = create_app(make_settings(tmp_path, max_queued_per_user=2, max_queued_jobs=3), cluster=cluster)
    with TestClient(app) as http:
        alice, bob = (app.state.store.users.add(n, ["submit"]) for n in ("alice", "bob"))
        assert [submit_as(http, alice).status_code for _ in range(2)] == [201, 201]
        third = submit_as(http, alice)
        assert third.status_code == 429
        assert third.json()["detail"].startswith("alice already has 2 jobs queued, the limit per user")
        assert submit_as(http, bob).status_code == 201
        full = submit_as(http, bob)
        assert full.status_code == 429 and full.json()["detail"].startswith("the queue is full (3 jobs queued")
        assert sum(app.state.store.jobs.count_by_state().values()) == 3


def test_running_jobs_are_capped_per_user(tmp_path, cluster):
    app = create_app(make_settings(tmp_path, max_running_per_user=1), cluster=cluster)
    with TestClient(app) as http:
        alice, bob = (app.state.store.users.add(n, ["submit"]) for n in ("alice", "bob"))
        first, second = (submit_as(http, alice, steps=100).json() for _ in range(2))
        other = submit_as(http, bob, steps=100).json()
        app.state.launcher.tick()
        jobs = [app.state.store.jobs.get(j["id"]) for j in (first, second, other)]
        assert [job.state for job in jobs] == ["running", "queued", "running"]
        assert jobs[1].reason == "waiting: alice already runs 1 jobs, the limit per user"


# ------------------------------------------------------- a job's own token
@pytest.fixture
def progress_route(app):
    """A stand-in for a job's progress route, guarded the way such a route must be (JobReporter)."""
    router = APIRouter()

    @router.post("/v1/jobs/{job_id}/progress-check")
    def progress(job_id: str, who: JobReporter) -> dict:
        return {"user": who.user, "job_id": who.job_id}

    app.include_router(router)
    return "/v1/jobs/{}/progress-check"


def test_a_job_token_is_minted_at_launch_for_that_job_only(http, app, cluster, tokens, progress_route):
    mine, other = (submit_as(http, tokens["alice"], steps=100).json() for _ in range(2))
    app.state.launcher.tick()
    token_file = app.state.settings.jobs_dir / mine["id"] / "job.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    launched = cluster.jobs[mine["id"]]
    assert launched.env[JOB_TOKEN_FILE_ENV] == str(token_file)
    # the path, and the token itself for nodes that cannot read the service's disk (service/scheduler/push.py)
    assert launched.env["GRADWATCH_PUSH_TOKEN"] == token_file.read_text().strip()
    job_token = bearer(token_file.read_text().strip())

    ok = http.post(progress_route.format(mine["id"]), headers=job_token)
    assert ok.status_code == 200 and ok.json() == {"user": "alice", "job_id": mine["id"]}
    assert http.post(progress_route.format(other["id"]), headers=job_token).status_code == 403
    assert http.post(progress_route.format(mine["id"]), headers=bearer(tokens["alice"])).status_code == 403
    for method, path in (
        ("get", "/v1/jobs"),
        ("get", f"/v1/jobs/{mine['id']}"),
        ("get", "/v1/targets"),
        ("post", f"/v1/jobs/{mine['id']}/cancel"),
        ("get", "/metrics"),
    ):
        assert getattr(http, method)(path, headers=job_token).status_code == 403, path

    http.post(f"/v1/jobs/{mine['id']}/cancel", headers=bearer(tokens["alice"]))
    app.state.launcher.tick()
    assert app.state.store.jobs.get(mine["id"]).state == "cancelled"
    assert http.post(progress_route.format(mine["id"]), headers=job_token).status_code == 401


# -------------------------------------------------------- no anonymous server
def test_create_app_refuses_to_start_without_a_token(tmp_path, cluster):
    with pytest.raises(RuntimeError, match="refusing to start without authentication"):
        create_app(Settings(data_dir=tmp_path / "empty", token=None), cluster=cluster)


def test_create_app_refuses_a_wildcard_bind_with_only_loopback_names(tmp_path, cluster):
    with pytest.raises(ValueError, match="GRADWATCH_ALLOWED_HOSTS"):
        create_app(Settings(data_dir=tmp_path, token=ADMIN, host="0.0.0.0"), cluster=cluster)
    assert create_app(make_settings(tmp_path, host="0.0.0.0", allowed_hosts="gw.example"), cluster=cluster)


def test_uvicorn_factory_launch_refuses_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWATCH_")}
    env.update(GRADWATCH_DATA_DIR=str(tmp_path / "data"), RAY_ADDRESS="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "service.api.main:create_app", "--factory", "--port", "0"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "refusing to start without authentication" in done.stderr


@pytest.mark.parametrize(
    "headers,code,detail",
    [
        ({"Host": "attacker.example"}, 403, "Host 'attacker.example' is not a name this server answers to"),
        ({"Host": "attacker.example:8765"}, 403, "is not a name this server answers to"),
        ({"Origin": "http://attacker.example"}, 403, "cross-origin request refused"),
        ({"Origin": "http://localhost:3000"}, 403, "cross-origin request refused"),
        ({"Origin": "null"}, 403, "cross-origin request refused"),
        ({"Sec-Fetch-Site": "cross-site"}, 403, "cross-site request refused"),
        ({"Sec-Fetch-Site": "same-site"}, 403, "cross-site request refused"),
        ({"Content-Type": "text/plain"}, 415, "a body of type 'text/plain' is not accepted"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "is not accepted"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415, "is not accepted"),
    ],
)
def test_what_a_web_page_could_send_is_refused(http, app, headers, code, detail):
    body = json.dumps(spec("drive-by"))
    response = http.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json", **bearer(ADMIN), **headers}
    )
    assert response.status_code == code and detail in response.json()["detail"], response.text
    assert sum(app.state.store.jobs.count_by_state().values()) == 0


def test_a_page_cannot_cancel_a_job(http, app):
    job = http.post("/v1/jobs", json=spec("target"), headers=bearer(ADMIN)).json()
    for headers in (
        {"Origin": "http://attacker.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Host": "rebound.attacker.example"},
    ):
        response = http.post(f"/v1/jobs/{job['id']}/cancel", headers={**bearer(ADMIN), **headers})
        assert response.status_code == 403, headers
    assert app.state.store.jobs.get(job["id"]).state == "queued"


def test_same_origin_requests_and_bodyless_posts_pass(http):
    job = http.post(
        "/v1/jobs",
        json=spec("ok"),
        headers={**bearer(ADMIN), "Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
    )
    assert job.status_code == 201
    cancelled = http.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=bearer(ADMIN))
    assert cancelled.status_code == 200


def test_loopback_names_are_allowed_by_default(tmp_path, cluster):
    app = create_app(Settings(data_dir=tmp_path, token=ADMIN), cluster=cluster)
    with TestClient(app, base_url="http://127.0.0.1:8765", headers=bearer(ADMIN)) as http:
        assert http.get("/v1/jobs").status_code == 200
        assert http.get("/v1/jobs", headers={"Host": "localhost:8765"}).status_code == 200
        assert http.get("/v1/jobs", headers={"Host": "[::1]:8765"}).status_code == 200
        assert http.get("/v1/jobs", headers={"Host": "testserver"}).status_code == 403


# --------------------------------------------------- no server files via specs
def text_spec(path: str, **data) -> dict:
    return spec("reader", model={"name": "char-transformer"}, data={"name": "text", "path": path, **data})


@pytest.mark.parametrize("path", ["/root/.gradwatch/token", "/dev/zero", "/etc/passwd", "relative.txt"])
def test_data_path_is_refused_without_data_roots(http, app, path):
    response = http.post("/v1/jobs", json=text_spec(path), headers=bearer(ADMIN))
    assert response.status_code == 422
    assert response.json()["errors"][0].startswith("data.path: this server reads no files named in specs")
    assert sum(app.state.store.jobs.count_by_state().values()) == 0


def test_data_path_outside_the_roots_is_refused_alike_whether_it_exists_or_not(tmp_path, cluster):
    root = tmp_path / "corpora"
    root.mkdir()
    (root / "book.txt").write_text("the quick brown fox " * 50)
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 1234)
    app = create_app(make_settings(tmp_path, data_roots=str(root)), cluster=cluster)
    with TestClient(app, headers=bearer(ADMIN)) as http:
        assert http.post("/v1/jobs", json=text_spec(str(root / "book.txt"))).status_code == 201
        answers = []
        for path in (str(secret), str(tmp_path / "missing.txt"), f"{root}/../secret.txt", f"{root}/../missing.txt"):
            response = http.post("/v1/jobs", json=text_spec(path))
            assert response.status_code == 422
            answers.append(response.json()["errors"][0].split(" (got ")[0])
        assert len(set(answers)) == 1 and answers[0].startswith("data.path: only files under the data roots")


def test_user_code_servers_pass_paths_through(tmp_path, cluster):
    app = create_app(make_settings(tmp_path, allow_user_code=True), cluster=cluster)
    with TestClient(app, headers=bearer(ADMIN)) as http:
        assert http.post("/v1/jobs", json=text_spec("/srv/corpus.txt")).status_code == 201


def test_the_launch_gives_workers_the_data_roots_to_check_again(tmp_path, cluster):
    root = tmp_path / "corpora"
    app = create_app(make_settings(tmp_path, data_roots=str(root)), cluster=cluster)
    with TestClient(app, headers=bearer(ADMIN)) as http:
        job = http.post("/v1/jobs", json=spec("plain", steps=50)).json()
        app.state.launcher.tick()
        assert cluster.jobs[job["id"]].env[DATA_ROOTS_ENV] == str(root)


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"model": {"name": "mlp", "hidden": [65536] * 64}}, "270,588,706,820 parameters"),
        (
            {"data": {"name": "synthetic-classification", "n_samples": 10_000_000, "n_features": 100_000}},
            "data 7450.7 GiB",
        ),
        (
            {"model": {"name": "char-transformer", "n_layer": 48, "n_embd": 4096}, "data": {"name": "text"}},
            "parameters",
        ),
    ],
)
def test_jobs_too_big_for_a_worker_are_refused_up_front(http, app, overrides, words):
    response = http.post("/v1/jobs", json=spec("huge", **overrides), headers=bearer(ADMIN))
    assert response.status_code == 422
    error = response.json()["errors"][0]
    assert error.startswith("<spec>: the job needs about") and words in error
    assert "but a worker has 8.0 GiB" in error


# ------------------------------------------------------------- bounded inputs
def test_label_filters_are_capped(http):
    many = [("label", f"k{i}=v") for i in range(64)]
    response = http.get("/v1/jobs", params=many, headers=bearer(ADMIN))
    assert response.status_code == 422
    assert response.json()["errors"] == ["query.label: at most 16 label filters (got 64)"]
    assert http.get("/v1/jobs", params=many[:16], headers=bearer(ADMIN)).status_code == 200


def test_webhook_alert_count_and_sizes_are_capped(http, tokens):
    am = bearer(tokens["alertmanager"])
    too_many = webhook(*(alert(f"gw-{i}") for i in range(1001)))
    response = http.post("/v1/alerts", json=too_many, headers=am)
    assert response.status_code in (413, 422)
    assert "1000" in json.dumps(response.json())
    big_label = alert("gw-x", labels={"team": "x" * 2000})
    response = http.post("/v1/alerts", json=webhook(big_label), headers=am)
    assert response.status_code == 422 and response.json()["errors"][0].startswith("alerts.0.labels.team")
    big = alert("gw-x", annotations={f"a{i}": "y" * 8000 for i in range(3)})
    response = http.post("/v1/alerts", json=webhook(big), headers=am)
    assert response.status_code == 422
    assert "over the 16384 limit of one alert" in response.json()["errors"][0]
    assert http.get("/v1/alerts", headers=bearer(ADMIN)).json()["data"] == []


def test_the_webhook_writes_in_bounded_transactions(app):
    store = app.state.store
    writes = []

    @event.listens_for(store.engine, "begin")
    def count(connection):
        if connection.get_execution_options().get("gw_write"):
            writes.append(1)

    updates = [
        AlertUpdate(
            fingerprint=f"fp{i}",
            status="firing",
            starts_at=1.0,
            ends_at=None,
            labels={"alertname": "A", "job_id": f"gw-{i}"},
            annotations={},
        )
        for i in range(250)
    ]
    assert store.alerts.ingest(updates) == (250, 0, 0)
    assert len(writes) == 3  # 100 + 100 + 50


def test_a_spec_with_thousands_of_keys_is_refused_quickly(http):
    letters = string.ascii_letters + string.digits
    keys = ("".join(p) for p in itertools.product(letters, repeat=3))
    body = "{" + ",".join(f"{k}: 0" for k in itertools.islice(keys, 30_000)) + "}"  # YAML flow mapping
    assert len(body) < 256 * 1024
    start = time.perf_counter()
    response = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/yaml", **bearer(ADMIN)})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        f"<spec>: more than {MAX_SPEC_NODES} keys and values (at line 1); a spec needs a few dozen"
    ]
    assert time.perf_counter() - start < 2.0


def test_spec_parsing_runs_off_the_event_loop(http, monkeypatch):
    import service.api.routes

    parsing, release = threading.Event(), threading.Event()
    real = service.api.routes.load_spec

    def slow_parse(*args, **kwargs):
        parsing.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(service.api.routes, "load_spec", slow_parse)
    result = {}
    submitter = threading.Thread(
        target=lambda: result.update(r=http.post("/v1/jobs", json=spec("slow"), headers=bearer(ADMIN)))
    )
    submitter.start()
    assert parsing.wait(10)
    start = time.perf_counter()
    assert http.get("/healthz").status_code == 200  # answered while the spec is still being parsed
    assert time.perf_counter() - start < 5
    release.set()
    submitter.join(10)
    assert result["r"].status_code == 201


def test_log_following_reads_only_new_bytes(tmp_path, cluster):
    app = create_app(make_settings(tmp_path, poll_interval=30), cluster=cluster)
    with TestClient(app, headers=bearer(ADMIN)) as http:
        job = http.post("/v1/jobs", json=spec("logged", steps=3)).json()
        launcher: Launcher = app.state.launcher
        launcher.tick()
        stored = app.state.store.jobs.get(job["id"])
        calls = []
        real_logs = cluster.logs
        cluster.logs = lambda sid: calls.append(sid) or real_logs(sid)
        first = launcher.log_bytes(stored, 0, 10)
        for _ in range(20):  # many followers in one poll interval: one fetch from Ray
            assert launcher.log_bytes(stored, 0, 10) == first
        assert len(calls) == 1 and first == b"Running en"
        assert launcher.log_bytes(stored, 8, 4) == b"en" + b"tr"
        cluster.advance(5)
        launcher.tick()  # ended: the saved copy is read from the offset on
        saved = app.state.settings.jobs_dir / job["id"] / "driver.log"
        text = saved.read_bytes()
        assert launcher.log_bytes(app.state.store.jobs.get(job["id"]), len(text) - 5, 100) == text[-5:]
        assert http.get(f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}).content == text


# ---------------------------------------------------------------- the rest
def test_control_characters_are_refused_in_specs(http):
    for extra in ({"owner": "a\x1b]52;c;aGk=\x07"}, {"labels": {"team": "\x1b[2J"}}):
        response = http.post("/v1/jobs", json=spec("esc", **extra), headers=bearer(ADMIN))
        assert response.status_code == 422
        assert response.json()["errors"][0].startswith("<spec>: control characters are not allowed in a spec")
        assert "\x1b" not in response.text and "\\u001b" not in response.text


def test_user_code_is_checked_again_at_launch(tmp_path, cluster):
    store_dir = tmp_path / "shared"
    lenient = create_app(make_settings(store_dir, allow_user_code=True), cluster=cluster)
    with TestClient(lenient, headers=bearer(ADMIN)) as http:
        job = http.post("/v1/jobs", json=spec("custom", model={"name": "mypkg.models:build"})).json()
    strict = create_app(make_settings(store_dir), cluster=cluster)
    strict.state.launcher.tick()
    failed = strict.state.store.jobs.get(job["id"])
    assert failed.state == "failed"
    assert failed.reason.startswith("this server no longer runs the job's spec: model.name: user code")
    assert job["id"] not in cluster.submitted


def test_the_data_directory_and_store_are_private(tmp_path, cluster):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    app = create_app(make_settings(tmp_path), cluster=cluster)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db = Path(app.state.settings.database_url.split("///", 1)[1])
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    path = consumer_token_file(app.state.settings, "prometheus")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.parent == data


def test_the_local_ray_head_gets_no_service_secrets():
    env = ray_environment(
        {
            "PATH": "/bin",
            "HOME": "/root",
            "RAY_AUTH_MODE": "token",
            "LC_ALL": "C",
            "GRADWATCH_TOKEN": "s3cret",
            "GRADWATCH_ALERTMANAGER_TOKEN": "a",
            "AWS_SECRET_ACCESS_KEY": "k",
            "GRAFANA_TOKEN": "g",
        }
    )
    assert env == {"PATH": "/bin", "HOME": "/root", "RAY_AUTH_MODE": "token", "LC_ALL": "C"}


def test_a_lost_submit_that_lands_later_is_stopped(tmp_path, cluster, app, http):
    job = http.post("/v1/jobs", json=spec("lost", steps=100), headers=bearer(ADMIN)).json()
    cluster.refuse_submits = True
    app.state.launcher.tick()
    assert app.state.store.jobs.get(job["id"]).state == "failed"
    cluster.refuse_submits = False
    # The submit Ray never answered lands after all, and starts running.
    spec_file = app.state.settings.jobs_dir / job["id"] / "spec.json"
    cluster.submit(
        job["id"],
        f"python -m workers.driver --spec-file {spec_file} --job-id {job['id']} --storage-path {tmp_path}",
        {},
        {},
    )
    cluster.advance()
    assert cluster.status(job["id"]).status == "RUNNING"
    app.state.launcher.tick()
    assert cluster.status(job["id"]).status == "STOPPED"
    assert app.state.store.jobs.get(job["id"]).state == "failed"


# ------------------------------------------------------------------ helpers
def alert(job_id, status="firing", severity="warning", labels=None, annotations=None):
    return {
        "status": status,
        "labels": {"alertname": "TrainingDiverging", "job_id": job_id, "severity": severity, **(labels or {})},
        "annotations": annotations or {"summary": f"diverging {job_id}"},
        "startsAt": "2026-01-02T03:04:05Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": f"fp-{job_id}",
    }


def webhook(*alerts):
    return {"version": "4", "status": "firing", "receiver": "gradwatch", "alerts": list(alerts)}
