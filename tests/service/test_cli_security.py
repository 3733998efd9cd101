"""The CLI's side of the security model, against a live server (uvicorn on 127.0.0.1):
`gradwatch user add/list/revoke`, tokens never on the command line, and no terminal control
sequences from other people's text."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from service.api.routes import create_app
from service.auth import consumer_token, split_token
from service.cli.main import app as cli
from service.settings import Settings
from tests.promstack import wait_for
from tests.service.fakes import FakeCluster, spec
from tests.stack import serve_app

ADMIN = "cli-operator-token"
ESCAPES = "\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\r"


@pytest.fixture
def server(tmp_path, monkeypatch):
    data = tmp_path / "data"
    settings = Settings(data_dir=data, token=ADMIN, scheduler_enabled=False)
    app = create_app(settings, cluster=FakeCluster(cpus=4))
    with serve_app(app) as url:
        for name in ("GRADWATCH_TOKEN", "GRADWATCH_TOKEN_FILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GRADWATCH_DATA_DIR", str(data))  # `gradwatch user` opens this store
        monkeypatch.setenv("GRADWATCH_URL", url)
        yield app, url


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_user_add_list_revoke(server, tmp_path):
    app, url = server
    added = run("user", "add", "alice", "--scope", "submit")
    assert added.exit_code == 0, added.output
    token = added.stdout.strip().splitlines()[-1]
    assert token.startswith("gwt_")
    job = httpx.post(f"{url}/v1/jobs", json=spec("mine"), headers={"Authorization": f"Bearer {token}"})
    assert job.status_code == 201 and job.json()["owner"] == "alice"

    listed = run("user", "list", "--json")
    assert listed.exit_code == 0
    users = json.loads(listed.stdout)
    assert [(u["name"], u["tokens"][0]["scopes"]) for u in users] == [("alice", ["submit"])]
    parts = split_token(token)  # the secret may hold "_" itself: split as the service does
    assert parts is not None and token not in listed.stdout and parts[1] not in listed.stdout
    assert "alice" in run("user", "list").stdout

    assert run("user", "add", "alice").exit_code == 1  # exists
    bad = run("user", "add", "mallory", "--scope", "root")
    assert bad.exit_code == 1 and "unknown scope root" in bad.output
    assert run("user", "add", "Bad Name").exit_code == 1

    revoked = run("user", "revoke", "alice")
    assert revoked.exit_code == 0 and "revoked alice and 1 token" in revoked.stdout
    after = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"})
    assert after.status_code == 401


def test_tokens_come_from_the_environment_or_a_file_never_argv(server, tmp_path):
    app, url = server
    reader = app.state.store.users.add("reader", ["read"])
    on_argv = run("jobs", "--token", reader)
    assert on_argv.exit_code == 2 and "No such option" in on_argv.output
    token_file = tmp_path / "reader.token"
    token_file.write_text(reader + "\n")
    assert run("jobs", "--json", "--token-file", str(token_file)).exit_code == 0
    assert run("jobs", "--json", env={"GRADWATCH_TOKEN": reader}).exit_code == 0
    missing = run("jobs", "--token-file", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "cannot read the token file" in missing.output


def test_other_peoples_text_reaches_no_terminal_as_control_sequences(server):
    app, url = server
    alertmanager = consumer_token(app.state.settings, "alertmanager")
    job = httpx.post(f"{url}/v1/jobs", json=spec("victim"), headers={"Authorization": f"Bearer {ADMIN}"}).json()
    alert = {
        "status": "firing",
        "labels": {"alertname": f"Evil{ESCAPES}", "job_id": job["id"], "severity": f"critical{ESCAPES}"},
        "annotations": {"summary": f"look{ESCAPES}here", "description": ESCAPES},
        "startsAt": "2026-01-02T03:04:05Z",
        "fingerprint": "fp-evil",
    }
    stored = httpx.post(
        f"{url}/v1/alerts", json={"alerts": [alert]}, headers={"Authorization": f"Bearer {alertmanager}"}
    )
    assert stored.status_code == 200
    # The alert is kept as sent (it is Alertmanager's data); the CLI shows it inert.
    raw = httpx.get(f"{url}/v1/alerts", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert "\x1b" in raw[0]["summary"]
    env = {"GRADWATCH_TOKEN": ADMIN, "COLUMNS": "300"}
    for args in (("alerts",), ("alerts", job["id"]), ("status", job["id"])):
        shown = run(*args, env=env)
        assert shown.exit_code == 0, shown.output
        assert "lookhere" in shown.output.replace("[2J]52;c;cm0gLXJmIH4=", "")
        assert not any(c in shown.output for c in "\x1b\x07\r"), repr(shown.output)


def test_log_streams_are_capped_and_freed_when_a_follower_leaves(server):
    app, url = server
    app.state.settings.max_log_followers = 1
    headers = {"Authorization": f"Bearer {ADMIN}"}
    job = httpx.post(f"{url}/v1/jobs", json=spec("followed"), headers=headers).json()  # stays queued
    follow = f"{url}/v1/jobs/{job['id']}/logs"
    with httpx.Client(headers=headers, timeout=10) as client:
        with client.stream("GET", follow, params={"follow": "true"}) as first:
            assert first.status_code == 200
            second = client.get(follow, params={"follow": "true"})
            assert second.status_code == 429
            assert second.json()["detail"] == (
                "1 log streams are open, this server's limit (max_log_followers): try again later"
            )
            assert client.get(follow).status_code == 200  # a plain read is no stream
    wait_for(lambda: app.state.log_followers.open_streams == 0, timeout=10, what="the closed stream to be let go")
    with (
        httpx.Client(headers=headers, timeout=10) as client,
        client.stream("GET", follow, params={"follow": "true"}) as again,
    ):
        assert again.status_code == 200
