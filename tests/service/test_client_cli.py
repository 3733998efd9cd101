"""The SDK and the CLI against a live server (uvicorn on 127.0.0.1) over an in-memory Ray."""

from __future__ import annotations

import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
import yaml
from typer.testing import CliRunner

from gradwatch.spec import load_spec
from service.api.routes import create_app
from service.cli.main import app as cli
from service.client import Client, GradwatchError
from service.settings import Settings
from tests.promstack import free_port, wait_for
from tests.service.fakes import FakeCluster, spec

TOKEN = "cli-token"


@pytest.fixture
def server(tmp_path):
    cluster = FakeCluster(cpus=4)
    settings = Settings(data_dir=tmp_path / "data", token=TOKEN, poll_interval=0.05)
    app = create_app(settings, cluster=cluster)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, timeout=20)
    running = threading.Event()
    running.set()

    def simulate() -> None:  # the fake Ray moves one step every 20 ms while `running` is set
        while not srv.should_exit:
            if running.is_set():
                cluster.advance()
            time.sleep(0.02)

    threading.Thread(target=simulate, daemon=True).start()
    yield SimpleNamespace(url=url, cluster=cluster, app=app, running=running, tmp=tmp_path)
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def client(server):
    with Client(server.url, TOKEN) as c:
        yield c


@pytest.fixture
def env(server, monkeypatch):
    monkeypatch.setenv("GRADWATCH_URL", server.url)
    monkeypatch.setenv("GRADWATCH_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "200")


def post_alert(server, job_id: str, status: str = "firing") -> None:
    alert = {
        "status": status,
        "labels": {"alertname": "TrainingLossSpike", "job_id": job_id, "severity": "warning"},
        "annotations": {"summary": "loss jumped 9 sigma"},
        "startsAt": "2026-01-02T03:04:05Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "fingerprint": f"fp-{job_id}",
    }
    httpx.post(
        f"{server.url}/v1/alerts",
        json={"version": "4", "alerts": [alert]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).raise_for_status()


# ----------------------------------------------------------------------- SDK
def test_sdk_submits_every_kind_of_spec(client, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec("from-file")))
    made = [
        client.submit(spec("from-dict")),
        client.submit(yaml.safe_dump(spec("from-text"))),
        client.submit(path),
        client.submit(str(path)),
        client.submit(load_spec(spec("from-model"))),
    ]
    assert [j["name"] for j in made] == ["from-dict", "from-text", "from-file", "from-file", "from-model"]
    listed = client.jobs(limit=3)
    assert [j["id"] for j in listed] == [j["id"] for j in made[::-1][:3]]
    assert {j["name"] for j in client.jobs(name="from-file", limit=50)} == {"from-file"}


def test_sdk_follows_a_job_to_the_end(client, server):
    job = client.submit(spec("followed", steps=10))
    lines = list(client.logs(job["id"], follow=True))
    assert lines[0].startswith("Running entrypoint") and any("step 10/10" in line for line in lines)
    done = client.wait(job["id"], timeout=10)
    assert done["state"] == "succeeded" and done["step"] == 10
    assert client.get(job["id"])["transitions"][-1]["to_state"] == "succeeded"
    assert list(client.logs(job["id"])) == lines


def test_sdk_cancel_wait_and_alerts(client, server):
    server.running.clear()  # hold the fake Ray still
    job = client.submit(spec("held", steps=1000))
    with pytest.raises(TimeoutError, match="still"):
        client.wait(job["id"], timeout=0.3, poll=0.1)
    post_alert(server, job["id"])
    assert [a["alertname"] for a in client.alerts(job["id"])] == ["TrainingLossSpike"]
    assert client.alerts("gw-nobody") == []
    client.cancel(job["id"])
    assert client.wait(job["id"], timeout=10)["state"] == "cancelled"


def test_sdk_errors_carry_the_servers_message(client, server):
    with pytest.raises(GradwatchError) as refused:
        client.submit({"name": "x", "model": {"name": "mlp"}})
    assert refused.value.status == 422
    assert refused.value.errors == ["data: field required"]
    assert "data: field required" in str(refused.value)
    with pytest.raises(GradwatchError, match="no job 'gw-000000000000'") as missing:
        client.get("gw-000000000000")
    assert missing.value.status == 404
    with pytest.raises(GradwatchError, match="invalid bearer token"):
        Client(server.url, "wrong").jobs()
    with pytest.raises(GradwatchError, match="cannot reach the gradwatch service"):
        Client(f"http://127.0.0.1:{free_port()}", TOKEN).jobs()


# ----------------------------------------------------------------------- CLI
def test_cli_submit_follow_streams_logs_and_alerts_and_exits_with_the_outcome(env, server, tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec("cli-follow", steps=60)))
    store = server.app.state.store

    def raise_an_alert() -> None:  # once the job trains, Alertmanager "calls back"
        job = wait_for(lambda: next(iter(store.jobs.listing(name="cli-follow")[0]), None), timeout=10)
        wait_for(lambda: (s := store.jobs.get(job.id).last_status()) is not None and (s.step or 0) >= 5, timeout=10)
        post_alert(server, job.id)

    helper = threading.Thread(target=raise_an_alert, daemon=True)
    helper.start()
    result = CliRunner().invoke(cli, ["submit", str(path), "--follow"])
    helper.join(5)
    assert result.exit_code == 0, result.output
    assert "submitted gw-" in result.output
    assert "step 60/60" in result.output
    assert "ALERT firing TrainingLossSpike (warning) gw-" in result.output
    assert "loss jumped 9 sigma" in result.output
    assert result.output.rstrip().splitlines()[-1].endswith("succeeded: finished 60 steps, train loss 0.01667, in 2 s")


def test_cli_submit_follow_of_a_failing_job_exits_1(env, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec("cli-fails", steps=50, labels={"fake": "fail"})))
    result = CliRunner().invoke(cli, ["submit", str(path), "-f"])
    assert result.exit_code == 1
    assert "failed: RuntimeError: boom at step 2" in result.output


def test_cli_a_run_that_ends_on_a_nonfinite_loss_is_no_plain_success(env, client, tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text(yaml.safe_dump(spec("cli-inf", steps=5, labels={"fake": "nonfinite"})))
    runner = CliRunner()
    followed = runner.invoke(cli, ["submit", str(path), "-f"])
    assert followed.exit_code == 1, followed.output
    job_id = followed.output.split()[1]
    assert f"{job_id} succeeded (warning): finished 5 steps, in 2 s, but its final train loss is inf" in followed.output
    job = client.get(job_id)
    assert (job["state"], job["warning"]) == ("succeeded", "its final train loss is inf")
    assert job["reason"].endswith("but its final train loss is inf")
    assert "succeeded (warning)" in runner.invoke(cli, ["jobs"]).output
    status = runner.invoke(cli, ["status", job_id]).output
    assert "succeeded (warning)" in status and re.search(r"\nwarning +its final train loss is inf", status)
    healthy = client.submit(spec("cli-ok", steps=5))
    assert client.wait(healthy["id"], timeout=20)["warning"] is None


def test_cli_refused_spec_prints_every_error_and_exits_2(env, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: Bad\nmodel: {name: mlp, hidden: [0]}\ndata: {name: digits}\nmax_steps: 5\n")
    result = CliRunner().invoke(cli, ["submit", str(path)])
    assert result.exit_code == 2
    assert "the job spec is not valid" in result.output
    assert "name: String should match pattern" in result.output
    assert "model.hidden.0: Input should be greater than or equal to 1 (got 0)" in result.output


def test_cli_jobs_status_logs_cancel_alerts(env, server, client):
    server.running.clear()
    job = client.submit(spec("cli-table", steps=500, labels={"team": "vision"}))
    server.app.state.launcher.wake()
    wait_for(lambda: client.get(job["id"])["state"] == "running", timeout=10)
    server.running.set()
    wait_for(lambda: (client.get(job["id"])["step"] or 0) > 2, timeout=10)
    post_alert(server, job["id"])
    runner = CliRunner()

    table = runner.invoke(cli, ["jobs"])
    assert table.exit_code == 0 and job["id"] in table.output and "running" in table.output
    as_json = runner.invoke(cli, ["jobs", "--json", "--state", "running", "--label", "team=vision"])
    assert [j["id"] for j in json.loads(as_json.output)] == [job["id"]]

    status = runner.invoke(cli, ["status", job["id"]])
    assert status.exit_code == 0
    assert "rank 0 10.0.0.7:40000" in status.output and "TrainingLossSpike" in status.output

    logs = runner.invoke(cli, ["logs", job["id"]])
    assert logs.exit_code == 0 and "Running entrypoint" in logs.output

    cancelled = runner.invoke(cli, ["cancel", job["id"]])
    assert cancelled.exit_code == 0 and f"{job['id']} cancelled: cancelled on request" in cancelled.output
    again = runner.invoke(cli, ["cancel", job["id"]])
    assert again.exit_code == 1 and "already ended cancelled" in again.output

    alerts = runner.invoke(cli, ["alerts", job["id"], "--json"])
    assert [a["alertname"] for a in json.loads(alerts.output)] == ["TrainingLossSpike"]
    assert "TrainingLossSpike" in runner.invoke(cli, ["alerts"]).output

    missing = runner.invoke(cli, ["status", "gw-000000000000"])
    assert missing.exit_code == 1 and "no job 'gw-000000000000'" in missing.output


def test_cli_uses_the_token_up_saved(server, monkeypatch, tmp_path):
    data = tmp_path / "home-data"
    data.mkdir()
    monkeypatch.delenv("GRADWATCH_TOKEN", raising=False)
    monkeypatch.setenv("GRADWATCH_DATA_DIR", str(data))
    monkeypatch.setenv("GRADWATCH_URL", server.url)
    (data / "token").write_text("not-the-token\n")  # a saved token the server does not know: refused
    refused = CliRunner().invoke(cli, ["jobs", "--json"])
    assert refused.exit_code == 1 and "(HTTP 401)" in refused.output, refused.output
    (data / "token").write_text(TOKEN + "\n")  # the one `gradwatch up` saved: let in
    result = CliRunner().invoke(cli, ["jobs", "--json"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.output), list)
