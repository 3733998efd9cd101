"""A run's report: one self-contained HTML page of its dynamics, built from its run directory.

`load_run(run_dir)` reads what the driver and rank 0 wrote there (spec.json, status.json,
result.json, history.jsonl, and each rank's steps-rankN.jsonl); `render_report(run)` draws it with
plotly.js and says in words what the curves mean: the outcome, the phases with their steps, each
anomaly with its first step and what it usually means.

The page needs no network when opened: plotly.js travels inside it, gzip-compressed (its 4.8 MB
would fill the page's 5 MB budget alone; compressed it is about 2 MB) and unpacked by the browser's
own DecompressionStream. Plotly's Python package is the optional extra `report`
(`pip install 'gradwatch[report]'`); nothing here imports torch.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Any

import numpy as np

MAX_POINTS = 4_000  # measured steps drawn per series; longer histories are thinned to every k-th one
MAX_LINE_BYTES = 1 << 20  # a history line longer than this is skipped as unreadable
RATIO_FLOOR = 1e-12  # norms and ratios of exactly zero are drawn here on log scales
MAX_MARKER_LINES = 200  # vertical lines per kind of marker (restarts, rollbacks, skipped steps); markers show all
MAX_SCALAR_CHARTS = 32  # custom scalars drawn, a chart each (the training API allows 16 named series)
# What the telemetry writes in a step's history line; any other number there is a custom scalar.
STEP_KEYS = frozenset(
    {
        "step",
        "epoch",
        "loss",
        "global_loss",
        "loss_ema",
        "grad_norm",
        "lr",
        "step_seconds",
        "time",
        "weight_norm",
        "local_grad_norm",
        "gradient_noise_scale",
        "critical_batch_hint",
        "nonfinite",
        "phase",
        "anomalies",
    }
)
# A system metrics row's series (workers/system.py): title, unit, scale to that unit.
SYSTEM_SERIES = (
    ("process_cpu_cores", "CPU used by the worker process", "cores", 1.0),
    ("host_cpu_ratio", "CPU use of the worker's node", "%", 100.0),
    ("rss_bytes", "Resident memory of the worker process", "MiB", 1 / 2**20),
    ("samples_per_second", "Samples per second", "samples/s", 1.0),
    ("tokens_per_second", "Tokens per second", "tokens/s", 1.0),
    ("mfu_ratio", "Model FLOPs utilisation (MFU)", "%", 100.0),
    ("gpu_utilization_ratio", "GPU utilisation", "%", 100.0),
    ("gpu_memory_used_bytes", "GPU memory used", "GiB", 1 / 2**30),
    ("gpu_temperature_celsius", "GPU temperature", "°C", 1.0),
    ("gpu_power_watts", "GPU power", "W", 1.0),
)
TEMPLATE = Path(__file__).with_name("report.html")

PHASE_WORDS = {
    "warmup": ("warm-up", "the first steps, before the loss slope is judged"),
    "rapid_learning": ("rapid initial learning", "the loss falls fast while the easy structure is learned"),
    "refinement": ("progressive refinement", "the loss still falls, more slowly, as the details are learned"),
    "converged": ("convergence", "the loss has flattened near its best"),
    "stalled": (
        "stalled",
        "the loss has barely moved from where it started: usually a learning rate far too low, or dead units",
    ),
    "diverging": ("diverging", "the loss is climbing away from its best"),
}
PHASE_COLORS = {
    "warmup": "#9e9e9e",
    "rapid_learning": "#2ca02c",
    "refinement": "#1f77b4",
    "converged": "#17becf",
    "stalled": "#ff9800",
    "diverging": "#d62728",
}
ANOMALY_WORDS = {
    "nonfinite": (
        "non-finite values",
        "a loss or gradient was NaN or infinite and that update was skipped: a "
        "learning rate too high, a bad batch, or a numerical overflow",
    ),
    "loss_spike": (
        "loss spike",
        "one loss far outside the recent range: a bad batch, or a learning rate at the "
        "edge of stability (gradient clipping or warm-up help)",
    ),
    "divergence": (
        "divergence",
        "the loss rose far above its best or went non-finite: the learning rate is "
        "usually too high; lower it, add warm-up or gradient clipping, or set "
        "on_divergence: rollback",
    ),
    "plateau": (
        "plateau",
        "the loss stopped improving: lower the learning rate (or let a schedule do it), or stop the run",
    ),
    "overfitting": (
        "overfitting",
        "validation loss rising while training loss falls: the model memorises its "
        "training data; more data, regularisation (weight decay, dropout) or early "
        "stopping help",
    ),
    "vanishing_gradients": (
        "vanishing gradients",
        "the early layers' gradients shrink to almost nothing, so "
        "they stop learning: saturating activations (sigmoid, tanh) in "
        "deep stacks or a poor initialisation; ReLU-like activations, "
        "normalisation or residual connections help",
    ),
    "exploding_gradients": (
        "exploding gradients",
        "gradient norms or update ratios grew by orders of magnitude: clip gradients and lower the learning rate",
    ),
    "lr_too_low": (
        "learning rate too low",
        "the gradients are healthy but every layer's update is tiny against its weights: raise the learning rate",
    ),
    "dead_run": (
        "dead run",
        "the loss (or every gradient) stayed exactly the same for many steps: nothing is learning; a learning "
        "rate of 0, frozen parameters, a data loader repeating one batch, or a collapsed model",
    ),
    "lr_schedule": (
        "learning-rate schedule",
        "the logged learning rate fell to 0 (or far below where its warm-up started) long before the planned "
        "end: check the scheduler's length (total steps, epochs) and what it is stepped by",
    ),
    "grad_norm_growth": (
        "growing gradient norm",
        "the global gradient norm keeps growing geometrically against its own baseline, often before a "
        "blow-up: lower the learning rate or clip gradients",
    ),
}
RANK_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
ANOMALY_COLORS = {
    "nonfinite": "#000000",
    "loss_spike": "#ff7f0e",
    "divergence": "#d62728",
    "plateau": "#8c564b",
    "overfitting": "#e377c2",
    "vanishing_gradients": "#7f7f7f",
    "exploding_gradients": "#bcbd22",
    "lr_too_low": "#17becf",
    "dead_run": "#393b79",
    "lr_schedule": "#9467bd",
    "grad_norm_growth": "#e7ba52",
}


class ReportError(ValueError):
    """A run directory a report cannot be built from; the message says why and what to do."""


@dataclass
class Run:
    """What a run directory holds, read once. `steps` are the measured (telemetry) steps in file order."""

    run_dir: Path
    job_id: str
    spec: dict[str, Any]
    status: dict[str, Any]
    result: dict[str, Any] | None
    steps: list[dict[str, Any]] = field(default_factory=list)
    vals: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    ranks: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    scalars: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    system: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    stride: int = 1
    unreadable_lines: int = 0

    @property
    def state(self) -> str:
        return (self.result or {}).get("state") or self.status.get("state") or "unknown"


# ------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _jsonl(path: Path, keep: Any = None) -> Iterator[dict[str, Any] | None]:
    """Records of a JSON-lines file; None for a line that cannot be read (a live run's last line may be half
    written). `keep(i, raw)` may skip lines before they are parsed."""
    try:
        f = path.open("rb")
    except OSError:
        return
    with f:
        for i, raw in enumerate(f):
            if keep is not None and not keep(i, raw):
                continue
            if len(raw) > MAX_LINE_BYTES:
                yield None
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                yield None
                continue
            yield record if isinstance(record, dict) else None


def _count_lines(path: Path, also: bytes = b"") -> int:
    return _count(path, also)[0]


def _count(path: Path, also: bytes = b"") -> tuple[int, int]:
    """Lines of a file, and how many hold `also` (about: one cut by a chunk's edge is missed)."""
    n = m = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            m += chunk.count(also) if also else 0
    return n, m


def load_run(
    run_dir: str | Path,
    *,
    job_id: str | None = None,
    spec: dict[str, Any] | None = None,
    status: dict[str, Any] | None = None,
) -> Run:
    """Read a run directory. `spec` and `status` fill in what the directory does not have yet (the service
    knows a queued job's spec before its driver writes spec.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory: give a run directory (runs/<job id>) or a job id")
    history = run_dir / "history.jsonl"
    spec = _read_json(run_dir / "spec.json") or spec
    if spec is None and not history.exists():
        raise ReportError(
            f"{run_dir} is not a gradwatch run directory: it has neither spec.json nor "
            "history.jsonl (`gradwatch run` writes them to runs/<job id>/)"
        )
    status = {**(_read_json(run_dir / "status.json") or {}), **(status or {})}
    result = _read_json(run_dir / "result.json")
    run = Run(
        run_dir=run_dir,
        job_id=job_id or status.get("job_id") or (result or {}).get("job_id") or run_dir.name,
        spec=spec or {},
        status=status,
        result=result,
    )
    if history.exists():
        lines, scalar_lines = _count(history, b'"event": "scalars"')
        # the steps and the custom scalars' lines each thinned to about MAX_POINTS
        run.stride = max(1, math.ceil(max(lines - scalar_lines, scalar_lines) / MAX_POINTS))
        # Thin only the steps and the custom scalars (each by its own count, as they interleave):
        # validations, non-finite steps and the other events are few and all matter.
        rare = (b'"val_loss"', b'"nonfinite"', b'"event"')
        seen = {"steps": 0, "scalars": 0}

        def keep(i: int, raw: bytes) -> bool:
            kind = "scalars" if b'"scalars"' in raw else "steps"
            if run.stride == 1 or i >= lines - 1 or (kind == "steps" and any(k in raw for k in rare)):
                return True
            seen[kind] += 1
            return (seen[kind] - 1) % run.stride == 0

        for record in _jsonl(history, keep):
            if record is None or not isinstance(record.get("step"), int):
                run.unreadable_lines += 1
            elif record.get("event") == "scalars":
                _add_scalars(run, record["step"], record.get("scalars"))
            elif "event" in record:
                run.events.append(record)
            elif "val_loss" in record:
                run.vals.append(record)
            else:
                if record.get("nonfinite"):
                    run.nonfinite.append(record)
                if "layer_grad_norm" in record or not record.get("nonfinite"):
                    run.steps.append(record)
                extra = {k: v for k, v in record.items() if k not in STEP_KEYS and not k.startswith("layer_")}
                if extra:
                    _add_scalars(run, record["step"], extra)
    for path in sorted(run_dir.glob("steps-rank*.jsonl")):
        rank = path.stem.removeprefix("steps-rank")
        if rank.isdigit():
            run.ranks[int(rank)] = [r for r in _jsonl(path) if r and isinstance(r.get("step"), int)]
    for path in sorted(run_dir.glob("system-rank*.jsonl")):
        rank = path.stem.removeprefix("system-rank")
        if rank.isdigit():
            stride = max(1, math.ceil(_count_lines(path) / MAX_POINTS))
            run.system[int(rank)] = [
                r for r in _jsonl(path, lambda i, _, k=stride: i % k == 0) if r and _finite(r.get("time"))
            ]
    return run


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _add_scalars(run: Run, step: int, scalars: Any) -> None:
    """A history line's custom scalars (`run.log(name=value)`): numbers only, a series per name."""
    if not isinstance(scalars, dict):
        return
    for name, value in scalars.items():
        if _finite(value) and (name in run.scalars or len(run.scalars) < MAX_SCALAR_CHARTS):
            run.scalars.setdefault(str(name), []).append({"step": step, "value": float(value)})


# ------------------------------------------------------------ what happened
def phases(run: Run) -> list[tuple[str, int]]:
    """Each phase entered, with its step: the result's when the run has ended, else read off the history."""
    if run.result and run.result.get("phases") is not None:
        return [(p["phase"], int(p["step"])) for p in run.result["phases"] if p.get("phase") in PHASE_WORDS]
    entered: list[tuple[str, int]] = []
    for record in run.steps:
        phase = record.get("phase")
        if phase in PHASE_WORDS and (not entered or entered[-1][0] != phase):
            entered.append((phase, record["step"]))
    return entered


def anomalies(run: Run) -> list[tuple[str, int]]:
    """Each anomaly kind raised, with its first step (the result's; a live run's from the history)."""
    if run.result and run.result.get("anomalies") is not None:
        found = [(a["kind"], int(a["first_step"])) for a in run.result["anomalies"]]
    else:
        first: dict[str, int] = {}
        for record in sorted(run.steps + run.vals, key=lambda r: r.get("time") or 0):
            for kind in record.get("anomalies") or []:
                first.setdefault(kind, record["step"])
        found = list(first.items())
    return sorted(found, key=lambda kv: (kv[1], kv[0]))


def anomaly_name(kind: str) -> str:
    """An anomaly kind in words ("vanishing_gradients" -> "vanishing gradients")."""
    return ANOMALY_WORDS.get(kind, (kind.replace("_", " "),))[0]


def _restarts(run: Run) -> list[int]:
    return [e["step"] for e in run.events if e.get("event") == "restart"]


def _rollbacks(run: Run) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("event") == "rollback"]


def _nearest(records: list[dict[str, Any]], step: int, key: str) -> float | None:
    best = None
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            if best is None or abs(record["step"] - step) < abs(best[0] - step):
                best = (record["step"], value)
    return None if best is None else best[1]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def diagnosis(run: Run) -> list[str]:
    """What the curves say, in sentences: outcome, phases, anomalies, interruptions, batch size."""
    lines: list[str] = []
    entered = phases(run)
    if entered:
        parts = []
        for phase, step in entered:
            ema = _nearest(run.steps, step, "loss_ema")
            parts.append(f"{PHASE_WORDS[phase][0]} from step {step}" + (f" (loss EMA {ema:.4g})" if ema else ""))
        current = run.status.get("phase") if run.state == "running" else None
        tail = f"; now in {PHASE_WORDS[current][0]}" if current in PHASE_WORDS else ""
        lines.append(
            "Phases: "
            + ", then ".join(parts)
            + tail
            + ". "
            + " ".join(
                f"{PHASE_WORDS[p][0].capitalize()}: {PHASE_WORDS[p][1]}." for p in dict.fromkeys(p for p, _ in entered)
            )
        )
    found = anomalies(run)
    if not found:
        names = [anomaly_name(kind) for kind in ANOMALY_WORDS]
        lines.append(
            f"No anomalies detected (watched for: {', '.join(names)})." if run.steps else "No steps recorded yet."
        )
    for kind, step in found:
        name, meaning = anomaly_name(kind), ANOMALY_WORDS.get(kind, ("", ""))[1]
        lines.append(
            f"{name.capitalize()} first at step {step}"
            + (f": {meaning}." if meaning else ".")
            + _anomaly_detail(run, kind)
        )
    restarts, rollbacks = _restarts(run), _rollbacks(run)
    if restarts or (run.result or run.status).get("restarts"):
        n = len(restarts) or (run.result or run.status).get("restarts")
        at = f" (resumed at step {', '.join(map(str, restarts))})" if restarts else ""
        lines.append(f"{n} restart{'s' if n != 1 else ''} of the worker group from a checkpoint{at}.")
    for r in rollbacks:
        lines.append(
            f"Rollback at step {r['step']}: back to step {r.get('to_step')}, learning rate x{_fmt(r.get('lr_scale'))}."
        )
    if run.nonfinite:
        steps = [r["step"] for r in run.nonfinite]
        shown = ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")
        lines.append(
            f"{len(steps)} step{'s' if len(steps) != 1 else ''} with a non-finite loss or gradient, "
            f"update skipped (steps {shown})."
        )
    hint = _batch_hint(run)
    if hint:
        lines.append(hint)
    return lines


def _anomaly_detail(run: Run, kind: str) -> str:
    if kind == "overfitting" and run.vals:
        finite = [v for v in run.vals if isinstance(v.get("val_loss"), float) and math.isfinite(v["val_loss"])]
        if finite:
            best = min(finite, key=lambda v: v["val_loss"])
            return (
                f" Validation loss was lowest at step {best['step']} ({best['val_loss']:.4g}) and ended at "
                f"{finite[-1]['val_loss']:.4g}."
            )
    if kind == "vanishing_gradients":
        last = next((r for r in reversed(run.steps) if r.get("layer_grad_norm")), None)
        if last:
            layer, norm = min(last["layer_grad_norm"].items(), key=lambda kv: kv[1])
            return f" At step {last['step']} the smallest gradient norm was {norm:.3g}, in layer {layer}."
    return ""


def _batch_hint(run: Run) -> str:
    noise = [
        r["gradient_noise_scale"]
        for r in run.steps[-20:]
        if isinstance(r.get("gradient_noise_scale"), float) and r["gradient_noise_scale"] > 0
    ]
    batch = _global_batch(run)
    if not noise or not batch:
        return ""
    b = float(np.median(noise))
    if b > 2 * batch:
        verdict = "a larger batch would still cut the steps needed almost in proportion"
    elif b < batch / 2:
        verdict = "the batch is past the critical batch size: a smaller one would waste fewer samples"
    else:
        verdict = "the batch is near the critical batch size"
    return (
        f"Gradient noise scale near the end about {b:.3g} against a global batch of {batch}: {verdict} "
        "(McCandlish et al., 2018)."
    )


def _global_batch(run: Run) -> int | None:
    workers = (
        (run.result or {}).get("world_size")
        or run.status.get("world_size")
        or (run.spec.get("scaling") or {}).get("num_workers")
    )
    size = run.spec.get("batch_size")
    return int(size * workers) if size and workers else None


# ------------------------------------------------------------------ charts
def _typed(values: Any, dtype: str = "f4") -> dict[str, Any]:
    """plotly.js's typed-array form: base64 of the little-endian bytes (a quarter of the JSON text)."""
    arr = np.asarray(values, dtype="<f4" if dtype == "f4" else "<f8")
    spec: dict[str, Any] = {"dtype": dtype, "bdata": base64.b64encode(arr.tobytes()).decode()}
    if arr.ndim == 2:
        spec["shape"] = f"{arr.shape[0]},{arr.shape[1]}"
    return spec


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _line(
    records: list[dict[str, Any]], key: str, *, positive: bool = False, x: str = "step"
) -> tuple[dict, dict, bool] | None:
    """x and y of one series, drawn from its own finite points (a value measured every few steps is absent
    from the steps between); a step that goes back (a restart or rollback) breaks the line instead of
    drawing it backwards. The flag says some stretch has a single point (it needs a marker to be seen)."""
    xs: list[float] = []
    ys: list[float] = []
    last = None
    run_length, single = 0, False
    for record in records:
        value = _num(record.get(key))
        if not math.isfinite(value) or (positive and not value > 0):
            continue
        step = record[x]
        if last is not None and step <= last:
            xs.append(last)
            ys.append(math.nan)
            single = single or run_length == 1
            run_length = 0
        xs.append(step)
        ys.append(value)
        last = step
        run_length += 1
    if not xs:
        return None
    return _typed(xs), _typed(ys), single or run_length == 1


def _trace(
    records: list[dict[str, Any]], key: str, name: str, color: str, *, positive: bool = False, **extra: Any
) -> dict[str, Any] | None:
    xy = _line(records, key, positive=positive, x=extra.pop("x_key", "step"))
    if xy is None:
        return None
    trace = {
        "type": "scatter",
        "mode": "lines+markers" if xy[2] else "lines",
        "name": name,
        "x": xy[0],
        "y": xy[1],
        "line": {"color": color, "width": 1.5},
        "connectgaps": False,
        **extra,
    }
    if xy[2]:
        trace.setdefault("marker", {"size": 4, "color": color})
    return trace


def _layout(title: str, ytitle: str, *, log: bool = False, height: int = 320, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "font": {"size": 15}},
        "height": height,
        "margin": {"l": 70, "r": 20, "t": 56, "b": 45},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
        "hovermode": "x unified",
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
        "xaxis": {"title": {"text": "step"}, "gridcolor": "#eeeeee", "zeroline": False},
        "yaxis": {
            "title": {"text": ytitle},
            "gridcolor": "#eeeeee",
            "zeroline": False,
            **({"type": "log", "exponentformat": "power"} if log else {}),
        },
        **extra,
    }


def _label_rows(steps: list[int], texts: list[str], span: float) -> list[int]:
    """A row for each label at the chart's top, so labels of nearby steps do not overlap (a greedy packing
    that assumes a plot about 1,100 px wide and 7 px per character)."""
    per_px = max(span, 1) / 1100
    row_ends: list[float] = []
    rows = []
    for step, text in zip(steps, texts, strict=True):
        row = next((i for i, end in enumerate(row_ends) if step > end), len(row_ends))
        if row == len(row_ends):
            row_ends.append(0.0)
        row_ends[row] = step + (7 * len(text) + 10) * per_px
        rows.append(row)
    return rows


def _markers(run: Run, y_of: Any, span: float) -> tuple[list[dict], list[dict], list[dict]]:
    """Anomalies, restarts, rollbacks and skipped steps on the loss chart: marker traces, vertical line
    shapes (not for skipped steps: a diverged run has hundreds) and labels at the top."""
    traces, shapes, labels = _anomaly_markers(run, y_of, span)
    for name, symbol, color, steps in (
        ("restarts", "triangle-up", "#6a3d9a", _restarts(run)),
        ("rollbacks", "triangle-left", "#b15928", [r["step"] for r in _rollbacks(run)]),
        ("skipped steps", "x-thin-open", "#555555", [r["step"] for r in run.nonfinite]),
    ):
        if steps:
            traces.append(_event_trace(name, symbol, color, steps, y_of))
            if name != "skipped steps":
                shapes += [_vline(s, {"color": color, "width": 1}) for s in steps[:MAX_MARKER_LINES]]
    return traces, shapes, labels


def _anomaly_markers(run: Run, y_of: Any, span: float) -> tuple[list[dict], list[dict], list[dict]]:
    """Each anomaly kind where it was first raised: one marker trace, a dotted line and a label each."""
    found = anomalies(run)
    if not found:
        return [], [], []
    trace = {
        "type": "scatter",
        "mode": "markers",
        "name": "anomalies",
        "meta": "anomalies",
        "x": [s for _, s in found],
        "y": [y_of(s) for _, s in found],
        "text": [k for k, _ in found],
        "customdata": [anomaly_name(k) for k, _ in found],
        "hovertemplate": "%{customdata} first at step %{x}<extra></extra>",
        "marker": {
            "symbol": "x",
            "size": 12,
            "color": [ANOMALY_COLORS.get(k, "#d62728") for k, _ in found],
            "line": {"width": 2},
        },
    }
    shapes, labels = [], []
    rows = _label_rows([s for _, s in found], [k for k, _ in found], span)
    for (kind, step), row in zip(found, rows, strict=True):
        color = ANOMALY_COLORS.get(kind, "#d62728")
        shapes.append(_vline(step, {"color": color, "dash": "dot", "width": 1.5}))
        labels.append(
            {
                "x": step,
                "xref": "x",
                "y": 1 - 0.07 * row,
                "yref": "paper",
                "text": kind,
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
                "xshift": 2,
                "font": {"color": color, "size": 11},
                "bgcolor": "rgba(255,255,255,0.7)",
            }
        )
    return [trace], shapes, labels


def _event_trace(name: str, symbol: str, color: str, steps: list[int], y_of: Any) -> dict[str, Any]:
    """The markers of restarts, rollbacks or skipped steps on the loss curve."""
    return {
        "type": "scatter",
        "mode": "markers",
        "name": name,
        "meta": name,
        "x": steps,
        "y": [y_of(s) for s in steps],
        "hovertemplate": f"{name[:-1]} at step %{{x}}<extra></extra>",
        "marker": {
            "symbol": symbol,
            "size": 11 if name != "skipped steps" else 7,
            "color": color,
            "line": {"width": 1.5, "color": color},
        },
    }


def _vline(step: int, line: dict[str, Any]) -> dict[str, Any]:
    """A vertical line across the chart at `step`."""
    return {"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0, "y1": 1, "line": line}


def _phase_bands(run: Run, end: int) -> list[dict[str, Any]]:
    entered = phases(run)
    bands = []
    for i, (phase, step) in enumerate(entered):
        stop = entered[i + 1][1] if i + 1 < len(entered) else end
        if stop <= step:
            continue
        first = phase not in [p for p, _ in entered[:i]]
        bands.append(
            {
                "type": "rect",
                "xref": "x",
                "yref": "paper",
                "x0": step,
                "x1": stop,
                "y0": 0,
                "y1": 1,
                "fillcolor": PHASE_COLORS[phase],
                "opacity": 0.10,
                "line": {"width": 0},
                "layer": "below",
                "name": PHASE_WORDS[phase][0],
                "showlegend": first,
                "legendgroup": phase,
            }
        )
    return bands


def loss_chart(run: Run) -> dict[str, Any] | None:
    traces = [
        t
        for t in (
            _trace(run.steps, "global_loss", "train loss (mean over ranks)", "#9ecae1"),
            _trace(run.steps, "loss_ema", "train loss EMA", "#08519c", line={"color": "#08519c", "width": 2.5}),
            _trace(run.vals, "val_loss", "val loss", "#e6550d", mode="lines+markers", marker={"size": 5}),
        )
        if t
    ]
    if not traces:
        return None

    def y_of(step: int) -> float | None:
        value = _nearest(run.steps, step, "loss_ema")
        return value if value is not None else _nearest(run.vals, step, "val_loss")

    end = max([r["step"] for r in run.steps + run.vals] or [0])
    marker_traces, shapes, labels = _markers(run, y_of, end)
    losses = [
        v
        for r in run.steps + run.vals
        for v in (_num(r.get("global_loss")), _num(r.get("val_loss")))
        if math.isfinite(v) and v > 0
    ]
    # A diverged loss spans many decades: on a linear axis everything before the blow-up is a flat line.
    log = bool(losses) and max(losses) > 1000 * min(losses)
    return {
        "data": traces + marker_traces,
        "layout": _layout(
            "Loss", "loss", log=log, height=420, shapes=_phase_bands(run, end) + shapes, annotations=labels
        ),
    }


def lr_chart(run: Run) -> dict[str, Any] | None:
    trace = _trace(run.steps, "lr", "learning rate", "#31a354")
    if trace is None:
        return None
    layout = _layout("Learning rate", "lr", showlegend=False)
    layout["yaxis"]["rangemode"] = "tozero"  # a constant rate stays a line at its value, not at 0 +- 1
    return {"data": [trace], "layout": layout}


def norms_chart(run: Run) -> dict[str, Any] | None:
    traces = [
        t
        for t in (
            _trace(run.steps, "grad_norm", "gradient norm", "#d62728", positive=True),
            _trace(run.steps, "weight_norm", "weight norm", "#1f77b4", positive=True),
        )
        if t
    ]
    return (
        {"data": traces, "layout": _layout("Global gradient and weight norms", "L2 norm", log=True)} if traces else None
    )


def _layer_matrix(run: Run, key: str) -> tuple[list[str], list[int], np.ndarray] | None:
    """Layers x steps of one per-layer value; a step measured twice (after a rollback) keeps its latest."""
    by_step: dict[int, dict[str, float]] = {}
    for record in run.steps:
        if isinstance(record.get(key), dict):
            by_step[record["step"]] = record[key]
    if not by_step:
        return None
    steps = sorted(by_step)
    layers = list(dict.fromkeys(name for s in steps for name in by_step[s]))
    matrix = np.full((len(layers), len(steps)), np.nan)
    index = {name: i for i, name in enumerate(layers)}
    for j, s in enumerate(steps):
        for name, value in by_step[s].items():
            matrix[index[name], j] = _num(value)
    return layers, steps, matrix


def layer_grad_heatmap(run: Run) -> dict[str, Any] | None:
    found = _layer_matrix(run, "layer_grad_norm")
    if found is None:
        return None
    layers, steps, matrix = found
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(np.clip(matrix, RATIO_FLOOR, None))  # a gradient of exactly zero is dead, not missing
    finite = z[np.isfinite(z)]
    lo, hi = (math.floor(finite.min()), math.ceil(finite.max())) if finite.size else (-12, 0)
    ticks = list(range(lo, hi + 1, max(1, (hi - lo) // 8)))
    trace = {
        "type": "heatmap",
        "name": "gradient norm",
        "x": _typed(steps),
        "y": layers,
        "z": _typed(z),
        "colorscale": "Viridis",
        "zmin": lo,
        "zmax": hi,
        "colorbar": {"title": {"text": "grad norm"}, "tickvals": ticks, "ticktext": [f"1e{t}" for t in ticks]},
        "hovertemplate": "layer %{y}<br>step %{x}<br>log10 grad norm %{z:.2f}<extra></extra>",
    }
    height = max(260, min(900, 80 + 18 * len(layers)))
    layout = _layout("Gradient norm per layer (log colour)", "layer", height=height, hovermode="closest")
    layout["yaxis"].update(autorange="reversed", type="category", automargin=True)
    return {"data": [trace], "layout": layout}


def _depth_color(i: int, n: int) -> str:
    """Early layers dark purple, late ones light green (viridis, short of its yellow that vanishes on white)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (170, 220, 50)]
    t = i / max(n - 1, 1) * (len(stops) - 1)
    k = min(int(t), len(stops) - 2)
    a, b = stops[k], stops[k + 1]
    rgb = [round(a[c] + (b[c] - a[c]) * (t - k)) for c in range(3)]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def update_ratio_chart(run: Run) -> dict[str, Any] | None:
    found = _layer_matrix(run, "layer_update_ratio")
    if found is None:
        return None
    layers, steps, matrix = found
    x = _typed(steps)
    traces = []
    steps_arr = np.asarray(steps, dtype=float)
    for i, name in enumerate(layers):
        row = np.clip(matrix[i], RATIO_FLOOR, None)  # an update of exactly zero (a dead layer) stays visible
        finite = np.isfinite(row)
        if finite.any():
            # a layer measured at only some steps is drawn through its own points
            xs = x if finite.all() else _typed(steps_arr[finite])
            traces.append(
                {
                    "type": "scatter",
                    "mode": "lines" if finite.sum() > 1 else "markers",
                    "name": name,
                    "x": xs,
                    "y": _typed(row[finite]),
                    "line": {"color": _depth_color(i, len(layers)), "width": 1.2},
                }
            )
    if not traces:
        return None
    layout = _layout(
        f"Update / weight ratio per layer (0 drawn at {RATIO_FLOOR:g})",
        "||Δw|| / ||w||",
        log=True,
        height=380,
        hovermode="closest",
    )
    layout["legend"] = {"orientation": "v", "x": 1.01, "y": 1, "yanchor": "top", "font": {"size": 11}}
    return {"data": traces, "layout": layout}


def noise_scale_chart(run: Run) -> dict[str, Any] | None:
    trace = _trace(run.steps, "gradient_noise_scale", "gradient noise scale (B_simple)", "#9467bd", positive=True)
    if trace is None:
        return None
    traces = [trace]
    batch = _global_batch(run)
    steps = [r["step"] for r in run.steps]
    if batch and steps:
        traces.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"global batch size ({batch})",
                "x": [min(steps), max(steps)],
                "y": [batch, batch],
                "line": {"color": "#000000", "dash": "dash", "width": 1.5},
            }
        )
    return {"data": traces, "layout": _layout("Gradient noise scale and global batch size", "samples", log=True)}


def step_time_chart(run: Run) -> dict[str, Any] | None:
    per_rank = run.ranks or {0: run.steps}
    traces = []
    for i, rank in enumerate(sorted(per_rank)):
        records = [{"step": r["step"], "ms": _num(r.get("step_seconds")) * 1000} for r in per_rank[rank]]
        trace = _trace(records, "ms", f"rank {rank}", RANK_COLORS[i % len(RANK_COLORS)], positive=True)
        if trace:
            traces.append(trace)
    if not traces:
        return None
    return {"data": traces, "layout": _layout("Step time per rank", "ms per step (mean over the interval)")}


def scalar_charts(run: Run) -> list[tuple[str, str, dict[str, Any]]]:
    """A chart for each custom scalar (`run.log(name=value)`), and the validation accuracy where measured."""
    charts = []
    if any(_finite(v.get("val_accuracy")) for v in run.vals):
        trace = _trace(run.vals, "val_accuracy", "val accuracy", "#e6550d", mode="lines+markers", marker={"size": 5})
        if trace:
            charts.append(
                ("val-accuracy", "half", {"data": [trace], "layout": _layout("Validation accuracy", "accuracy")})
            )
    for i, (name, records) in enumerate(sorted(run.scalars.items())):
        trace = _trace(records, "value", name, RANK_COLORS[i % len(RANK_COLORS)])
        if trace:
            layout = _layout(f"{name} (custom scalar, run.log)", name, showlegend=False)
            charts.append((f"scalar-{i}", "half", {"data": [trace], "layout": layout}))
    return charts


def system_charts(run: Run) -> list[tuple[str, str, dict[str, Any]]]:
    """Each rank's system metrics (system-rankN.jsonl) against the seconds since the run's first sample."""
    if not run.system:
        return []
    start = min((rows[0]["time"] for rows in run.system.values() if rows), default=0.0)
    charts = []
    for key, title, unit, scale in SYSTEM_SERIES:
        traces = []
        for i, rank in enumerate(sorted(run.system)):
            rows = [{"t": r["time"] - start, "v": r[key] * scale} for r in run.system[rank] if _finite(r.get(key))]
            trace = _trace(rows, "v", f"rank {rank}", RANK_COLORS[i % len(RANK_COLORS)], x_key="t")
            if trace:
                traces.append(trace)
        if traces:
            layout = _layout(f"{title} per rank", unit)
            layout["xaxis"]["title"]["text"] = "seconds since the first sample"
            charts.append((f"system-{key.replace('_', '-')}", "half", {"data": traces, "layout": layout}))
    return charts


CHARTS = (
    ("loss", "wide", loss_chart),
    ("lr", "half", lr_chart),
    ("norms", "half", norms_chart),
    ("layer-grad", "wide", layer_grad_heatmap),
    ("update-ratio", "wide", update_ratio_chart),
    ("noise-scale", "half", noise_scale_chart),
    ("step-time", "half", step_time_chart),
)
EMPTY_WHY = {
    "loss": "no step recorded yet",
    "lr": "no measured step yet",
    "norms": "no measured step yet",
    "layer-grad": "no per-layer norms recorded (telemetry off, or no measured step yet)",
    "update-ratio": "no per-layer update ratios recorded (telemetry off, or no measured step yet)",
    "noise-scale": "no gradient noise scale: it needs 2 or more workers and a few measured steps",
    "step-time": "no step times recorded yet",
    "system": "no system metrics recorded: telemetry.system_interval is 0, or no sample was taken yet",
    "system-gpu": "no GPU metrics: a CPU run, or NVML is missing (pip install 'gradwatch[gpu]')",
}


# -------------------------------------------------------------------- page
@lru_cache(maxsize=1)
def plotly_js_packed() -> tuple[str, str, str, str]:
    """plotly.js (the `report` extra's copy), gzip-compressed and base64-encoded, its name and version, and
    the CSP sources of its script text and of the style sheets it adds."""
    try:
        from plotly import __version__ as plotly_version
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ReportError("reports need plotly: pip install 'gradwatch[report]' (or `pip install plotly`)") from None
    js = get_plotlyjs()
    found = re.search(r"plotly\.js v([\w.-]+)", js[:2000])
    version = f"plotly.js {found.group(1)}" if found else f"plotly {plotly_version}"
    # plotly.js adds style sheets of its own as it loads (its map controls'): their text sits in the bundle
    styles = " ".join(_sha256(css) for css in PLOTLY_STYLE.findall(js) if "\\" not in css)
    packed = base64.b64encode(gzip.compress(js.encode(), compresslevel=9, mtime=0)).decode()
    return packed, version, _sha256(js), styles


PLOTLY_STYLE = re.compile(r"""createElement\("style"\);[^;]{0,200}?textContent='((?:[^'\\]|\\.)*)'""")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(*, header: bool = True) -> str:
    """The report's policy: nothing loads from anywhere; only its own loader and the plotly.js it unpacks run
    (their sha256), only its own style sheet (and the empty one plotly fills through the CSSOM) applies, and
    plotly's style attributes and data: images are allowed. `frame-ancestors` works only as a header (a <meta>
    policy must leave it out, or the browser reports it)."""
    template = TEMPLATE.read_text()
    scripts = [_sha256(m) for m in re.findall(r"<script>(.*?)</script>", template, re.S)]
    styles = [_sha256(m) for m in re.findall(r"<style>(.*?)</style>", template, re.S)] + [_sha256("")]
    policy = [
        "default-src 'none'",
        f"script-src {' '.join([*scripts, plotly_js_packed()[2]])}",
        f"style-src-elem {' '.join(styles)} {plotly_js_packed()[3]}",
        "style-src-attr 'unsafe-inline'",
        "img-src data: blob:",
        "font-src data:",
        "worker-src blob:",
        "base-uri 'none'",
        "form-action 'none'",
    ]
    if header:
        policy.append("frame-ancestors 'none'")
    return "; ".join(policy)


def response_headers() -> dict[str, str]:
    """What the service sends with a report: its policy, no MIME sniffing, no framing, no caching."""
    return {
        "Content-Security-Policy": content_security_policy(header=True),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def _safe_json(value: Any) -> str:
    """JSON that can sit inside a <script> element: no '<', '>' or '&' (so no '</script>' or '<!--' can end
    or bend the element), no line separators; JSON.parse reads the escapes back as the same characters."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def _plotly_text(value: Any, key: str = "") -> Any:
    """Every string of a figure with '&', '<' and '>' as HTML entities: plotly renders a subset of HTML in
    names, tick labels, titles and annotations (links included), and shows entities as their characters.
    Only the report's own hover templates keep their markup (what they substitute is escaped here)."""
    if isinstance(value, str):
        return value if key == "hovertemplate" else html.escape(value, quote=False)
    if isinstance(value, dict):
        return {k: _plotly_text(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_plotly_text(v, key) for v in value]
    return value


def _clean(value: Any) -> Any:
    """NaN and infinities become null (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def lr_story(run: Run) -> str | None:
    """The learning rate as the run logged it, in words: its warm-up, then constant or the decay's shape
    (cosine, linear, exponential, step) read off the curve."""
    by_step = {r["step"]: float(r["lr"]) for r in run.steps if _finite(r.get("lr"))}
    if not by_step:
        return None
    steps = np.asarray(sorted(by_step), dtype=float)
    lrs = np.asarray([by_step[int(s)] for s in steps])
    peak = float(lrs.max())
    top = int(np.argmax(lrs >= peak * (1 - 1e-9)))
    parts = []
    if top > 0 and lrs[0] < 0.9 * peak:
        parts.append(f"warm-up from {lrs[0]:.3g} to {peak:.3g} over steps {int(steps[0])}-{int(steps[top])}")
    tail, at = lrs[top:], steps[top:]
    end = float(tail[-1])
    if np.all(np.abs(tail - peak) <= 1e-3 * peak) or len(tail) < 3:
        parts.append(f"constant at {peak:.3g}" if parts else f"constant {peak:.3g}")
    elif np.any(np.diff(tail) > 1e-6 * peak):
        parts.append(f"varying between {float(tail.min()):.3g} and {peak:.3g} (not only falling)")
    else:
        t = (at - at[0]) / (at[-1] - at[0])
        y = (tail - end) / (peak - end)
        fits = {"cosine": 0.5 * (1 + np.cos(np.pi * t)), "linear": 1 - t}
        errors = {name: float(np.sqrt(np.mean((y - f) ** 2))) for name, f in fits.items()}
        if end > 0:
            logs = (np.log(tail) - math.log(end)) / (math.log(peak) - math.log(end))
            errors["exponential"] = float(np.sqrt(np.mean((logs - (1 - t)) ** 2)))
        drops = int(np.count_nonzero(np.diff(tail) < -1e-6 * peak))
        name = min(errors, key=errors.__getitem__)
        if drops <= 10 and drops < len(tail) / 10:
            shape = f"step decay ({drops} drop{'s' if drops != 1 else ''})"
        else:
            shape = f"{name} decay" if errors[name] < 0.03 else "decay"
        parts.append(f"{shape} from {peak:.3g} to {end:.3g} by step {int(at[-1])}")
    return ", then ".join(parts) + " (as logged)"


def _spec_summary(spec: dict[str, Any], run: Run | None = None) -> list[tuple[str, str]]:
    if not spec:
        return []
    story = lr_story(run) if run is not None else None
    train = spec.get("train") or {}
    if isinstance(train, dict) and train.get("entrypoint"):
        return _entrypoint_summary(spec, train, run, story)
    model, data, opt = spec.get("model") or {}, spec.get("data") or {}, spec.get("optimizer") or {}
    scaling, schedule = spec.get("scaling") or {}, spec.get("schedule") or {}
    model_bits = ", ".join(f"{k} {v}" for k, v in model.items() if k != "name" and v not in (None, [], {}))
    steps = f"{spec['max_steps']} steps" if spec.get("max_steps") else f"{spec.get('epochs')} epochs"
    rows = [
        ("model", f"{model.get('name')}" + (f" ({model_bits})" if model_bits else "")),
        ("data", f"{data.get('name')}"),
        (
            "optimizer",
            f"{opt.get('name')} lr {_fmt(opt.get('lr'))}"
            + (f", weight decay {_fmt(opt.get('weight_decay'))}" if opt.get("weight_decay") else "")
            + (f", {schedule.get('name')} schedule" if schedule.get("name") else "")
            + (f", warm-up {schedule.get('warmup_steps')}" if schedule.get("warmup_steps") else ""),
        ),
        (
            "training",
            f"{steps}, batch {spec.get('batch_size')} per worker x {scaling.get('num_workers')} "
            f"{'GPU' if scaling.get('use_gpu') else 'CPU'} workers"
            + (f", grad clip {spec['grad_clip']}" if spec.get("grad_clip") else ""),
        ),
        (
            "telemetry",
            f"every {(spec.get('telemetry') or {}).get('interval')} steps; on divergence: {spec.get('on_divergence')}",
        ),
    ]
    if story:
        rows.insert(3, ("learning rate", story))
    return rows + _labels(spec)


def _labels(spec: dict[str, Any]) -> list[tuple[str, str]]:
    labels = spec.get("labels")
    return [("labels", ", ".join(f"{k}={v}" for k, v in labels.items()))] if isinstance(labels, dict) and labels else []


def _optimizer_file(run: Run) -> dict[str, Any] | None:
    """What the training code gave run.watch(): optimizer.json beside spec.json (workers/rundir.py)."""
    return _read_json(run.run_dir / "optimizer.json")


def _entrypoint_summary(
    spec: dict[str, Any], train: dict[str, Any], run: Run | None, story: str | None
) -> list[tuple[str, str]]:
    """A training function's run: its spec's model, data, optimizer and schedule are unused (the function
    makes its own), so the header says what the run itself reported."""
    result, status = (run.result or {}) if run else {}, run.status if run else {}
    reported = result.get("optimizer") or status.get("optimizer") or (_optimizer_file(run) if run else None)
    if isinstance(reported, dict):
        name, lr, scheduler = reported.get("name"), reported.get("lr"), reported.get("scheduler")
        reported = (
            f"{name}" + (f" lr {_fmt(lr)}" if lr is not None else "") + (f", {scheduler} schedule" if scheduler else "")
        )
    optimizer = str(reported) if reported else "made by the training function (its class is not reported)"
    world = result.get("world_size") or status.get("world_size") or (spec.get("scaling") or {}).get("num_workers")
    done = result.get("steps") or status.get("step")
    total = spec.get("max_steps") if (spec.get("max_steps") or 0) < 100_000_000 else None
    steps = f"{done} steps" if done else "no steps yet"
    steps += f" of {total}" if total else ""
    device = "GPU" if (spec.get("scaling") or {}).get("use_gpu") else "CPU"
    rows = [
        ("entrypoint", f"{train['entrypoint']} (its own model, data and optimizer)"),
        ("optimizer", optimizer),
        ("learning rate", story or "none logged yet"),
        ("training", f"{steps} on {world} {device} worker{'s' if world != 1 else ''}"),
        (
            "telemetry",
            f"every {(spec.get('telemetry') or {}).get('interval')} steps; on divergence: {spec.get('on_divergence')}",
        ),
    ]
    return rows + _labels(spec)


def _outcome(run: Run, reason: str | None) -> str:
    r, s = run.result or {}, run.status
    step = r.get("steps") or s.get("step") or (run.steps[-1]["step"] if run.steps else 0)
    total = s.get("max_steps") or run.spec.get("max_steps")
    parts = [f"{run.state}: step {step}" + (f" of {total}" if total else "")]
    if r.get("wall_seconds"):
        parts.append(f"in {r['wall_seconds']:.1f} s")
    world = r.get("world_size") or s.get("world_size")
    if world:
        parts.append(f"on {world} workers")
    text = " ".join(parts)
    train = r.get("train_loss", s.get("train_loss"))
    val = r.get("val_loss", s.get("val_loss"))
    acc = r.get("val_accuracy", s.get("val_accuracy"))
    metrics = [f"train loss {_fmt(train)}"] if train is not None else []
    if val is not None:
        first = r.get("first_val_loss")
        metrics.append(f"val loss {_fmt(val)}" + (f" (first evaluation {_fmt(first)})" if first else ""))
    if acc is not None:
        metrics.append(f"val accuracy {100 * acc:.1f}%")
    if metrics:
        text += "; " + ", ".join(metrics)
    why = reason or r.get("error")
    if why and run.state != "succeeded":
        text += f". Cause: {why}"
    return text + "."


def render_report(run: Run, *, reason: str | None = None) -> str:
    """The page, as one HTML string."""
    packed, plotly_version, _, _ = plotly_js_packed()
    figures: dict[str, Any] = {}
    blocks = []

    def empty(chart_id: str, width: str) -> None:
        why = html.escape(EMPTY_WHY[chart_id])
        blocks.append(f'<section class="chart {width} empty" id="{chart_id}-empty"><p>{why}</p></section>')

    def drawn(chart_id: str, width: str, figure: dict[str, Any]) -> None:
        figures[chart_id] = _plotly_text(_clean(figure))
        blocks.append(f'<section class="chart {width}"><div class="gw-chart" id="{chart_id}"></div></section>')

    for chart_id, width, build in CHARTS:
        figure = build(run)
        if figure is None:
            empty(chart_id, width)
        else:
            drawn(chart_id, width, figure)
    for chart_id, width, figure in scalar_charts(run):
        drawn(chart_id, width, figure)
    system = system_charts(run)
    if system:
        blocks.append('<h2 class="group">System metrics per rank</h2>')
    for chart_id, width, figure in system:
        drawn(chart_id, width, figure)
    if not system and (run.steps or run.system):
        empty("system", "half")
    elif system and not any(chart_id.startswith("system-gpu") for chart_id, _, _ in system):
        empty("system-gpu", "half")
    notes = []
    if run.stride > 1:
        notes.append(f"long history: every {run.stride}th measured step is drawn")
    if run.unreadable_lines:
        notes.append(f"{run.unreadable_lines} unreadable history lines skipped")
    name = run.spec.get("name") or run.job_id
    facts = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _spec_summary(run.spec, run)
    )
    words = "".join(f"<li>{html.escape(line)}</li>" for line in diagnosis(run))
    summary = {
        "job_id": run.job_id,
        "state": run.state,
        "phases": [{"phase": p, "step": s} for p, s in phases(run)],
        "anomalies": [{"kind": k, "first_step": s} for k, s in anomalies(run)],
    }
    return Template(TEMPLATE.read_text()).substitute(
        title=html.escape(f"{name} {run.job_id} - gradwatch report"),
        name=html.escape(name),
        job_id=html.escape(run.job_id),
        state=html.escape(run.state),
        outcome=html.escape(_outcome(run, reason)),
        facts=facts,
        diagnosis=words,
        charts="\n".join(blocks),
        notes=html.escape("; ".join(notes)),
        generated=html.escape(time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())),
        plotly_version=html.escape(plotly_version),
        summary_json=_safe_json(summary),
        figures_json=_safe_json(figures),
        plotly_gz=packed,
        csp=html.escape(content_security_policy(header=False)),
    )


def build_report(run_dir: str | Path) -> str:
    """The page of a run directory (what `gradwatch report RUN_DIR` writes)."""
    return render_report(load_run(run_dir))


def report_for_job(job: Any, runs_dir: Path) -> str:
    """The page of a job the service knows (a store row): its run directory where the driver has written one,
    else the spec and state alone (a queued job). The store's state and reason win over status.json."""
    run_dir = Path(runs_dir) / job.id
    status = {**(job.run_status or {}), "job_id": job.id, "state": job.state}
    if run_dir.is_dir():
        run = load_run(run_dir, job_id=job.id, spec=job.spec, status=status)
        if run.result:  # the service's state is the last word (a cancel or a timeout ends after the driver)
            run.result = {**run.result, "state": job.state}
    else:
        run = Run(run_dir=run_dir, job_id=job.id, spec=job.spec or {}, status=status, result=None)
    return render_report(run, reason=job.reason)


__all__ = [
    "MAX_POINTS",
    "ReportError",
    "Run",
    "anomalies",
    "anomaly_name",
    "build_report",
    "diagnosis",
    "load_run",
    "phases",
    "content_security_policy",
    "render_report",
    "report_for_job",
    "response_headers",
]
