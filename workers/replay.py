"""Replay recorded curves through the online detectors: what would have fired, and when.

The input is a run's `history.jsonl` (what `gradwatch run` and the service write in the run
directory) or JSONL/CSV rows with `step`, `loss` and optionally `val_loss`, `lr`, `grad_norm` and
per-layer values (`layer_grad_norm`/`layer_update_ratio` objects in JSONL; columns named
`layer_grad_norm/NAME` and `layer_update_ratio/NAME` in CSV). Rows are fed in file order through
`DynamicsMonitor`, the very code the workers run, so a replay of a history gives the run's events.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.spec_telemetry import DetectorSpec
from workers.detectors import DynamicsMonitor, Event

MAX_ROW_BYTES = 1 << 20  # one JSONL line or CSV row; a longer one is refused, not read whole
_LAYER_KEYS = ("layer_grad_norm", "layer_update_ratio")


class ReplayError(ValueError):
    """A file that cannot be replayed: says which file, which line and what to fix."""


@dataclass
class ReplayResult:
    file: str
    steps: int = 0
    events: list[Event] = field(default_factory=list)
    phases: list[tuple[str, int]] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "steps": self.steps,
            "events": [dataclasses.asdict(e) for e in self.events],
            "anomalies": [{"kind": k, "first_step": s} for k, s in sorted(self.anomalies.items(), key=lambda i: i[1])],
            "phases": [{"phase": p, "step": s} for p, s in self.phases],
        }


def _number(value: Any, where: str, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ReplayError(f"{where}: {name} must be a number (got {value!r})")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ReplayError(f"{where}: {name} must be a number (got {str(value)[:40]!r})") from None


def _jsonl_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if len(line) > MAX_ROW_BYTES:
            raise ReplayError(f"{where}: line longer than {MAX_ROW_BYTES} bytes")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"{where}: not JSON ({exc.msg}); each line must be one object") from None
        if not isinstance(row, dict):
            raise ReplayError(f"{where}: each line must be a JSON object with at least `step`")
        yield where, row


def _csv_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(lines)
    if not reader.fieldnames or "step" not in reader.fieldnames:
        raise ReplayError(f"{path}: the CSV header must name a `step` column (got {reader.fieldnames})")
    for number, raw in enumerate(reader, 2):
        row: dict[str, Any] = {}
        for key, value in raw.items():
            if key is None:
                raise ReplayError(f"{path}:{number}: more values than header columns")
            prefix, _, layer = key.partition("/")
            if prefix in _LAYER_KEYS and layer:
                if value not in (None, ""):
                    row.setdefault(prefix, {})[layer] = value
            else:
                row[key] = value
        yield f"{path}:{number}", row


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a JSONL or CSV file, checked as it is read."""
    try:
        handle = path.open(newline="")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read it ({exc.strerror})") from None
    with handle:
        first = handle.readline(MAX_ROW_BYTES + 1)
        handle.seek(0)
        if first.lstrip().startswith("{") or path.suffix in (".jsonl", ".json", ".ndjson"):
            yield from _jsonl_rows(path, handle)
        else:
            yield from _csv_rows(path, handle)


def _layers(row: Mapping[str, Any], key: str, where: str) -> dict[str, float] | None:
    values = row.get(key)
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise ReplayError(f"{where}: {key} must map layer names to numbers")
    return {str(k): v for k, v in ((k, _number(v, where, f"{key}.{k}")) for k, v in values.items()) if v is not None}


def replay_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    spec: DetectorSpec | None = None,
    *,
    warmup_steps: int = 0,
    file: str = "-",
    max_steps: int | None = None,
) -> ReplayResult:
    """Feed rows through a fresh `DynamicsMonitor` and collect what it reported."""
    monitor = DynamicsMonitor(spec, warmup_steps=warmup_steps, max_steps=max_steps)
    result = ReplayResult(file)
    events = result.events
    for where, row in rows:
        step_value = _number(row.get("step"), where, "step")
        if step_value is None:
            raise ReplayError(f"{where}: every row needs a `step`")
        step = int(step_value)
        # a history.jsonl carries the all-reduced loss as global_loss: the value the detectors saw live
        loss = _number(row.get("global_loss", row.get("loss")), where, "loss")
        if loss is not None or row.get("nonfinite"):
            grad_norm = _number(row.get("grad_norm"), where, "grad_norm")
            monitor.observe_step(
                step,
                loss if loss is not None else math.nan,
                lr=_number(row.get("lr"), where, "lr"),
                grad_norm=grad_norm,
            )
            result.steps += 1
            grads = _layers(row, "layer_grad_norm", where)
            ratios = _layers(row, "layer_update_ratio", where)
            if grads is not None or ratios is not None:
                monitor.observe_gradients(step, grad_norm if grad_norm is not None else math.nan, grads, ratios)
        val_loss = _number(row.get("val_loss"), where, "val_loss")
        if val_loss is not None:
            monitor.observe_validation(step, val_loss)
        if monitor.pending_events:
            events.extend(monitor.events())
    result.phases = monitor.phases_entered
    result.anomalies = monitor.anomalies_raised
    return result


def replay_file(path: Path, spec: DetectorSpec | None = None, *, warmup_steps: int = 0) -> ReplayResult:
    return replay_rows(read_rows(path), spec, warmup_steps=warmup_steps, file=str(path))
