"""`gradwatch report`: a run's dynamics as one self-contained HTML page (service/report/report.py draws it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from service.cli.jobs import TokenOpt, UrlOpt, _client
from service.client import GradwatchError

errors = Console(stderr=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    target: Annotated[
        str,
        typer.Argument(
            help="A run directory (runs/<job id>), or a job id: read from --storage-path when the run is there, "
            "else fetched from the service.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the page.", show_default="<job id>-report.html"),
    ] = None,
    storage_path: Annotated[
        Path,
        typer.Option("--storage-path", envvar="GRADWATCH_STORAGE_PATH", help="Where `gradwatch run` wrote its runs."),
    ] = Path("runs"),
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Write a run's report: loss with phases and anomalies, learning rate, norms, per-layer gradients and
    update ratios, gradient noise scale, step time per rank, custom scalars, system metrics per rank, and a
    diagnosis in words. One HTML file that opens with no network, under a strict Content-Security-Policy."""
    from service.report.report import ReportError, build_report

    candidates = [Path(target), storage_path / target]
    run_dir = next((p for p in candidates if p.is_dir()), None)
    try:
        if run_dir is not None:
            page, job_id = build_report(run_dir), run_dir.resolve().name
        elif "/" in target or target.startswith("."):
            _fail(f"no run directory {target}: give a run directory (runs/<job id>) or a job id")
        else:
            job_id = target
            with _client(url, token) as client:
                try:
                    page = client.report(target)
                except GradwatchError as exc:
                    _fail(
                        f"no run directory {target} or {storage_path / target} here, and the service "
                        f"could not give its report: {exc}"
                    )
    except ReportError as exc:
        _fail(str(exc))
    path = output or Path(f"{job_id}-report.html")
    try:
        path.write_text(page)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
    errors.print(f"wrote {escape(str(path))} ({len(page.encode()) / 1e6:.1f} MB): open it in a browser")


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)
