"""Push dashboards and alert rules to an existing Grafana.

`gradwatch grafana push --url http://localhost:3000 --token-file grafana.token` makes sure the folder
exists (created once, found by uid afterwards), saves every dashboard of dashboards/ by its uid
with overwrite, and creates or replaces every alert rule of Grafana's alerting provisioning file
by its uid. Pushing twice leaves Grafana as one push did.

For a Grafana that gradwatch's compose file starts, none of this is needed: it provisions the
same dashboards and rules from files. This is for a Grafana that already runs somewhere.

The token comes from a file (--token-file, GRAFANA_TOKEN_FILE) or GRAFANA_TOKEN, never from the
command line, where `ps`, shell history and CI logs would show it; it is never printed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import typer

from gradwatch.names import DATASOURCE_UID

REPO = Path(__file__).resolve().parents[2]  # the checkout, or the site-packages the wheel is in
DATASOURCE_NAME = "gradwatch-prometheus"  # its name, as deploy/grafana/provisioning/datasources names it
ALERTING_FILE = Path("deploy/grafana/provisioning/alerting/gradwatch.yaml")


class GrafanaError(Exception):
    """A push failed; the message says what Grafana answered and what to do."""


@dataclass
class PushReport:
    """What one push did."""

    url: str
    folder_uid: str
    folder_created: bool = False
    dashboards: dict[str, str] = field(default_factory=dict)  # uid -> URL in Grafana
    rules_created: list[str] = field(default_factory=list)
    rules_updated: list[str] = field(default_factory=list)
    alerting_file: Path | None = None

    def lines(self) -> list[str]:
        verb = "created" if self.folder_created else "found"
        out = [f"folder {self.folder_uid}: {verb} in {self.url}"]
        out += [f"dashboard {uid}: saved, {self.url}{path}" for uid, path in self.dashboards.items()]
        if self.alerting_file is None:
            out.append("alert rules: none pushed (no alerting provisioning file)")
        else:
            out.append(
                f"alert rules from {self.alerting_file}: {len(self.rules_created)} created, "
                f"{len(self.rules_updated)} updated"
            )
        return out


def _repo_or_cwd(relative: Path) -> Path:
    """`relative` in this checkout, else in the current folder (an installed package has no repo)."""
    in_repo = REPO / relative
    return in_repo if in_repo.exists() else Path.cwd() / relative


def default_dashboards_dir() -> Path:
    return _repo_or_cwd(Path("dashboards"))


def default_alerting_file() -> Path:
    return _repo_or_cwd(ALERTING_FILE)


def folder_uid_for(title: str) -> str:
    """A Grafana uid from a folder title: lower case, [a-z0-9_-], at most 40 characters."""
    uid = re.sub(r"[^a-z0-9_-]+", "-", title.lower()).strip("-")[:40]
    if not uid:
        raise GrafanaError(f"folder name {title!r} has no letters or digits to make a uid from")
    return uid


def load_dashboards(dashboards_dir: Path) -> list[dict[str, Any]]:
    """Every dashboard JSON in `dashboards_dir`, sorted by file name."""
    files = sorted(dashboards_dir.glob("*.json"))
    if not files:
        raise GrafanaError(f"no dashboard JSON in {dashboards_dir}: run `python -m dashboards.build` first")
    boards = []
    for path in files:
        board = json.loads(path.read_text(encoding="utf-8"))
        if not board.get("uid"):
            raise GrafanaError(f"{path} has no uid: a push could not find it again")
        boards.append(board)
    return boards


@dataclass
class AlertRuleGroup:
    name: str
    interval_seconds: int | None
    rules: list[dict[str, Any]]


def load_alert_rules(path: Path) -> list[AlertRuleGroup]:
    """Rule groups of a Grafana alerting provisioning file (apiVersion 1, `groups:`)."""
    import yaml  # only a push with alert rules needs it

    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    groups = []
    for index, group in enumerate(document.get("groups", [])):
        rules = group.get("rules", [])
        for rule in rules:
            if not rule.get("uid"):
                raise GrafanaError(f"{path}: groups[{index}] has a rule without uid ({rule.get('title')!r})")
        interval = group.get("interval")
        groups.append(AlertRuleGroup(group["name"], _seconds(interval) if interval else None, rules))
    return groups


def _seconds(duration: str | int) -> int:
    """'90s', '1m', '1h30m' or a number of seconds -> seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.findall(r"(\d+)([smhd])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise GrafanaError(f"cannot read the duration {duration!r} (expected e.g. 30s, 1m, 1h30m)")
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)


def retarget_datasource(obj: Any, uid: str) -> Any:
    """A copy of `obj` whose references to gradwatch's Prometheus datasource point at `uid` instead.

    Alert list panels filter by datasource *name*, which is unknown for another datasource:
    their filter is dropped (they then list the alerts of every source).
    """
    if uid == DATASOURCE_UID:
        return obj
    if isinstance(obj, list):
        return [retarget_datasource(item, uid) for item in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key == "datasource" and isinstance(value, dict) and value.get("uid") == DATASOURCE_UID:
            out[key] = {**value, "uid": uid}
        elif key == "datasourceUid" and value == DATASOURCE_UID:
            out[key] = uid
        elif key == "datasource" and value == DATASOURCE_NAME:
            out[key] = None
        else:
            out[key] = retarget_datasource(value, uid)
    return out


class _Grafana:
    """Grafana's HTTP API with errors a person can act on."""

    def __init__(self, url: str, token: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        if ":" in token:  # user:password, e.g. the admin of a fresh Grafana
            user, password = token.split(":", 1)
            auth: httpx.Auth | None = httpx.BasicAuth(user, password)
            headers = {}
        else:
            auth, headers = None, {"Authorization": f"Bearer {token}"}
        headers["Accept"] = "application/json"
        self.client = httpx.Client(base_url=self.url, headers=headers, auth=auth, timeout=timeout)

    def __enter__(self) -> _Grafana:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Send one request; returns the response when its status is in `ok`, else raises GrafanaError."""
        try:
            response = self.client.request(method, path, json=body, params=params, headers=headers)
        except httpx.ConnectError as exc:
            raise GrafanaError(
                f"cannot connect to Grafana at {self.url} ({exc}): start Grafana, or point --url "
                "(GRAFANA_URL) at it, e.g. http://localhost:3000"
            ) from None
        except httpx.TimeoutException:
            raise GrafanaError(f"Grafana at {self.url} did not answer {method} {path} in time") from None
        if response.status_code in ok:
            return response
        where = f"{method} {self.url}{path}"
        if response.status_code == 401:
            raise GrafanaError(
                f"Grafana refused the credentials (401 Unauthorized) for {where}: pass a valid service "
                "account token with --token-file or GRAFANA_TOKEN (Grafana: Administration > Users and access > "
                "Service accounts > Add service account token), or user:password for basic auth"
            )
        if response.status_code == 403:
            raise GrafanaError(
                f"Grafana denied {where} (403 Forbidden): the token's service account lacks the permission; "
                "give it the Editor role for folders and dashboards, Admin to provision alert rules"
            )
        raise GrafanaError(f"Grafana answered {response.status_code} to {where}: {_message(response)}")


def _message(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(payload, dict) and payload.get("message"):
        return str(payload["message"])
    return json.dumps(payload)[:300]


# Without it Grafana marks pushed rules as provisioned through the API and refuses edits in its UI.
_NO_PROVENANCE = {"X-Disable-Provenance": "true"}


def _ensure_folder(grafana: _Grafana, title: str) -> tuple[str, bool]:
    """The uid of the folder for `title`, and whether this call created it."""
    uid = folder_uid_for(title)
    if grafana.call("GET", f"/api/folders/{uid}", ok=(200, 404)).status_code == 200:
        return uid, False
    response = grafana.call("POST", "/api/folders", body={"uid": uid, "title": title}, ok=(200, 409, 412))
    if response.status_code == 200:
        return str(response.json().get("uid", uid)), True
    # A folder with this title but another uid: use it rather than fail.
    hits = grafana.call("GET", "/api/search", params={"type": "dash-folder", "query": title}).json()
    for hit in hits:
        if hit.get("title") == title and hit.get("uid"):
            return str(hit["uid"]), False
    raise GrafanaError(f"Grafana would not create the folder {title!r}: {_message(response)}")


def _push_rules(
    grafana: _Grafana, groups: list[AlertRuleGroup], folder_uid: str, datasource_uid: str, report: PushReport
) -> None:
    """Create or replace each rule by uid, in `folder_uid` whatever folder the file names."""
    for group in groups:
        for rule in group.rules:
            body = retarget_datasource(rule, datasource_uid)
            body.update({"folderUID": folder_uid, "ruleGroup": group.name})
            uid = rule["uid"]
            path = f"/api/v1/provisioning/alert-rules/{uid}"
            if grafana.call("GET", path, ok=(200, 404)).status_code == 200:
                grafana.call("PUT", path, body=body, headers=_NO_PROVENANCE)
                report.rules_updated.append(uid)
            else:
                grafana.call(
                    "POST",
                    "/api/v1/provisioning/alert-rules",
                    body=body,
                    ok=(200, 201),
                    headers=_NO_PROVENANCE,
                )
                report.rules_created.append(uid)
        if group.interval_seconds is not None:
            _set_group_interval(grafana, folder_uid, group)


def _set_group_interval(grafana: _Grafana, folder_uid: str, group: AlertRuleGroup) -> None:
    """Give a rule group the evaluation interval of the file (new groups start with Grafana's default)."""
    path = f"/api/v1/provisioning/folder/{folder_uid}/rule-groups/{group.name}"
    current = grafana.call("GET", path).json()
    if current.get("interval") != group.interval_seconds:
        current["interval"] = group.interval_seconds
        grafana.call("PUT", path, body=current, headers=_NO_PROVENANCE)


def push_dashboards(
    url: str,
    token: str,
    folder: str = "gradwatch",
    dashboards_dir: Path | None = None,
    alerting_file: Path | None = None,
    *,
    alert_rules: bool = True,
    datasource_uid: str = DATASOURCE_UID,
    timeout: float = 10.0,
) -> PushReport:
    """Push dashboards (and alert rules, when the alerting file exists) into `folder` of the Grafana at `url`.

    `token` is a service account token, or user:password. `alerting_file` defaults to
    deploy/grafana/provisioning/alerting/gradwatch.yaml and is skipped when absent (or when
    `alert_rules` is False). `datasource_uid` is the uid of the Prometheus datasource in that
    Grafana, when it is not gradwatch's provisioned `gradwatch-prometheus`.
    """
    boards = load_dashboards(dashboards_dir or default_dashboards_dir())
    if alerting_file is not None and not alerting_file.exists():
        raise GrafanaError(f"alerting file {alerting_file} does not exist")
    rules_file = alerting_file or default_alerting_file()
    groups = load_alert_rules(rules_file) if alert_rules and rules_file.exists() else None

    with _Grafana(url, token, timeout) as grafana:
        folder_uid, created = _ensure_folder(grafana, folder)
        report = PushReport(url=grafana.url, folder_uid=folder_uid, folder_created=created)
        for board in boards:
            board = retarget_datasource({k: v for k, v in board.items() if k != "id"}, datasource_uid)
            response = grafana.call(
                "POST",
                "/api/dashboards/db",
                body={
                    "dashboard": board,
                    "folderUid": folder_uid,
                    "overwrite": True,
                    "message": "gradwatch grafana push",
                },
            )
            report.dashboards[board["uid"]] = str(response.json().get("url", f"/d/{board['uid']}"))
        if groups is not None:
            report.alerting_file = rules_file
            _push_rules(grafana, groups, folder_uid, datasource_uid, report)
    return report


grafana_app = typer.Typer(
    help="Push gradwatch's dashboards and alert rules to a running Grafana.", no_args_is_help=True
)


@grafana_app.command("push")
def push_command(
    url: str = typer.Option(..., "--url", envvar="GRAFANA_URL", help="Grafana's address, e.g. http://localhost:3000."),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        envvar="GRAFANA_TOKEN_FILE",
        show_default=False,
        help="File holding a service account token (Editor; Admin to push alert rules), or user:password "
        "(default: GRAFANA_TOKEN).",
    ),
    folder: str = typer.Option("gradwatch", "--folder", help="Grafana folder for the dashboards and rules."),
    dashboards_dir: Path | None = typer.Option(
        None, "--dashboards-dir", help="Folder of dashboard JSON (default: dashboards/)."
    ),
    alerting_file: Path | None = typer.Option(
        None,
        "--alerting-file",
        help=f"Grafana alerting provisioning file (default: {ALERTING_FILE}, if present).",
    ),
    no_alert_rules: bool = typer.Option(False, "--no-alert-rules", help="Push dashboards only."),
    datasource_uid: str = typer.Option(
        DATASOURCE_UID, "--datasource-uid", help="uid of the Prometheus datasource in that Grafana."
    ),
) -> None:
    """Create the folder once, then save every dashboard and alert rule by uid (safe to repeat)."""
    from service.client import read_token_file  # the CLI's one way to read a token file

    try:
        token = read_token_file(token_file, "GRAFANA_TOKEN") if token_file else os.environ.get("GRAFANA_TOKEN", "")
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if not token.strip():
        typer.echo(
            "error: no Grafana token: write it to a file and pass --token-file PATH (or GRAFANA_TOKEN_FILE), "
            "or set GRAFANA_TOKEN; a token on the command line would show in ps, shell history and CI logs",
            err=True,
        )
        raise typer.Exit(1)
    try:
        report = push_dashboards(
            url,
            token.strip(),
            folder,
            dashboards_dir,
            alerting_file,
            alert_rules=not no_alert_rules,
            datasource_uid=datasource_uid,
        )
    except GrafanaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in report.lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add `gradwatch grafana ...` to the CLI."""
    app.add_typer(grafana_app, name="grafana")
