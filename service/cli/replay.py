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
    """The thresholds to replay with, the schedule's warm-up and the run's planned length: the spec's,
    then each --set."""
    from gradwatch.spec_telemetry import DetectorSpec
    from service.cli.specs import load_or_exit

    values: dict = {}
    warmup = 0
    planned = None
    if spec_file is not None:
        spec = load_or_exit(spec_file, user_code="skip")
        values = spec.telemetry.detectors.model_dump(exclude_unset=True)
        warmup = spec.schedule.warmup_steps
        planned = spec.max_steps
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
        return DetectorSpec.model_validate(values), warmup, planned
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "detectors"
            typer.echo(f"{_PREFIX}{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def replay(
    files: list[Path] = typer.Argument(
        ...,
        help="A run's history.jsonl (or its run directory), JSONL or CSV rows (`,`, tab or `;`; Lightning's "
        "metrics.csv too) or a Hugging Face trainer_state.json. Read: step (global_step, iter, iteration), "
        "loss (train_loss, train/loss, train_loss_step), val_loss (eval_loss, val/loss, eval/loss, "
        "validation_loss, val_loss_epoch), lr (learning_rate, lr-NAME), grad_norm (gradient_norm, "
        "train/grad_norm) and layer_grad_norm/NAME, layer_update_ratio/NAME; names trimmed, any case.",
    ),
    spec_file: Path | None = typer.Option(
        None,
        "--spec",
        help="Take the detector thresholds, the schedule's warm-up and max_steps (when the file states none) "
        "from this job spec.",
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Try another threshold: telemetry.detectors.NAME=VALUE (repeatable; after --spec)."
    ),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", min=0, help="The schedule's warm-up, when the rows carry no lr column."
    ),
    max_steps: int | None = typer.Option(
        None,
        "--max-steps",
        min=1,
        help="The run's planned length (before the file's own, as a trainer_state.json states, and --spec's).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="One JSON object per file: file, steps, max_steps, events, anomalies, phases, warnings.",
    ),
) -> None:
    """Replay recorded loss curves through the online detectors and print what would have fired.

    The same code the workers run, at the default thresholds or those of --spec/--set: how to tune
    thresholds on past runs ("would this have paged me last week?"). Rows of one step are merged (a
    validation row beside the training row); a column it does not read is a warning on stderr. Exits 2
    on a file it cannot replay: no loss in any row, a value that is not a number, steps that go back, or
    a step given twice with different values (each named with its file and line).
    """
    from workers.replay import ReplayError, open_input, replay_input

    detectors, warmup, planned = _detector_spec(spec_file, settings)
    if warmup_steps is not None:
        warmup = warmup_steps
    failed = False
    for path in files:
        try:
            source = open_input(path)
            for warning in source.warnings:
                typer.echo(f"warning: {warning}", err=True)
            length = max_steps if max_steps is not None else source.max_steps or planned
            result = replay_input(source, detectors, warmup_steps=warmup, max_steps=length)
        except ReplayError as exc:
            typer.echo(str(exc), err=True)
            failed = True
            continue
        if as_json:
            typer.echo(json.dumps(result.as_json(), default=str))
            continue
        anomalies = ", ".join(f"{k}@{s}" for k, s in sorted(result.anomalies.items(), key=lambda i: i[1]))
        phases = ", ".join(f"{p}@{s}" for p, s in result.phases)
        typer.echo(
            f"{result.file}: {result.steps} steps\n  anomalies: {anomalies or 'none'}\n  phases: {phases or '-'}"
        )
        for event in result.events:
            if event.kind == "anomaly" and event.raised:
                typer.echo(f"  {event_line(dataclasses.asdict(event))}")
    if failed:
        raise typer.Exit(2)
