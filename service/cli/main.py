"""The `gradwatch` command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gradwatch.ids import new_job_id
from gradwatch.spec import json_schema
from gradwatch.status import RunResult, RunStatus, event_line
from service.cli.specs import load_or_exit

app = typer.Typer(
    name="gradwatch",
    help="Distributed PyTorch training on Ray, with training-dynamics telemetry, alerts and dashboards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


@app.command()
def validate(spec_file: Path = typer.Argument(..., help="Job spec, YAML or JSON.")) -> None:
    """Check a job spec: prints OK, or every error as `field.path: reason (got VALUE)` and exits 2."""
    spec = load_or_exit(spec_file)
    typer.echo(f"OK {spec.summary()}")


@app.command()
def schema() -> None:
    """Print the JSON schema of a job spec."""
    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="Job spec, YAML or JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary at the end instead of a display."),
    storage_path: Path = typer.Option(
        Path("runs"),
        "--storage-path",
        envvar="GRADWATCH_STORAGE_PATH",
        help="Where checkpoints, history and status of the run are written.",
    ),
    prometheus_sd_file: Path | None = typer.Option(
        None, "--prometheus-sd-file", help="Keep a Prometheus file_sd JSON of the live worker endpoints here."
    ),
    job_id: str | None = typer.Option(None, "--job-id", help="Run id (default: a new gw-<hex> id)."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show Ray's own logs and its output from the workers."
    ),
) -> None:
    """Run a job in the foreground on a local Ray (or the cluster at RAY_ADDRESS).

    What the training code prints on each rank is shown as `\\[rank N] line` (with --json on stderr,
    so stdout holds only the summary); Ray's own output only with -v.

    Exits 0 when the job succeeds, 1 when it fails or reaches its end with a warning (a non-finite
    loss, divergence still held; the cause is printed), 2 on a bad spec.
    """
    spec = load_or_exit(spec_file)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not verbose:
        _quiet_ray()
    from workers.driver import ClusterTooSmall, run_job, stop_ray

    job_id = job_id or new_job_id()
    display = RunDisplay(spec, job_id) if not as_json else None
    try:
        if display:
            err.print(f"[bold]gradwatch[/] {spec.summary()}\n  job {job_id}, starting Ray...")
            with Live(display.render(), console=err, refresh_per_second=4, transient=False) as live:
                display.live = live
                result = run_job(
                    spec,
                    job_id=job_id,
                    storage_path=storage_path,
                    sd_file=prometheus_sd_file,
                    listeners=[display.update],
                    verbose=verbose,
                )
                live.update(display.render())
            err.print()
        else:
            result = run_job(
                spec,
                job_id=job_id,
                storage_path=storage_path,
                sd_file=prometheus_sd_file,
                verbose=verbose,
                output=sys.stderr,  # stdout holds the JSON summary alone
            )
    except ClusterTooSmall as exc:
        err.print(f"[red]cannot run {spec.name}:[/] {exc}")
        raise typer.Exit(1) from None
    finally:
        stop_ray()
    if as_json:
        typer.echo(result.model_dump_json())
    else:
        _print_summary(result)
    if result.state != "succeeded" or result.warning:
        raise typer.Exit(1)


def _quiet_ray() -> None:
    import logging

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    for name in ("ray", "ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


class RunDisplay:
    """The live table of `gradwatch run`."""

    def __init__(self, spec, job_id: str):
        self.spec, self.job_id = spec, job_id
        self.status = RunStatus(job_id=job_id, state="running", updated_at=time.time())
        self.events: list[str] = []
        self.live: Live | None = None
        self.started = time.time()

    def update(self, status: RunStatus, events: list[dict[str, Any]]) -> None:
        self.status = status
        self.events += [event_line(e) for e in events]
        if self.live:
            self.live.update(self.render())

    def render(self) -> Table:
        s = self.status
        table = Table(
            title=f"{self.spec.name}  [dim]{self.job_id}[/]", show_header=False, box=None, title_justify="left"
        )
        step, max_steps = s.step or 0, s.max_steps or self.spec.max_steps or 0
        elapsed = time.time() - self.started
        eta = "-"
        if step and max_steps and step < max_steps and elapsed > 0:
            eta = f"{(max_steps - step) * elapsed / step:.0f}s"
        bar = _bar(step, max_steps)
        table.add_row("step", f"{step}/{max_steps} {bar}  ETA {eta}")
        table.add_row("train loss", _fmt(s.train_loss) + f"  (ema {_fmt(s.loss_ema)})")
        table.add_row("val loss", _fmt(s.val_loss))
        table.add_row("val accuracy", _fmt(s.val_accuracy, pct=True))
        table.add_row("grad norm", _fmt(s.grad_norm))
        table.add_row("samples/s", _fmt(s.samples_per_second, digits=0))
        table.add_row("phase", s.phase or "-")
        table.add_row("anomalies", ", ".join(sorted(k for k, held in s.anomalies.items() if held)) or "none")
        if s.restarts or s.rollbacks:
            table.add_row("restarts/rollbacks", f"{s.restarts}/{s.rollbacks}")
        table.add_row(
            "workers",
            f"{self.spec.scaling.num_workers} x {'GPU' if self.spec.scaling.use_gpu else 'CPU'}"
            f"; metrics on {len(s.endpoints)} endpoints",
        )
        for line in self.events[-5:]:
            table.add_row("event", line)
        return table


def _bar(step: int, total: int, width: int = 24) -> str:
    if not total:
        return ""
    filled = int(width * min(step, total) / total)
    return "\\[" + "#" * filled + "." * (width - filled) + "]"  # escaped: a bracket, not rich markup


def _fmt(value: Any, pct: bool = False, digits: int = 4) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.1f}%"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_summary(result: RunResult) -> None:
    ok = result.state == "succeeded"
    color = ("yellow" if result.warning else "green") if ok else "red"
    err.print(
        f"[{color} bold]{result.state}[/] {result.job_id}: {result.steps} steps on "
        f"{result.world_size} workers in {result.wall_seconds:.1f}s"
    )
    err.print(
        f"  train loss {_fmt(result.train_loss)}, val loss {_fmt(result.val_loss)}, "
        f"val accuracy {_fmt(result.val_accuracy, pct=True)}"
    )
    if result.phases:
        err.print("  phases: " + ", ".join(f"{p.phase}@{p.step}" for p in result.phases))
    if result.anomalies:
        err.print("  anomalies: " + ", ".join(f"{a.kind}@{a.first_step}" for a in result.anomalies))
    if result.restarts or result.rollbacks:
        err.print(f"  restarts {result.restarts}, rollbacks {result.rollbacks}")
    err.print(f"  run directory: {result.run_dir}")
    if not ok:
        err.print(f"[red]cause:[/] {result.error}")
    elif result.warning:
        err.print(f"[yellow]warning:[/] reached its last step, but {result.warning}")


def _register_extensions() -> None:
    from service.cli import jobs, replay, report, users
    from service.stack import grafana

    jobs.register(app)
    replay.register(app)
    grafana.register(app)
    report.register(app)
    users.register(app)


_register_extensions()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
