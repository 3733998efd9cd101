"""Detector quality: false-alarm rates on healthy runs, detection rates and delays on broken ones.

    python bench/detector_quality.py [--seeds 100] [--real 50] [--json] [--no-write]

Every curve goes through `workers.replay` (the detectors the workers run, at default thresholds)
and, side by side on the same curves, through the rules other trainers ship:
  megatron   loss >= 10x the max of the first 100 losses (or non-finite)
  olmo       loss > mean + 6 sigma of the last 128 finite losses, after 64 (or non-finite)
  composer   25-step mean loss >= 5x the 500-step mean
  lightning  EarlyStopping on val loss, patience 3 evaluations, min_delta 0
  rlrop      ReduceLROnPlateau on val loss, patience 10, threshold 1e-4 relative
Alerts are the Prometheus alerts the anomalies and phases feed (deploy/rules/source.py).

Curves: bench/corpus.py's synthetic families (seeds 0..N-1 each), the public training logs of
bench/data/real (families real_*_logs, one log a "seed"; labels and sources in its SOURCES.md), and with --real, runs of
gradwatch's own trainer in this process (no Ray) over models, optimizers, schedules, batch sizes
and seeds, plus broken runs (learning rate far too high or too low, a deep sigmoid net).
A healthy row counts the share of runs where each fired at all; an unhealthy row the share caught
at or after the onset, with the delay in steps (p10/p50/p90); a firing before the onset is a
false alarm ("early"). Lead time: how many steps a precursor (grad_norm_growth) fires before the
failure it warns of (exploding_gradients). The tables and the goals they miss are written to the
"Detector quality" section of bench/RESULTS.md (--no-write to leave it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.corpus import HEALTHY, MEANT_FOR, REAL_MEANT_FOR, UNHEALTHY, Curve, real_logs  # noqa: E402
from gradwatch.names import ANOMALIES  # noqa: E402
from workers.replay import ReplayResult, replay_rows  # noqa: E402

ALERTS = (
    "TrainingLossNonFinite",
    "TrainingDiverging",
    "TrainingLossSpike",
    "TrainingStalled",
    "TrainingOverfitting",
    "VanishingGradients",
    "ExplodingGradients",
    "GradNormGrowing",
)
ANCHORS = ("megatron", "olmo", "composer", "lightning", "rlrop")
GOAL_FALSE_ALARM = 0.01
GOAL_DETECTION = 0.95
# precursor -> the failure it warns of, per family: the lead time is the steps between them
PRECURSORS = {"grad_norm_growth_100x": ("grad_norm_growth", "exploding_gradients")}


# ------------------------------------------------------------------ what fired, per curve
def alerts_of(result: ReplayResult) -> dict[str, int]:
    """First step each alert would fire, from the anomalies and phases as the rules read them."""
    first: dict[str, int] = {}

    def fire(alert: str, step: int) -> None:
        first[alert] = min(first.get(alert, step), step)

    by_alert = {
        "nonfinite": "TrainingLossNonFinite",
        "divergence": "TrainingDiverging",
        "loss_spike": "TrainingLossSpike",
        "plateau": "TrainingStalled",
        "lr_too_low": "TrainingStalled",
        "overfitting": "TrainingOverfitting",
        "vanishing_gradients": "VanishingGradients",
        "exploding_gradients": "ExplodingGradients",
        "dead_run": "TrainingStalled",
        "lr_schedule": "TrainingStalled",
        "grad_norm_growth": "GradNormGrowing",
    }
    for kind, step in result.anomalies.items():
        if kind in by_alert:  # a kind with no alert of its own (yet) fires none
            fire(by_alert[kind], step)
    for phase, step in result.phases:
        if phase == "diverging":
            fire("TrainingDiverging", step)
        elif phase == "stalled":
            fire("TrainingStalled", step)
    return first


def anchors_of(rows: Sequence[dict]) -> dict[str, int]:
    """First step each anchor rule fires on these rows."""
    first: dict[str, int] = {}
    losses: list[float] = []
    finite: list[float] = []
    first100_max = -math.inf
    best_val, bad_es, best_rl, bad_rl = math.inf, 0, math.inf, 0
    for row in rows:
        step = row["step"]
        loss = row.get("global_loss", row.get("loss"))
        if loss is not None:
            loss = float(loss)
            if not math.isfinite(loss):
                first.setdefault("megatron", step)
                first.setdefault("olmo", step)
            else:
                if len(losses) < 100:
                    first100_max = max(first100_max, loss)
                elif loss >= 10.0 * first100_max:
                    first.setdefault("megatron", step)
                if len(finite) >= 64:
                    recent = finite[-128:]
                    mean = sum(recent) / len(recent)
                    std = math.sqrt(sum((v - mean) ** 2 for v in recent) / len(recent))
                    if loss > mean + 6.0 * std:
                        first.setdefault("olmo", step)
                finite.append(loss)
            losses.append(loss)
            if len(losses) >= 500 and "composer" not in first:
                short, long = losses[-25:], losses[-500:]
                if all(map(math.isfinite, long)) and sum(short) / 25 >= 5.0 * sum(long) / 500:
                    first["composer"] = step
        val = row.get("val_loss")
        if val is not None and math.isfinite(val):
            if val < best_val:
                best_val, bad_es = val, 0
            else:
                bad_es += 1
                if bad_es >= 3:
                    first.setdefault("lightning", step)
            if val < best_rl * (1.0 - 1e-4):
                best_rl, bad_rl = val, 0
            else:
                bad_rl += 1
                if bad_rl > 10:
                    first.setdefault("rlrop", step)
    return first


@dataclass
class Verdict:
    family: str
    onset: int | None
    fired: dict[str, int] = field(default_factory=dict)  # detector/alert/anchor name -> first step


def judge(curve: Curve) -> Verdict:
    rows = curve.rows
    result = replay_rows(
        ((f"{curve.family}:{curve.seed}", r) for r in rows), warmup_steps=curve.warmup_steps, max_steps=curve.max_steps
    )
    alerts = alerts_of(result)
    fired = {**result.anomalies, **alerts, **anchors_of(rows)}
    failed = [fired[k] for k in ("divergence", "plateau") if k in fired]
    if failed:  # a run that never learns may blow up (divergence) or sit at its start (a stall): both catch it
        fired["divergence|plateau"] = min(failed)
    paged = [alerts[k] for k in ("TrainingDiverging", "TrainingStalled") if k in alerts]
    if paged:
        fired["TrainingDiverging|TrainingStalled"] = min(paged)
    after = [s for s in alerts.values() if curve.onset is not None and s >= curve.onset]
    if after:
        fired["first_alert"] = min(after)
    return Verdict(curve.family, curve.onset, fired)


# ------------------------------------------------------------------ tables
NAMES = (*ANOMALIES, *ALERTS, *ANCHORS, "first_alert", "divergence|plateau", "TrainingDiverging|TrainingStalled")


def rate_rows(verdicts: dict[str, list[Verdict]]) -> dict[str, dict]:
    """Per family: runs, and per name: share fired (healthy) or share caught after onset + delays."""
    table = {}
    for family, runs in verdicts.items():
        row: dict = {"runs": len(runs), "healthy": runs[0].onset is None}
        for name in NAMES:
            if row["healthy"]:
                row[name] = {"rate": sum(name in v.fired for v in runs) / len(runs)}
                continue
            delays = [
                v.fired[name] - v.onset
                for v in runs
                if v.onset is not None and name in v.fired and v.fired[name] >= v.onset
            ]
            early = sum(v.onset is not None and name in v.fired and v.fired[name] < v.onset for v in runs)
            cell = {"rate": len(delays) / len(runs), "early": early / len(runs)}
            if delays:
                cell.update(
                    zip(("p10", "p50", "p90"), (float(x) for x in np.percentile(delays, [10, 50, 90])), strict=True)
                )
            row[name] = cell
        table[family] = row
    return table


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.1f}%"


def print_tables(table: dict[str, dict], out=sys.stdout) -> list[str]:
    """Print the two tables; returns the goals missed, in words."""
    misses: list[str] = []
    healthy = {f: r for f, r in table.items() if r["healthy"]}
    unhealthy = {f: r for f, r in table.items() if not r["healthy"]}
    cols = [*ANOMALIES, "alerts", *ANCHORS]
    print(
        "\nFalse alarms on healthy runs (share of runs where it fired at all; goal <= 1%, 0 for "
        "divergence and nonfinite):",
        file=out,
    )
    print(f"| family | runs | {' | '.join(cols)} |", file=out)
    print("|---|---:|" + "---:|" * len(cols), file=out)
    for family, row in healthy.items():
        any_alert = max(row[a]["rate"] for a in ALERTS)
        cells = [_pct(row[k]["rate"]) for k in ANOMALIES] + [_pct(any_alert)] + [_pct(row[a]["rate"]) for a in ANCHORS]
        print(f"| {family} | {row['runs']} | {' | '.join(cells)} |", file=out)
        for kind in ANOMALIES:
            limit = 0.0 if kind in ("divergence", "nonfinite") else GOAL_FALSE_ALARM
            if row[kind]["rate"] > limit:
                misses.append(f"{kind} fires on {_pct(row[kind]['rate'])} of {family} (goal <= {_pct(limit)})")
    print(
        "\nDetection on broken runs (caught at or after the onset; delay p10/p50/p90 in steps; "
        "early = fired before the onset):",
        file=out,
    )
    # An anchor "catches" a family when it finds >= 95% of it and stays under the false-alarm goal on
    # every healthy family; one that fires on most healthy runs catches everything and means nothing.
    usable = [a for a in ANCHORS if all(r[a]["rate"] <= GOAL_FALSE_ALARM for r in healthy.values())]
    print(f"(anchors under the false-alarm goal on every healthy family: {', '.join(usable) or 'none'})", file=out)
    print(
        "| family | runs | meant for | ours | delay | alert | first alert | "
        + " | ".join(ANCHORS)
        + " | other anomalies |",
        file=out,
    )
    print("|---|---:|---|---:|---|---:|---:|" + "---:|" * len(ANCHORS) + "---|", file=out)
    for family, row in unhealthy.items():
        kind, alert = MEANT_FOR[family]
        cell = row[kind]
        delay = "/".join(f"{cell[p]:.0f}" for p in ("p10", "p50", "p90")) if "p50" in cell else "-"
        anchor_cells = [
            f"{_pct(row[a]['rate'])} ({row[a]['p50']:.0f})" if "p50" in row[a] else _pct(row[a]["rate"])
            for a in ANCHORS
        ]
        others = ", ".join(
            f"{k} {_pct(row[k]['rate'] + row[k]['early'])}"
            for k in ANOMALIES
            if k != kind and row[k]["rate"] + row[k]["early"] > 0.0
        )
        first = row["first_alert"]
        first_cell = f"{first['p50']:.0f}" if "p50" in first else "-"
        print(
            f"| {family} | {row['runs']} | {kind} | {_pct(cell['rate'])} | {delay} | "
            f"{_pct(row[alert]['rate'])} | {first_cell} | {' | '.join(anchor_cells)} | {others or '-'} |",
            file=out,
        )
        if cell["rate"] < GOAL_DETECTION:
            misses.append(f"{kind} catches {_pct(cell['rate'])} of {family} (goal >= {_pct(GOAL_DETECTION)})")
        if cell["early"] > GOAL_FALSE_ALARM:
            misses.append(f"{kind} fires before the onset on {_pct(cell['early'])} of {family}")
        best = [row[a]["p50"] for a in usable if "p50" in row[a] and row[a]["rate"] >= GOAL_DETECTION]
        if best and first_cell != "-" and first["p50"] > min(best):
            misses.append(
                f"{family}: first alert after a median {first['p50']:.0f} steps, the best anchor "
                f"that catches it after {min(best):.0f}"
            )
    return misses


def print_lead_times(verdicts: dict[str, list[Verdict]], out=sys.stdout) -> list[str]:
    """Steps from each precursor to the failure it warns of; returns the goals missed, in words."""
    misses: list[str] = []
    print(
        "\nLead time of precursors (steps from the warning to the failure; goal: the warning first in >= 95%):",
        file=out,
    )
    print("| family | runs | precursor | failure | warned first | lead p10/p50/p90 |", file=out)
    print("|---|---:|---|---|---:|---|", file=out)
    for family, (early, late) in PRECURSORS.items():
        runs = verdicts.get(family)
        if not runs:
            continue
        leads = [v.fired[late] - v.fired[early] for v in runs if early in v.fired and late in v.fired]
        first = sum(lead > 0 for lead in leads) / len(runs)
        cell = "/".join(f"{x:.0f}" for x in np.percentile(leads, [10, 50, 90])) if leads else "-"
        print(f"| {family} | {len(runs)} | {early} | {late} | {_pct(first)} | {cell} |", file=out)
        if first < GOAL_DETECTION:
            misses.append(f"{early} warns before {late} on {_pct(first)} of {family} (goal >= {_pct(GOAL_DETECTION)})")
    return misses


def judge_real_logs() -> tuple[dict[str, list[Verdict]], list[str]]:
    """The public logs of bench/data/real, by family, and one line per log: what it is and what fired."""
    verdicts: dict[str, list[Verdict]] = {}
    lines = []
    for log in real_logs():
        verdict = judge(log.curve)
        verdicts.setdefault(log.curve.family, []).append(verdict)
        ours = {k: s for k, s in verdict.fired.items() if k in ANOMALIES}
        label = (
            "healthy" if log.curve.onset is None else f"{log.kind} from step {log.curve.onset} (within {log.within})"
        )
        fired = ", ".join(f"{k} at {s}" for k, s in sorted(ours.items(), key=lambda i: i[1])) or "nothing"
        lines.append(f"| {log.file} | {log.repo} | {label} | {fired} |")
    return verdicts, lines


# ------------------------------------------------------------------ real runs of the trainer
def real_specs(count: int) -> list[tuple[str, dict, bool, str | None]]:
    """(family, spec, healthy, expected kind) for `count` healthy runs and the broken ones."""
    rng = np.random.default_rng(1234)
    models = [
        {"name": "mlp", "hidden": [64]},
        {"name": "mlp", "hidden": [128, 64]},
        {"name": "mlp", "hidden": [64, 64], "activation": "tanh"},
        {"name": "cnn", "channels": [8]},
    ]
    optimizers = [
        {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        {"name": "adam", "lr": 1e-3},
        {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        {"name": "sgd", "lr": 0.1},
    ]
    schedules = [{"name": "constant"}, {"name": "cosine", "warmup_steps": 30}, {"name": "step", "step_size": 200}]
    out: list[tuple[str, dict, bool, str | None]] = []
    for i in range(count):
        model = models[i % len(models)]
        data = (
            {"name": "digits", "as_images": True}
            if model["name"] == "cnn"
            else {"name": "digits"}
            if i % 3
            else {"name": "synthetic-classification"}
        )
        spec = {
            "name": f"real-{i}",
            "model": model,
            "data": data,
            "optimizer": optimizers[int(rng.integers(len(optimizers)))],
            "schedule": schedules[int(rng.integers(len(schedules)))],
            "batch_size": int(rng.choice([16, 32, 64, 128])),
            "max_steps": 600,
            "seed": i,
            "validation": {"every_steps": 20},
            "telemetry": {"interval": 10},
            "checkpoint": {"every_steps": 600, "keep": 1},
            "scaling": {"num_workers": 1},
        }
        out.append(("real_healthy", spec, True, None))
    base = {
        "model": {"name": "mlp", "hidden": [64]},
        "data": {"name": "digits"},
        "batch_size": 64,
        "max_steps": 600,
        "validation": {"every_steps": 20},
        "telemetry": {"interval": 10},
        "checkpoint": {"every_steps": 600, "keep": 1},
        "scaling": {"num_workers": 1},
    }
    for seed in range(max(3, count // 10)):
        out.append(
            (
                "real_lr_too_high",
                {**base, "name": "hi", "seed": seed, "optimizer": {"name": "sgd", "lr": 8.0}},
                False,
                "divergence|plateau",
            )
        )
        out.append(
            (
                "real_lr_too_low",
                {**base, "name": "lo", "seed": seed, "optimizer": {"name": "sgd", "lr": 1e-8}},
                False,
                "lr_too_low",
            )
        )
        out.append(
            (
                "real_deep_sigmoid",
                {
                    **base,
                    "name": "sig",
                    "seed": seed,
                    "max_steps": 300,
                    "model": {"name": "mlp", "hidden": [32] * 12, "activation": "sigmoid"},
                    "optimizer": {"name": "sgd", "lr": 0.01},
                },
                False,
                "vanishing_gradients",
            )
        )
    return out


def run_real(count: int, keep: Path | None = None) -> tuple[dict[str, list[Verdict]], dict[str, str]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from gradwatch.spec import load_spec
    from workers.loop import run_local
    from workers.replay import read_rows

    torch.set_num_threads(1)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the runs' event lines: the table says it all
    verdicts: dict[str, list[Verdict]] = {}
    meant: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, (family, raw, healthy, kind) in enumerate(real_specs(count)):
            run_dir = (keep or Path(tmp)) / f"{family}-{n}"
            run_dir.mkdir(parents=True, exist_ok=True)
            spec = load_spec(raw)
            run_local(spec, run_dir=run_dir)
            rows = [row for _, row in read_rows(run_dir / "history.jsonl")]
            warmup = spec.schedule.warmup_steps
            curve = Curve(family, n, rows, None if healthy else 1, warmup, max_steps=spec.max_steps)  # as the run had
            verdicts.setdefault(family, []).append(judge(curve))
            if kind:
                meant[family] = kind
    return verdicts, meant


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="Curves per synthetic family (default 100).")
    parser.add_argument("--real", type=int, default=50, help="Healthy real trainer runs (0 to skip; default 50).")
    parser.add_argument("--json", action="store_true", help="Print the table as JSON instead.")
    parser.add_argument("--keep-runs", type=Path, help="Keep the real runs' directories here (to replay them).")
    parser.add_argument("--no-write", action="store_true", help="Do not write the section of bench/RESULTS.md.")
    args = parser.parse_args(argv)
    if args.seeds < 0 or args.real < 0:
        parser.error("--seeds and --real count curves and runs: give 0 or more")

    families: dict[str, Callable[[int], Curve]] = {**HEALTHY, **UNHEALTHY}
    curves = {name: [make(seed) for seed in range(args.seeds)] for name, make in families.items() if args.seeds}
    steps = sum(len(c.rows) for runs in curves.values() for c in runs)
    started = time.process_time()  # replay alone, on this one core
    for runs in curves.values():
        for c in runs:
            replay_rows(((c.family, r) for r in c.rows), warmup_steps=c.warmup_steps)
    replay_rate = steps / max(time.process_time() - started, 1e-9)
    verdicts = {name: [judge(c) for c in runs] for name, runs in curves.items()}
    logs, log_lines = judge_real_logs()
    verdicts.update(logs)
    MEANT_FOR.update(REAL_MEANT_FOR)
    if args.real:
        real, meant = run_real(args.real, args.keep_runs)
        verdicts.update(real)
        for family, kind in meant.items():
            alert = {
                "divergence|plateau": "TrainingDiverging|TrainingStalled",
                "lr_too_low": "TrainingStalled",
                "vanishing_gradients": "VanishingGradients",
            }[kind]
            MEANT_FOR[family] = (kind, alert)
    table = rate_rows(verdicts)
    if args.json:
        print(json.dumps(table, indent=1, sort_keys=True))
        return 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print(
            f"detector quality: {args.seeds} curves per synthetic family ({steps:,} steps), "
            f"{sum(map(len, logs.values()))} public training logs, {args.real} healthy real runs of the trainer\n"
            f"replay speed: {replay_rate:,.0f} steps/s on one core (goal >= 50,000)"
        )
        misses = print_tables(table, out)
        misses += print_lead_times(verdicts, out)
        print("\nPublic training logs (bench/data/real/SOURCES.md says why each is labelled so):")
        print("| file | source | label | what fired |\n|---|---|---|---|", *log_lines, sep="\n")
        if replay_rate < 50_000:
            misses.append(f"replay speed {replay_rate:,.0f} steps/s (goal >= 50,000)")
        print("\ngoals missed:" if misses else "\nall goals met", *(f"  - {m}" for m in misses), sep="\n")
    print(out.getvalue(), end="")
    if not args.no_write:
        import torch  # noqa: F401  (the machine line names a GPU when there is one)

        from bench.results import write_section

        write_section("detector-quality", "Detector quality", out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
