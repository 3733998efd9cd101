"""`gradwatch grafana push` against a stand-in for Grafana's HTTP API.

The stand-in exists because Grafana's server cannot be installed on these machines. It is a real
HTTP server on 127.0.0.1 that keeps folders, dashboards, alert rules and rule groups the way
Grafana's API describes them (saving a dashboard by uid replaces it, a rule uid is unique) and
records every request, so the tests see exactly what a real Grafana would be sent.
"""

import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from click.testing import Result
from typer.testing import CliRunner

from service.stack import grafana
from service.stack.grafana import GrafanaError, push_dashboards

REPO = Path(__file__).resolve().parents[2]
TOKEN = "glsa_test_token"

ALERTING_YAML = """\
apiVersion: 1
groups:
  - orgId: 1
    name: gradwatch
    folder: gradwatch
    interval: 30s
    rules:
      - uid: gradwatch-training-loss-non-finite
        title: TrainingLossNonFinite
        condition: A
        for: 0s
        data:
          - refId: A
            datasourceUid: gradwatch-prometheus
            relativeTimeRange: {from: 600, to: 0}
            model: {expr: "gradwatch_loss != gradwatch_loss", refId: A}
        labels: {severity: critical}
        annotations: {summary: "loss is not finite"}
      - uid: gradwatch-training-stalled
        title: TrainingStalled
        condition: A
        for: 10m
        data:
          - refId: A
            datasourceUid: gradwatch-prometheus
            relativeTimeRange: {from: 600, to: 0}
            model: {expr: "gradwatch_anomaly{kind=\\"plateau\\"} == 1", refId: A}
        labels: {severity: warning}
        annotations: {summary: "loss stopped improving"}
"""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafana:
    """The state a Grafana would keep, and every request it got."""

    url: str = ""
    token: str = TOKEN
    requests: list[Request] = field(default_factory=list)
    folders: dict[str, str] = field(default_factory=dict)  # uid -> title
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {dashboard, folderUid, version}
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_intervals: dict[tuple[str, str], int] = field(default_factory=dict)

    def writes(self, method: str, prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        if path.startswith("/api/folders/") and method == "GET":
            uid = parts[2]
            return (
                (200, {"uid": uid, "title": self.folders[uid]})
                if uid in self.folders
                else (404, {"message": "folder not found"})
            )
        if path == "/api/folders" and method == "POST":
            if body["uid"] in self.folders:
                return 409, {"message": "a folder with the same uid already exists"}
            self.folders[body["uid"]] = body["title"]
            return 200, {"uid": body["uid"], "title": body["title"]}
        if path == "/api/dashboards/db" and method == "POST":
            board = body["dashboard"]
            if body["folderUid"] not in self.folders:
                return 400, {"message": "folder not found"}
            previous = self.dashboards.get(board["uid"])
            if previous and not body.get("overwrite"):
                return 412, {"message": "a dashboard with the same uid already exists"}
            version = previous["version"] + 1 if previous else 1
            self.dashboards[board["uid"]] = {
                "dashboard": board,
                "folderUid": body["folderUid"],
                "version": version,
            }
            return 200, {
                "status": "success",
                "uid": board["uid"],
                "url": f"/d/{board['uid']}/x",
                "version": version,
            }
        if path.startswith("/api/v1/provisioning/alert-rules"):
            uid = parts[4] if len(parts) > 4 else None
            if method == "GET":
                return (200, self.rules[uid]) if uid in self.rules else (404, {"message": "rule not found"})
            if method == "POST":
                if body["uid"] in self.rules:
                    return 409, {"message": "a rule with this uid already exists"}
                self.rules[body["uid"]] = body
                self.group_intervals.setdefault((body["folderUID"], body["ruleGroup"]), 60)
                return 201, body
            if method == "PUT":
                if uid not in self.rules:
                    return 404, {"message": "rule not found"}
                self.rules[uid] = body
                return 200, body
        if path.startswith("/api/v1/provisioning/folder/"):
            key = (parts[4], parts[6])
            if method == "GET":
                rules = [r for r in self.rules.values() if (r["folderUID"], r["ruleGroup"]) == key]
                return 200, {
                    "title": key[1],
                    "folderUid": key[0],
                    "interval": self.group_intervals[key],
                    "rules": rules,
                }
            if method == "PUT":
                self.group_intervals[key] = body["interval"]
                return 200, body
        return 404, {"message": f"no route {method} {path}"}


@pytest.fixture
def fake_grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            state.requests.append(Request(self.command, self.path, dict(self.headers), body))
            if self.headers.get("Authorization") != f"Bearer {state.token}":
                status, payload = 401, {"message": "invalid API key"}
            else:
                status, payload = state.handle(self.command, self.path, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def alerting_file(tmp_path: Path) -> Path:
    path = tmp_path / "gradwatch.yaml"
    path.write_text(ALERTING_YAML, encoding="utf-8")
    return path


def test_push_twice_is_idempotent_by_uid(fake_grafana: FakeGrafana, alerting_file: Path) -> None:
    first = push_dashboards(fake_grafana.url, TOKEN, alerting_file=alerting_file)
    second = push_dashboards(fake_grafana.url, TOKEN, alerting_file=alerting_file)

    assert first.folder_created and not second.folder_created
    assert len(fake_grafana.writes("POST", "/api/folders")) == 1
    assert fake_grafana.folders == {"gradwatch": "gradwatch"}

    uids = {"gradwatch-fleet", "gradwatch-run", "gradwatch-ranks"}
    assert set(first.dashboards) == set(second.dashboards) == uids
    assert set(fake_grafana.dashboards) == uids  # replaced by uid, not added again
    assert {d["version"] for d in fake_grafana.dashboards.values()} == {2}
    for post in fake_grafana.writes("POST", "/api/dashboards/db"):
        assert post.body["overwrite"] is True and post.body["folderUid"] == "gradwatch"
        assert "id" not in post.body["dashboard"]

    rule_uids = ["gradwatch-training-loss-non-finite", "gradwatch-training-stalled"]
    assert first.rules_created == rule_uids and first.rules_updated == []
    assert second.rules_created == [] and second.rules_updated == rule_uids
    assert set(fake_grafana.rules) == set(rule_uids)
    assert all(rule["folderUID"] == "gradwatch" for rule in fake_grafana.rules.values())
    assert fake_grafana.group_intervals == {("gradwatch", "gradwatch"): 30}


def test_pushes_the_generated_alerting_file_by_default(fake_grafana: FakeGrafana) -> None:
    generated = REPO / "deploy/grafana/provisioning/alerting/gradwatch.yaml"
    if not generated.exists():
        pytest.skip("deploy/grafana/provisioning/alerting/gradwatch.yaml is not generated yet")
    uids = [rule["uid"] for group in yaml.safe_load(generated.read_text())["groups"] for rule in group["rules"]]
    report = push_dashboards(fake_grafana.url, TOKEN)
    assert report.alerting_file == generated
    assert report.rules_created == uids and set(fake_grafana.rules) == set(uids)


def test_every_request_carries_the_token_and_rule_writes_disable_provenance(
    fake_grafana: FakeGrafana, alerting_file: Path
) -> None:
    push_dashboards(fake_grafana.url, TOKEN, alerting_file=alerting_file)
    assert fake_grafana.requests
    assert all(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in fake_grafana.requests)
    rule_writes = [
        r for r in fake_grafana.requests if r.method in ("POST", "PUT") and r.path.startswith("/api/v1/provisioning")
    ]
    assert rule_writes and all(r.headers.get("X-Disable-Provenance") == "true" for r in rule_writes)


def test_a_bad_token_gives_a_clear_error(fake_grafana: FakeGrafana) -> None:
    with pytest.raises(GrafanaError) as caught:
        push_dashboards(fake_grafana.url, "wrong", alert_rules=False)
    message = str(caught.value)
    assert "401" in message and fake_grafana.url in message and "--token" in message
    assert fake_grafana.dashboards == {}


def test_a_forbidden_token_says_which_role_is_missing(
    fake_grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_grafana, "handle", lambda method, path, body: (403, {"message": "permissions needed"}))
    with pytest.raises(GrafanaError, match=r"403 Forbidden.*Editor"):
        push_dashboards(fake_grafana.url, TOKEN, alert_rules=False)


def test_nothing_listening_names_the_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(GrafanaError, match=rf"cannot connect to Grafana at {url}.*--url"):
        push_dashboards(url, TOKEN, alert_rules=False)


def test_datasource_uid_can_point_at_another_prometheus(fake_grafana: FakeGrafana, alerting_file: Path) -> None:
    push_dashboards(fake_grafana.url, TOKEN, alerting_file=alerting_file, datasource_uid="their-prom")
    pushed = json.dumps([fake_grafana.dashboards, fake_grafana.rules])
    assert "gradwatch-prometheus" not in pushed and "their-prom" in pushed


def test_another_folder_name_gets_its_own_uid(fake_grafana: FakeGrafana) -> None:
    report = push_dashboards(fake_grafana.url, TOKEN, folder="ML Training", alert_rules=False)
    assert report.folder_uid == "ml-training"
    assert fake_grafana.folders == {"ml-training": "ML Training"}


def push_cli(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """`gradwatch grafana push ARGS` with neither GRAFANA_TOKEN nor GRAFANA_TOKEN_FILE unless `env` sets them."""
    app = typer.Typer()
    app.command("version")(lambda: None)  # a second command keeps `grafana` a sub-command
    grafana.register(app)
    return CliRunner().invoke(
        app, ["grafana", "push", *args], env={"GRAFANA_TOKEN": None, "GRAFANA_TOKEN_FILE": None, **(env or {})}
    )


def test_cli_push_reads_url_and_token_from_the_environment(fake_grafana: FakeGrafana, alerting_file: Path) -> None:
    result = push_cli(
        "--alerting-file", str(alerting_file), env={"GRAFANA_URL": fake_grafana.url, "GRAFANA_TOKEN": TOKEN}
    )
    assert result.exit_code == 0, result.output
    assert "folder gradwatch: created" in result.output
    assert "dashboard gradwatch-run: saved" in result.output
    assert "2 created, 0 updated" in result.output
    assert TOKEN not in result.output

    bad = push_cli("--url", fake_grafana.url, "--no-alert-rules", env={"GRAFANA_TOKEN": "nope"})
    assert bad.exit_code == 1
    assert "401" in bad.output and "--token-file" in bad.output and "nope" not in bad.output


def test_cli_push_sends_the_token_from_the_file(fake_grafana: FakeGrafana, tmp_path: Path) -> None:
    token_file = tmp_path / "grafana.token"
    token_file.write_text(TOKEN + "\n")
    # The file wins over the environment, as `--token-file` does for gradwatch's own commands.
    result = push_cli(
        "--url", fake_grafana.url, "--token-file", str(token_file), "--no-alert-rules",
        env={"GRAFANA_TOKEN": "not-the-token"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(fake_grafana.dashboards) == {"gradwatch-fleet", "gradwatch-run", "gradwatch-ranks"}
    assert {r.headers.get("Authorization") for r in fake_grafana.requests} == {f"Bearer {TOKEN}"}
    assert TOKEN not in result.output

    by_env = push_cli("--url", fake_grafana.url, "--no-alert-rules", env={"GRAFANA_TOKEN_FILE": str(token_file)})
    assert by_env.exit_code == 0, by_env.output


def test_cli_push_refuses_a_token_on_the_command_line(fake_grafana: FakeGrafana) -> None:
    on_argv = push_cli("--url", fake_grafana.url, "--token", TOKEN, "--no-alert-rules")
    assert on_argv.exit_code == 2
    assert "No such option: --token" in on_argv.output and "--token-file" in on_argv.output
    assert TOKEN not in on_argv.output
    assert fake_grafana.requests == []

    none = push_cli("--url", fake_grafana.url, "--no-alert-rules")
    assert none.exit_code == 1
    assert "no Grafana token" in none.output and "--token-file PATH" in none.output and "GRAFANA_TOKEN" in none.output
    assert fake_grafana.requests == []


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda path: None, "cannot read the token file"),
        (lambda path: path.write_text(" \n"), "is empty: write the token into it"),
        (lambda path: path.mkdir(), "cannot read the token file"),
    ],
    ids=["missing", "empty", "a-folder"],
)
def test_cli_push_refuses_a_bad_token_file_naming_it(
    fake_grafana: FakeGrafana, tmp_path: Path, make: Callable[[Path], object], says: str
) -> None:
    token_file = tmp_path / "grafana.token"
    make(token_file)
    result = push_cli("--url", fake_grafana.url, "--token-file", str(token_file), "--no-alert-rules")
    assert result.exit_code == 1
    assert f"token file {token_file}" in result.output and says in result.output
    assert "GRAFANA_TOKEN" in result.output  # the other way to pass it
    assert fake_grafana.requests == []


def test_grafana_module_stays_light() -> None:
    """The CLI imports service.stack.grafana at start-up: no torch, no ray."""
    source = (REPO / "service" / "stack" / "grafana.py").read_text(encoding="utf-8")
    top_level_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    third_party = {line.split()[1].split(".")[0] for line in top_level_imports} - {
        "__future__", "json", "os", "re", "dataclasses", "pathlib", "typing",
    }  # fmt: skip
    assert third_party == {"httpx", "typer", "gradwatch"}
    assert [line for line in top_level_imports if "gradwatch" in line] == [
        "from gradwatch.names import DATASOURCE_UID"
    ]  # names only: the standard library
