"""Replay recorded curves through the online detectors: what would have fired, and when.

It reads, recognised by name and content (not only the extension):

- a run's `history.jsonl` (what `gradwatch run` and the service write in the run directory), or any
  JSONL with one object per line;
- CSV with a header line, separated by `,`, tab or `;` (with `;`, a decimal comma is read too), such as
  Lightning's `metrics.csv` (`step`, `epoch`, `train_loss`/`train_loss_step`, `val_loss`, `lr-*`);
- a Hugging Face `trainer_state.json`: its `log_history` (entries with `loss`, `learning_rate`,
  `grad_norm` and entries with `eval_loss`, each at its `step`) and its `max_steps`, the run's planned
  length for the detectors;
- a directory holding one of `history.jsonl`, `trainer_state.json` or `metrics.csv`.

Names are trimmed and case-folded, a UTF-8 byte-order mark is dropped, and the usual names are read
as gradwatch's: `step` (`global_step`, `iter`, `iteration`), `loss` (`train_loss`, `train/loss`,
`train_loss_step`), `val_loss` (`eval_loss`, `val/loss`, `eval/loss`, `validation_loss`,
`val_loss_epoch`), `lr` (`learning_rate`, Lightning's `lr-NAME`), `grad_norm` (`gradient_norm`,
`train/grad_norm`), and per-layer values (`layer_grad_norm`/`layer_update_ratio` objects in JSONL,
columns named `layer_grad_norm/NAME` and `layer_update_ratio/NAME` in CSV). A CSV column it does not
read is a warning; a file without any loss row, a value that is not a number, and steps that go back
are errors naming the file and the line (`ReplayError`). Rows of one step (a validation row beside the
training row, Lightning's rows of one step spread over several lines, a row with an empty loss) are
merged into that step; the same step given twice with different values is an error. In a history, a
restart, rollback or rewind row (`event`) starts the steps again from where the run went back to.

Rows are fed in step order through `DynamicsMonitor`, the very code the workers run, so a replay of a
history gives the run's events.
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
MAX_DOCUMENT_BYTES = 256 << 20  # a whole trainer_state.json
_LAYER_KEYS = ("layer_grad_norm", "layer_update_ratio")
# the values the detectors read: rows of one step may add them, not change them
_REPLAYED = frozenset(("loss", "global_loss", "val_loss", "lr", "grad_norm", "nonfinite", *_LAYER_KEYS))
# what each name gradwatch reads is also called, in order of preference when a file has several
ALIASES: dict[str, tuple[str, ...]] = {
    "step": ("step", "global_step", "iter", "iteration"),
    "loss": ("loss", "train_loss", "train/loss", "train_loss_step"),
    "global_loss": ("global_loss",),
    "val_loss": ("val_loss", "eval_loss", "val/loss", "eval/loss", "validation_loss", "val_loss_epoch"),
    "lr": ("lr", "learning_rate", "lr-NAME"),
    "grad_norm": ("grad_norm", "gradient_norm", "train/grad_norm"),
    "nonfinite": ("nonfinite",),
}
_CANONICAL = {alias.casefold(): (name, rank) for name, aliases in ALIASES.items() for rank, alias in enumerate(aliases)}
# read and left out on purpose: an epoch counter, Lightning's epoch means and per-batch validation
# values, and what its LearningRateMonitor logs beside the learning rate
_LEFT_OUT = frozenset(("epoch", "train_loss_epoch", "val_loss_step"))
_LEFT_OUT_SUFFIXES = ("-momentum", "-weight_decay")
_SEPARATORS = (",", "\t", ";")
# a trainer_state.json entry's keys other than the ones replayed that say nothing about the curve
_HF_KEYS = {"step": "step", "loss": "loss", "eval_loss": "val_loss", "learning_rate": "lr", "grad_norm": "grad_norm"}
_HF_BOOKKEEPING = frozenset(("epoch", "total_flos", "num_input_tokens_seen"))
_HF_SUMMARY = ("train_runtime", "total_flos")  # the closing entry: its train_loss is the run's mean
_LOOKED_FOR = ("history.jsonl", "trainer_state.json", "metrics.csv")


class ReplayError(ValueError):
    """A file that cannot be replayed: says which file, which line and what to fix."""


@dataclass
class ReplayResult:
    file: str
    steps: int = 0
    events: list[Event] = field(default_factory=list)
    phases: list[tuple[str, int]] = field(default_factory=list)
    anomalies: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    max_steps: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "steps": self.steps,
            "max_steps": self.max_steps,
            "events": [dataclasses.asdict(e) for e in self.events],
            "anomalies": [{"kind": k, "first_step": s} for k, s in sorted(self.anomalies.items(), key=lambda i: i[1])],
            "phases": [{"phase": p, "step": s} for p, s in self.phases],
            "warnings": self.warnings,
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


def _step(value: Any, where: str) -> int:
    if type(value) is int and value >= 0:
        return value
    number = _number(value, where, "step")
    if number is None:
        raise ReplayError(f"{where}: every row needs a `step`")
    if not number.is_integer() or number < 0:
        raise ReplayError(f"{where}: step must be a whole number, 0 or more (got {str(value)[:40]!r})")
    return int(number)


def canonical_name(name: str) -> tuple[str, int] | None:
    """The name gradwatch reads for a column or key (`train_loss` -> `loss`) and its rank among that
    name's aliases; ("", 0) for a name read and left out on purpose, None for one it does not know."""
    folded = name.strip().casefold()
    known = _CANONICAL.get(folded)
    if known is not None:
        return known
    if folded in _LEFT_OUT or folded.startswith("lr-") and folded.endswith(_LEFT_OUT_SUFFIXES):
        return "", 0
    if folded.startswith("lr-") and len(folded) > 3:  # Lightning's LearningRateMonitor: lr-Adam, lr-SGD/pg1
        return "lr", _CANONICAL["lr-name"][1]
    return None


def _accepted() -> str:
    return "; ".join(f"{name}: {', '.join(aliases)}" for name, aliases in ALIASES.items() if name != "nonfinite")


@dataclass
class ReplayInput:
    """A file opened for replay: its format, its planned length when it says, and what it warned of.
    `open_input` reads what comes before the rows (a CSV header, a whole trainer_state.json); `rows()`
    reads the rows, each checked, in step order, the rows of one step merged."""

    path: Path
    format: str  # "jsonl", "csv" or "trainer_state"
    max_steps: int | None = None
    warnings: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # what the file names, for a file without a loss
    separator: str = ","
    plan: list[tuple[int, str, str]] = field(default_factory=list)  # CSV: (column, name, layer)
    entries: list[Any] = field(default_factory=list)  # trainer_state.json: its log_history

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.format == "trainer_state":
            return _in_step_order(self._trainer_state_rows())
        return _in_step_order(self._file_rows())

    def no_loss_message(self) -> str:
        """What to say of a file whose rows carry no training loss."""
        found = ", ".join(self.columns[:40]) or "none"
        if self.format == "trainer_state":
            return (
                f"{self.path}: no log_history entry has a `loss` (keys found: {found}); the Trainer logs the "
                "training loss every `logging_steps` steps, so a run shorter than that has none to replay"
            )
        what = "the header line has the columns" if self.format == "csv" else "the rows have the keys"
        where = f"{self.path}:1" if self.format == "csv" else str(self.path)
        return (
            f"{where}: no row has a training loss to replay; {what} {found}. "
            f"Accepted names (trimmed, any case) - {_accepted()}"
        )

    def _file_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as handle:
                if self.format == "csv":
                    yield from self._csv_rows(handle)
                else:
                    yield from _jsonl_rows(self, handle)
        except UnicodeDecodeError as exc:
            raise ReplayError(f"{self.path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
        except OSError as exc:
            raise ReplayError(f"{self.path}: cannot read it ({exc.strerror})") from None

    def _csv_rows(self, handle: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        reader = csv.reader(handle, delimiter=self.separator, skipinitialspace=True)
        path, width = self.path, len(self.columns)
        scalars = [(i, name) for i, name, layer in self.plan if not layer]
        layers = [(i, name, layer) for i, name, layer in self.plan if layer]
        decimal_comma = self.separator == ";"
        try:
            next(reader, None)  # the header, read by open_input
            for cells in reader:
                if not cells:
                    continue
                where = f"{path}:{reader.line_num}"
                if len(cells) > width:
                    raise ReplayError(f"{where}: more values than header columns ({len(cells)} > {width})")
                row: dict[str, Any] = {}
                for i, name in scalars:
                    value = cells[i].strip() if i < len(cells) else ""
                    if value:
                        if decimal_comma:
                            value = value.replace(",", ".")
                        row[name] = value if name == "step" else _number(value, where, name)
                for i, name, layer in layers:
                    value = cells[i].strip() if i < len(cells) else ""
                    if value:
                        row.setdefault(name, {})[layer] = _number(value, where, f"{name}/{layer}")
                yield where, row
        except csv.Error as exc:
            raise ReplayError(f"{path}:{reader.line_num}: not CSV ({exc})") from None

    def _trainer_state_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for number, entry in enumerate(self.entries):
            where = f"{self.path}: log_history[{number}]"
            if not isinstance(entry, dict):
                raise ReplayError(f"{where}: each log_history entry must be an object (got {type(entry).__name__})")
            if any(key in entry for key in _HF_SUMMARY):
                continue  # the run's closing summary, not a step of the curve
            row: dict[str, Any] = {}
            for key, value in entry.items():
                name = _HF_KEYS.get(key)
                if name is not None:
                    row[name] = value
            yield where, row


def _jsonl_rows(source: ReplayInput, lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    path = source.path
    plans: dict[tuple[str, ...], dict[str, str] | None] = {}  # a row's keys -> their renames (None: none)
    seen: dict[str, None] = {}
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
        keys = tuple(row)
        if keys in plans:
            plan = plans[keys]
        else:
            if len(plans) > 256:
                plans.clear()
            plan = plans[keys] = _renames(keys)
            if len(seen) < 64:
                seen.update(dict.fromkeys(keys))
                source.columns = list(seen)
        if plan is not None:
            row = {plan.get(k, k): v for k, v in row.items()}
        yield where, row


def _renames(keys: tuple[str, ...]) -> dict[str, str] | None:
    """How to rename a JSON row's keys to gradwatch's names: the best-ranked alias of each name wins."""
    best: dict[str, tuple[int, str]] = {}
    for key in keys:
        known = canonical_name(key)
        if known and known[0] and (known[0] not in best or known[1] < best[known[0]][0]):
            best[known[0]] = (known[1], key)
    renames = {key: name for name, (_, key) in best.items() if key != name}
    return renames or None


def _same(old: Any, new: Any) -> bool:
    if old == new:
        return True
    if isinstance(old, float) and isinstance(new, float):
        return math.isnan(old) and math.isnan(new)
    return False


def _merge(kept: dict[str, Any], kept_where: str, row: Mapping[str, Any], where: str, step: int) -> None:
    """Add a further row of one step to the first: new values join, a value given again must not change."""
    for key, value in row.items():
        if key not in _REPLAYED or value is None or value == "":
            kept.setdefault(key, value)
            continue
        if key in _LAYER_KEYS:
            if not isinstance(value, Mapping):
                raise ReplayError(f"{where}: {key} must map layer names to numbers")
            layers = kept.setdefault(key, {})
            if not isinstance(layers, dict):
                raise ReplayError(f"{kept_where}: {key} must map layer names to numbers")
            for layer, number in value.items():
                _merge_value(layers, kept_where, str(layer), _number(number, where, f"{key}.{layer}"), where, step)
            continue
        number = value if key == "nonfinite" else _number(value, where, key)
        _merge_value(kept, kept_where, key, number, where, step)


def _merge_value(kept: dict[str, Any], kept_where: str, key: str, value: Any, where: str, step: int) -> None:
    if value is None:
        return
    old = kept.get(key)
    if old is None or old == "":
        kept[key] = value
        return
    if key != "nonfinite" and not isinstance(old, bool):
        old = _number(old, kept_where, key)
    if not _same(old, value):
        raise ReplayError(
            f"{where}: step {step} again with another {key} ({value!r}; {kept_where} gave {old!r}): rows of one "
            "step may add values, not change them; keep one row per step (or one value per column)"
        )


def _in_step_order(rows: Iterable[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows with whole-number steps that never go back, those of one step merged into one."""
    pending: dict[str, Any] | None = None
    pending_where = ""
    last = -1
    for where, row in rows:
        if "event" in row:
            # a history's restart, rollback or rewind: the run went back, its rows start again from there
            if pending is not None:
                yield pending_where, pending
                pending = None
            last = -1
            yield where, row
            continue
        step = _step(row.get("step"), where)
        if pending is not None:
            if step == last:
                _merge(pending, pending_where, row, where, step)
                continue
            if step < last:
                raise ReplayError(
                    f"{where}: step {step} comes after step {last} ({pending_where}): steps must not go back; "
                    "sort the rows by step"
                )
            yield pending_where, pending
        row["step"] = step
        pending, pending_where, last = row, where, step
    if pending is not None:
        yield pending_where, pending


def _folder_input(path: Path) -> Path:
    for name in _LOOKED_FOR:
        if (path / name).is_file():
            return path / name
    raise ReplayError(f"{path}: a directory without {', '.join(_LOOKED_FOR[:-1])} or {_LOOKED_FOR[-1]} in it")


def open_input(path: Path) -> ReplayInput:
    """Recognise a file's format from its name and first line, and read what precedes its rows."""
    if path.is_dir():
        path = _folder_input(path)
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            first = handle.readline(MAX_ROW_BYTES + 1)
            stripped = first.strip()
            if stripped.startswith("{"):
                try:
                    head = json.loads(stripped)
                except json.JSONDecodeError:
                    head = None
                if isinstance(head, dict) and "log_history" in head:
                    return _trainer_state(path, head)
                if head is None and path.suffix.casefold() not in (".jsonl", ".ndjson"):
                    handle.seek(0)
                    return _trainer_state(path, _document(path, handle))
                return ReplayInput(path, "jsonl")
            if stripped.startswith("[") or path.suffix.casefold() in (".jsonl", ".json", ".ndjson"):
                return ReplayInput(path, "jsonl")
            if not stripped:
                raise ReplayError(f"{path}: empty file: nothing to replay (a header line and rows, or JSON rows)")
            if len(first) > MAX_ROW_BYTES:
                raise ReplayError(f"{path}:1: header line longer than {MAX_ROW_BYTES} bytes")
            return _csv_input(path, first)
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read it ({exc.strerror})") from None


def _document(path: Path, handle: Any) -> Any:
    text = handle.read(MAX_DOCUMENT_BYTES + 1)
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ReplayError(f"{path}: a JSON document over {MAX_DOCUMENT_BYTES >> 20} MiB")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplayError(
            f"{path}:{exc.lineno}: not JSON ({exc.msg}); replay reads a whole trainer_state.json or JSONL "
            "(one object per line)"
        ) from None


def _trainer_state(path: Path, doc: Any) -> ReplayInput:
    if not isinstance(doc, dict) or "log_history" not in doc:
        keys = ", ".join(list(doc)[:20]) if isinstance(doc, dict) else type(doc).__name__
        raise ReplayError(
            f"{path}: a JSON document without `log_history` (it has {keys}); replay reads a Hugging Face "
            "trainer_state.json or JSONL (one object per line)"
        )
    entries = doc["log_history"]
    if not isinstance(entries, list):
        raise ReplayError(f"{path}: log_history must be a list of logged entries (got {type(entries).__name__})")
    source = ReplayInput(path, "trainer_state", entries=entries)
    planned = doc.get("max_steps")
    if planned is not None and (type(planned) is not int or planned < 0):
        raise ReplayError(f"{path}: max_steps must be a whole number of steps (got {str(planned)[:40]!r})")
    source.max_steps = planned or None  # 0: the Trainer did not know the run's length
    seen: dict[str, None] = {}
    for entry in entries:
        if isinstance(entry, dict) and len(seen) < 200:
            seen.update(dict.fromkeys(entry))
    source.columns = list(seen)
    left_out = [
        k
        for k in seen
        if k not in _HF_KEYS
        and k not in _HF_BOOKKEEPING
        and not k.startswith(("eval_", "train_"))  # the evaluation's other metrics, the closing summary
    ]
    if left_out:
        source.warnings.append(
            f"{path}: log_history keys not replayed: {', '.join(left_out[:20])} "
            "(replay reads step, loss, eval_loss, learning_rate and grad_norm)"
        )
    return source


def _csv_input(path: Path, header_line: str) -> ReplayInput:
    separator = max(_SEPARATORS, key=header_line.count) if any(s in header_line for s in _SEPARATORS) else ","
    header = next(csv.reader([header_line], delimiter=separator, skipinitialspace=True), [])
    columns = [c.strip() for c in header]
    source = ReplayInput(path, "csv", columns=columns, separator=separator)
    best: dict[str, tuple[int, int]] = {}  # name -> (rank, column)
    layers: list[tuple[int, str, str]] = []
    unknown: list[str] = []
    for i, column in enumerate(columns):
        prefix, _, layer = column.partition("/")
        if prefix.casefold() in _LAYER_KEYS and layer.strip():
            layers.append((i, prefix.casefold(), layer.strip()))
            continue
        known = canonical_name(column)
        if known is None:
            unknown.append(column)
        elif known[0]:
            name, rank = known
            if name in best and best[name][0] <= rank:
                other = i  # a column of this name ranked before it is replayed
            else:
                other = best[name][1] if name in best else -1
                best[name] = (rank, i)
            if other >= 0:
                source.warnings.append(
                    f"{path}:1: column {columns[other]!r} also gives {name}; "
                    f"replaying column {columns[best[name][1]]!r}"
                )
    if "step" not in best:
        raise ReplayError(
            f"{path}:1: the CSV header must name a `step` column ({', '.join(ALIASES['step'])}); "
            f"it has {', '.join(columns) or 'no columns'} (separated by {separator!r})"
        )
    for column in unknown:
        source.warnings.append(
            f"{path}:1: column {column!r} is not replayed (replay reads step, loss, val_loss, lr, grad_norm "
            "and layer_grad_norm/NAME, layer_update_ratio/NAME columns, by the names `gradwatch replay --help` lists)"
        )
    source.plan = sorted([(i, name, "") for name, (_, i) in best.items()] + layers)
    return source


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a file replay reads, checked as it is read, in step order."""
    return open_input(path).rows()


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


def replay_input(
    source: ReplayInput,
    spec: DetectorSpec | None = None,
    *,
    warmup_steps: int = 0,
    max_steps: int | None = None,
) -> ReplayResult:
    """Replay an opened file; `max_steps` (else the file's own) is the run's planned length."""
    planned = max_steps if max_steps is not None else source.max_steps
    result = replay_rows(source.rows(), spec, warmup_steps=warmup_steps, file=str(source.path), max_steps=planned)
    if result.steps == 0:
        raise ReplayError(source.no_loss_message())
    result.warnings = list(source.warnings)
    result.max_steps = planned
    return result


def replay_file(
    path: Path, spec: DetectorSpec | None = None, *, warmup_steps: int = 0, max_steps: int | None = None
) -> ReplayResult:
    """Replay one file (or a run directory); `max_steps`, when given, overrides the length the file states."""
    return replay_input(open_input(path), spec, warmup_steps=warmup_steps, max_steps=max_steps)
