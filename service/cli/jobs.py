"""Service commands of the CLI: up, submit, jobs, status, logs, cancel, alerts.

Everything but `up` talks to a running service through the SDK (service/client.py):
GRADWATCH_URL and GRADWATCH_TOKEN (or a --token-file), or the token `gradwatch up` saved on
this machine; never a token on the command line, where `ps` shows it. Text from the server
is shown without control characters (another user's labels or alerts must not drive your terminal).
Tables by default, `--json` for scripts. `submit --follow` exits 0 when the job
succeeded cleanly and 1 when it did not (or reached its end with a warning); a refused spec exits 2.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gradwatch.names import DEFAULT_RAY_DASHBOARD_PORT, DEFAULT_SERVICE_URL, TERMINAL_STATES
from service.client import Client, GradwatchError, read_token_file

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)
_print_lock = threading.Lock()

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="GRADWATCH_URL", help="Service URL.", show_default=DEFAULT_SERVICE_URL),
]
TokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="GRADWATCH_TOKEN_FILE",
        show_default=False,
        help="File holding your API token (default: GRADWATCH_TOKEN, else the one `gradwatch up` saved).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
STATE_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "timed_out": "red",
}


def register(app: typer.Typer) -> None:
    """Add the service commands to the gradwatch CLI."""
    app.command("up")(up)
    app.command("submit")(submit)
    app.command("jobs")(jobs)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("alerts")(alerts)


# ------------------------------------------------------------------------ up
def up(
    host: Annotated[str | None, typer.Option(help="Address to bind (GRADWATCH_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (GRADWATCH_PORT).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Store, logs, token and monitoring data (GRADWATCH_DATA_DIR).")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs of the local Ray head it starts.")] = None,
    ray_dashboard_port: Annotated[
        int, typer.Option(help="Dashboard port of the local Ray head: reused when it takes our token.")
    ] = DEFAULT_RAY_DASHBOARD_PORT,
    no_monitoring: Annotated[
        bool, typer.Option("--no-monitoring", help="Start without Prometheus and Alertmanager (no alerts).")
    ] = False,
    prometheus_port: Annotated[
        int | None,
        typer.Option(help="Prometheus port on 127.0.0.1; 0: any free port.", show_default="9090, else a free one"),
    ] = None,
    alertmanager_port: Annotated[
        int | None,
        typer.Option(help="Alertmanager port on 127.0.0.1; 0: any free port.", show_default="9093, else a free one"),
    ] = None,
) -> None:
    """Start the service, a local Ray head unless RAY_ADDRESS names a cluster, and Prometheus and
    Alertmanager (from PATH) with gradwatch's rules. Ray stays up after the service stops; Prometheus
    and Alertmanager stop with it."""
    from service.api.main import serve
    from service.auth import consumer_token
    from service.settings import Settings, check_bind

    overrides: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None
    }
    settings = Settings(**overrides)
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.token = consumer_token(settings, "admin")
    try:
        check_bind(settings)
    except ValueError as exc:
        _fail(str(exc))
    settings.ray_address = _ray_cluster(settings, ray_dashboard_port, num_cpus)
    # uvicorn hands a stop signal back once it has shut down: leave through `finally`, which stops
    # Prometheus and Alertmanager (should the service be killed instead, PR_SET_PDEATHSIG ends them).
    signal.signal(signal.SIGTERM, _exit_quietly)
    monitoring = None
    try:
        if not no_monitoring:
            monitoring = _start_monitoring(settings, prometheus_port, alertmanager_port)
        console.print(f"gradwatch API  {settings.url}")
        console.print(f"token          {settings.token}")
        console.print(f"Ray dashboard  {settings.ray_address}")
        if monitoring:
            console.print(f"Prometheus     {monitoring.prometheus.url}")
            console.print(f"Alertmanager   {monitoring.alertmanager.url}")
        console.print(f"export GRADWATCH_URL={settings.url} GRADWATCH_TOKEN={settings.token}", soft_wrap=True)
        sys.stdout.flush()
        serve(settings)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        if monitoring:
            monitoring.stop()


def _ray_cluster(settings: Any, dashboard_port: int, num_cpus: int | None) -> str:
    """The Ray cluster's dashboard address: RAY_ADDRESS's, else a local head's (the one running on
    `dashboard_port` when it takes our token, or a new one)."""
    from service.scheduler.local_ray import (
        foreign_ray_error,
        local_ray_address,
        probe_dashboard,
        ray_token,
        start_local_ray,
    )

    if settings.ray_address:
        found, answer = probe_dashboard(settings.ray_address, ray_token(settings))
        if found == "foreign":
            _fail(foreign_ray_error(f"at {settings.ray_address}", answer, local=False))
        return settings.ray_address
    address = local_ray_address(dashboard_port)
    found, answer = probe_dashboard(address, ray_token())
    if found == "ours":
        errors.print(f"using the Ray cluster already running at {address}")
        return address
    if found == "foreign":
        _fail(foreign_ray_error(f"at {address}", answer))
    log_file = settings.data_dir / "ray.log"
    errors.print(f"starting a local Ray head (log: {log_file}) ...")
    try:
        address = start_local_ray(log_file, dashboard_port=dashboard_port, num_cpus=num_cpus)
    except (RuntimeError, OSError) as exc:
        _fail(str(exc))
    errors.print("Ray stays up when the service stops (`ray stop` ends it)")
    return address


def _exit_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _start_monitoring(settings: Any, prometheus_port: int | None, alertmanager_port: int | None) -> Any:
    """Prometheus and Alertmanager for this service, or None (with a warning) when they are not installed."""
    from service.stack.monitoring import Monitoring, MonitoringUnavailable, find_binaries

    try:
        find_binaries()
    except MonitoringUnavailable as exc:
        errors.print(f"[yellow]no alerts:[/yellow] {_e(str(exc))}")
        return None
    errors.print(f"starting Prometheus and Alertmanager (data and logs: {settings.data_dir / 'monitoring'}) ...")
    try:
        return Monitoring.start(settings, prometheus_port, alertmanager_port)
    except MonitoringUnavailable as exc:
        _fail(str(exc))


# -------------------------------------------------------------------- submit
def submit(
    spec: Annotated[str, typer.Argument(help="YAML/JSON spec file, or - for stdin.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream logs and alerts; exit with the job's outcome.")
    ] = False,
    json_out: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Submit a job."""
    client = _client(url, token)
    text = sys.stdin.read() if spec == "-" else _read(spec)
    job = _call(client.submit, text)
    if json_out and not follow:
        _json(job)
        return
    errors.print(f"submitted [bold]{job['id']}[/bold] ({job['name']}): {_state(job['state'])}, {_e(job['reason'])}")
    if follow:
        raise typer.Exit(_follow(client, job["id"], json_out))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        _fail(f"cannot read {path}: {exc.strerror}")


def _follow(client: Client, job_id: str, json_out: bool) -> int:
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_alerts, args=(client, job_id, stop), daemon=True)
    watcher.start()
    try:
        for line in client.logs(job_id, follow=True):
            with _print_lock:
                print(plain(line), flush=True)
        job = client.wait(job_id, timeout=60)
    except GradwatchError as exc:
        _fail(str(exc))
    finally:
        stop.set()
        watcher.join(timeout=5)
    if json_out:
        _json(job)
    else:
        errors.print(f"{job_id} {_job_state(job)}: {_e(job['reason'])}")
    return 0 if job["state"] == "succeeded" and not job.get("warning") else 1


def _watch_alerts(client: Client, job_id: str, stop: threading.Event) -> None:
    """Print each alert about the job when it arrives, and again when it resolves."""
    seen: dict[int, str] = {}
    while True:
        finished = stop.is_set()
        try:
            for alert in reversed(client.alerts(job_id)):
                if seen.get(alert["id"]) != alert["status"]:
                    seen[alert["id"]] = alert["status"]
                    with _print_lock:
                        errors.print(_alert_line(alert))
        except GradwatchError:
            pass
        if finished:
            return  # that was the last look, after the job ended
        stop.wait(1.0)


def _alert_line(alert: dict[str, Any]) -> str:
    color = "red" if alert["status"] == "firing" else "green"
    text = alert.get("summary") or alert.get("description") or ""
    return (
        f"[{color}]ALERT {alert['status']}[/{color}] {_e(alert['alertname'])} "
        f"({_e(alert.get('severity') or 'no severity')}) {_e(alert.get('job_id') or '')}: {_e(text)}"
    )


# ---------------------------------------------------------------- the rest
def jobs(
    state: Annotated[list[str] | None, typer.Option("--state", help="Repeat for several.")] = None,
    name: Annotated[str | None, typer.Option(help="Only jobs with this name.")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="key=value, e.g. team=vision.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 50,
    json_out: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """List jobs, newest first."""
    labels = dict(item.partition("=")[::2] for item in label or [])
    rows = _call(_client(url, token).jobs, state, name=name, labels=labels, limit=limit)
    if json_out:
        _json(rows)
        return
    table = Table(box=None)
    table.add_column("ID", no_wrap=True, min_width=15)
    for title in ("NAME", "STATE", "STEP", "LOSS", "WORKERS", "AGE"):
        table.add_column(title, no_wrap=True)
    table.add_column("REASON", overflow="fold")
    for job in rows:
        table.add_row(
            _e(job["id"]),
            _e(job["name"]),
            _job_state(job),
            _progress(job),
            _num(job.get("train_loss")),
            str(job.get("world_size") or ""),
            _age(job["created_at"]),
            _e(job.get("reason") or ""),
        )
    console.print(table)


def status(job_id: str, json_out: JsonOpt = False, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """One job: state and why, progress, workers, and its alerts."""
    client = _client(url, token)
    job = _call(client.get, job_id)
    if json_out:
        _json(job)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    rows = [
        ("job", f"{job['id']} ({job['name']})"),
        ("state", _job_state(job) + (" (stopping)" if job.get("stopping") else "")),
        ("reason", job.get("reason") or ""),
        ("warning", job.get("warning") or ""),
        ("owner", job.get("owner") or ""),
        ("labels", ", ".join(f"{k}={v}" for k, v in job["labels"].items())),
        ("created", job["created_at"]),
        ("started", job.get("started_at") or ""),
        ("ended", job.get("ended_at") or ""),
        ("workers", str(job.get("world_size") or "")),
        ("step", _progress(job)),
        ("train loss", _num(job.get("train_loss"))),
        ("val loss", _num(job.get("val_loss"))),
        ("val accuracy", _num(job.get("val_accuracy"))),
        ("grad norm", _num(job.get("grad_norm"))),
        ("phase", job.get("phase") or ""),
        ("restarts", str(job.get("restarts") or 0)),
        ("waiting", job.get("waiting") or ""),
        (
            "nodes",
            ", ".join(
                f"rank {rank} on {node}"
                for rank, node in sorted((job.get("nodes") or {}).items(), key=lambda kv: int(kv[0]))
            ),
        ),
        (
            "lost nodes",
            "; ".join(
                f"{n['node']}{' (' + n['address'] + ')' if n.get('address') else ''} at step {n.get('step')}, "
                f"ranks {', '.join(str(r) for r in n.get('ranks') or []) or 'none'}"
                for n in job.get("lost_nodes") or []
            ),
        ),
        ("anomalies", ", ".join(k for k, v in (job.get("anomalies") or {}).items() if v)),
        (
            "endpoints",
            ", ".join(f"rank {e['rank']} {e['host']}:{e['port']}" for e in job.get("endpoints", [])),
        ),
        ("report", client.report_url(job["id"])),
    ]
    for key, value in rows:
        if value:
            grid.add_row(key, value if key == "state" else _e(value))
    console.print(grid)
    if job.get("alerts"):
        console.print()
        console.print(_alerts_table(job["alerts"]))


def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """The job's driver output: its progress and events, and what the training code prints on each rank
    as `\\[rank N] line`."""
    try:
        for line in _client(url, token).logs(job_id, follow=follow):
            print(plain(line), flush=True)
    except GradwatchError as exc:
        _fail(str(exc))


def cancel(
    job_id: str,
    wait: Annotated[bool, typer.Option(help="Wait until the job has stopped.")] = True,
    json_out: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Cancel a job: queued ones end at once, running ones are stopped on Ray."""
    client = _client(url, token)
    job = _call(client.cancel, job_id)
    if wait and job["state"] not in TERMINAL_STATES:
        try:
            job = client.wait(job_id, timeout=90)
        except TimeoutError as exc:
            _fail(str(exc))
        except GradwatchError as exc:
            _fail(str(exc))
    if json_out:
        _json(job)
    else:
        console.print(f"{job['id']} {_state(job['state'])}: {_e(job['reason'])}")


def alerts(
    job_id: Annotated[str | None, typer.Argument(help="Only this job's alerts.")] = None,
    status_: Annotated[str | None, typer.Option("--status", help="firing or resolved.")] = None,
    json_out: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Alerts Alertmanager sent back, newest first."""
    rows = _call(_client(url, token).alerts, job_id, status=status_)
    if json_out:
        _json(rows)
    else:
        console.print(_alerts_table(rows))


# ------------------------------------------------------------------ helpers
def _client(url: str | None, token_file: Path | None) -> Client:
    if token_file is None:
        return Client(url)
    try:
        token = read_token_file(token_file, "GRADWATCH_TOKEN")
    except ValueError as exc:
        _fail(str(exc))
    return Client(url, token)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except GradwatchError as exc:
        if exc.errors:  # a refused spec: one line per problem, exit 2 like `gradwatch validate`
            errors.print(f"[red]error:[/red] {_e(exc.message)}")
            for line in exc.errors:
                errors.print(plain(line), markup=False)
            raise typer.Exit(2) from None
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {_e(message)}")
    raise typer.Exit(1)


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _alerts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None)
    for title in ("STATUS", "ALERT", "SEVERITY", "JOB", "SINCE"):
        table.add_column(title, no_wrap=True, min_width=15 if title == "JOB" else None)
    table.add_column("SUMMARY", overflow="fold")
    for a in rows:
        color = "red" if a["status"] == "firing" else "green"
        table.add_row(
            f"[{color}]{a['status']}[/{color}]",
            _e(a["alertname"]),
            _e(a.get("severity") or ""),
            _e(a.get("job_id") or ""),
            _age(a["starts_at"]),
            _e(a.get("summary") or ""),
        )
    return table


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """Text without control characters but tab and newline: no ESC sequences (screen clears, OSC 52
    clipboard writes), no carriage returns that hide a line."""
    return _CONTROL.sub("", text)


def _e(text: str) -> str:
    """Text from the server, shown literally (a reason may hold [brackets] rich would eat)."""
    return escape(plain(str(text)))


def _state(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def _job_state(job: dict[str, Any]) -> str:
    """The state, marked when a job reached its last step on broken numbers (see its warning)."""
    if job.get("warning"):
        return f"[yellow]{job['state']} (warning)[/]"
    return _state(job["state"])


def _progress(job: dict[str, Any]) -> str:
    step, total = job.get("step"), job.get("max_steps")
    if step is None:
        return ""
    return f"{step}/{total}" if total else str(step)


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4g}"


def _age(iso: str | None) -> str:
    if not iso:
        return ""
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso.replace("Z", "+00:00"))).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"
