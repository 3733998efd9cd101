"""`gradwatch replay`: recorded curves through the online detectors, and what would have fired."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError

from gradwatch.status import event_line

_PREFIX = "telemetry.detectors."


def register(app: typer.Typer) -> None:
    app.command("replay")(replay)


def _detector_spec(spec_file: Path | None, settings: list[str]):
    """The thresholds to replay with and the schedule's warm-up: the spec's, then each --set."""
    from gradwatch.spec_telemetry import DetectorSpec
    from service.cli import _load_or_exit

    values: dict = {}
    warmup = 0
    if spec_file is not None:
        spec = _load_or_exit(spec_file, user_code="skip")
        values = spec.telemetry.detectors.model_dump(exclude_unset=True)
        warmup = spec.schedule.warmup_steps
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix(_PREFIX)
        if not sep or not key or "." in key:
            typer.echo(
                f"--set {item!r}: write telemetry.detectors.NAME=VALUE (for example {_PREFIX}spike_z=6)", err=True
            )
            raise typer.Exit(2)
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[key] = raw
    try:
        return DetectorSpec.model_validate(values), warmup
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "detectors"
            typer.echo(f"{_PREFIX}{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def replay(
    files: list[Path] = typer.Argument(
        ...,
        help="history.jsonl of a run, or JSONL/CSV rows with step, loss and "
        "optionally val_loss, lr, grad_norm and per-layer values.",
    ),
    spec_file: Path | None = typer.Option(
        None, "--spec", help="Take the detector thresholds (and the schedule's warm-up) from this job spec."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Try another threshold: telemetry.detectors.NAME=VALUE (repeatable; after --spec)."
    ),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", min=0, help="The schedule's warm-up, when the rows carry no lr column."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object per file: file, steps, events, anomalies, phases."
    ),
) -> None:
    """Replay recorded loss curves through the online detectors and print what would have fired.

    The same code the workers run, at the default thresholds or those of --spec/--set: how to tune
    thresholds on past runs ("would this have paged me last week?"). Exits 2 on a file it cannot read.
    """
    from workers.replay import ReplayError, replay_file

    detectors, warmup = _detector_spec(spec_file, settings)
    if warmup_steps is not None:
        warmup = warmup_steps
    failed = False
    for path in files:
        try:
            result = replay_file(path, detectors, warmup_steps=warmup)
        except ReplayError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        if as_json:
            typer.echo(json.dumps(result.as_json(), default=str))
            continue
        anomalies = ", ".join(f"{k}@{s}" for k, s in sorted(result.anomalies.items(), key=lambda i: i[1]))
        phases = ", ".join(f"{p}@{s}" for p, s in result.phases)
        typer.echo(f"{path}: {result.steps} steps\n  anomalies: {anomalies or 'none'}\n  phases: {phases or '-'}")
        for event in result.events:
            if event.kind == "anomaly" and event.raised:
                typer.echo(f"  {event_line(dataclasses.asdict(event))}")
    if failed:
        raise typer.Exit(2)
