"""The report read from run directories shaped as the telemetry writes them: sparse series, custom scalars
(thinned with the steps on a long history), the learning-rate schedule in words."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.report.report import MAX_POINTS, load_run, lr_story, render_report, scalar_charts


def write_run(run_dir: Path, steps: int, lr, *, scalars_every: int = 0) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps({"name": "r", "train": {"entrypoint": "pkg.mod:train"}}))
    with (run_dir / "history.jsonl").open("w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "global_loss": 1.0, "loss_ema": 1.0, "lr": lr(step)}) + "\n")
            if scalars_every and step % scalars_every == 0:
                f.write(json.dumps({"step": step, "event": "scalars", "scalars": {"acc": step / steps}}) + "\n")


@pytest.mark.parametrize(
    ("lr", "words"),
    [
        (lambda s: 0.01, "constant 0.01"),
        (lambda s: 0.01 * (1 - (s - 1) / 1000), "linear decay from 0.01"),
        (lambda s: 0.01 * 0.5 ** ((s - 1) // 300), "step decay (3 drops) from 0.01 to 0.00125"),
        (lambda s: 0.01 * 0.995 ** (s - 1), "exponential decay from 0.01"),
        (lambda s: min(s / 100, 1) * 0.01, "warm-up from 0.0001 to 0.01 over steps 1-100, then constant at 0.01"),
        (lambda s: 0.005 * (1 + math.cos(math.pi * (s - 1) / 999)), "cosine decay from 0.01"),
    ],
)
def test_the_schedule_is_read_off_the_logged_learning_rate(tmp_path, lr, words):
    write_run(tmp_path / "run", 1000, lr)
    story = lr_story(load_run(tmp_path / "run"))
    assert story is not None and words in story, story


def test_custom_scalars_are_thinned_with_the_steps_and_keep_their_own_chart(tmp_path):
    write_run(tmp_path / "run", 3 * MAX_POINTS, lambda s: 0.01, scalars_every=1)
    run = load_run(tmp_path / "run")
    assert run.stride == 3
    assert MAX_POINTS // 2 < len(run.steps) <= MAX_POINTS  # both kinds thinned by their own count
    assert MAX_POINTS // 2 < len(run.scalars["acc"]) <= MAX_POINTS + 1  # and the last line
    charts = scalar_charts(run)
    assert [c[0] for c in charts] == ["scalar-0"] and charts[0][2]["data"][0]["name"] == "acc"
    page = render_report(run)
    assert 'id="scalar-0"' in page and "pkg.mod:train" in page


def test_an_unknown_number_in_a_step_line_is_a_custom_scalar(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": s, "global_loss": 1.0, "lr": 0.1, "tokens_seen": 10.0 * s, "note": "x"} for s in range(1, 6)]
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(run_dir)
    assert sorted(run.scalars) == ["tokens_seen"]
    assert [r["value"] for r in run.scalars["tokens_seen"]] == [10.0, 20.0, 30.0, 40.0, 50.0]
