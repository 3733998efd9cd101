"""`gradwatch replay`: a run's own history gives back the run's events; CSV and JSONL rows; bad files."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from bench.corpus import UNHEALTHY
from gradwatch.spec import load_spec
from service.cli.main import app
from tests.conftest import EXAMPLES
from workers.loop import Trainer
from workers.session import LocalSession

runner = CliRunner()


def replay(*args: str):
    return runner.invoke(app, ["replay", *args])


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    """A real run of the diverging example (one worker, no Ray) and its outcome."""
    run_dir = tmp_path_factory.mktemp("run")
    data = yaml.safe_load((EXAMPLES / "diverging.yaml").read_text())
    # blows up early (a short warm-up) and runs on to its end through the non-finite steps
    data.update(
        scaling={"num_workers": 1},
        max_steps=200,
        max_skipped_steps=None,
        on_divergence="alert",
        schedule={"name": "constant", "warmup_steps": 60},
    )
    spec = load_spec(data)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(data))
    outcome = Trainer(spec, LocalSession(run_dir / "ckpt"), run_dir=run_dir).train()
    return run_dir / "history.jsonl", outcome


def test_replaying_a_runs_history_gives_back_what_the_run_reported(diverged_run):
    history, outcome = diverged_run
    result = replay("--json", str(history), "--spec", str(history.parent / "spec.yaml"))
    assert result.exit_code == 0, result.output
    replayed = json.loads(result.output)
    assert replayed["steps"] == outcome.steps
    assert replayed["anomalies"] == outcome.extra["anomalies"]
    assert "divergence" in {a["kind"] for a in replayed["anomalies"]}
    assert replayed["phases"] == outcome.extra["phases"]
    raised = [e for e in replayed["events"] if e["kind"] == "anomaly" and e["raised"]]
    assert {e["name"] for e in raised} >= {a["kind"] for a in replayed["anomalies"]}
    assert all(set(e) == {"step", "kind", "name", "raised", "detail"} for e in replayed["events"])


def test_other_thresholds_change_what_fires(diverged_run):
    history, outcome = diverged_run
    lenient = replay(
        "--json",
        str(history),
        "--spec",
        str(history.parent / "spec.yaml"),
        "--set",
        "telemetry.detectors.spike_z=1000",
        "--set",
        "spike_min_ratio=1e30",
    )
    assert lenient.exit_code == 0, lenient.output
    kinds = {a["kind"] for a in json.loads(lenient.output)["anomalies"]}
    assert "loss_spike" not in kinds
    assert "loss_spike" in {a["kind"] for a in outcome.extra["anomalies"]}


def test_csv_rows_with_layer_columns_and_several_files(tmp_path):
    curve = UNHEALTHY["lr_far_too_low"](0)
    path = tmp_path / "low.csv"
    layers = sorted(next(r for r in curve.rows if "layer_update_ratio" in r)["layer_update_ratio"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "step",
                "loss",
                "val_loss",
                "lr",
                "grad_norm",
                *[f"layer_update_ratio/{n}" for n in layers],
                *[f"layer_grad_norm/{n}" for n in layers],
            ]
        )
        for r in curve.rows:
            ratios, grads = r.get("layer_update_ratio", {}), r.get("layer_grad_norm", {})
            writer.writerow(
                [
                    r["step"],
                    r["loss"],
                    r.get("val_loss", ""),
                    r["lr"],
                    r.get("grad_norm", ""),
                    *[ratios.get(n, "") for n in layers],
                    *[grads.get(n, "") for n in layers],
                ]
            )
    spike = UNHEALTHY["one_step_2x_spike"](0)
    jsonl = tmp_path / "spike.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in spike.rows))

    result = replay("--json", str(path), str(jsonl))
    assert result.exit_code == 0, result.output
    low, spiked = (json.loads(line) for line in result.output.splitlines())
    assert low["file"] == str(path) and "lr_too_low" in {a["kind"] for a in low["anomalies"]}
    assert "vanishing_gradients" not in {a["kind"] for a in low["anomalies"]}
    assert [a for a in spiked["anomalies"] if a["kind"] == "loss_spike"] == [
        {"kind": "loss_spike", "first_step": spike.onset}
    ]

    text = replay(str(jsonl))
    assert f"loss_spike@{spike.onset}" in text.output
    assert f"step {spike.onset}: anomaly loss_spike raised - " in text.output


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"step": 1, "loss": 2.0}\nnot json\n', ":2: not JSON"),
        ('{"step": 1, "loss": "high"}\n', ":1: loss must be a number"),
        ('{"loss": 2.0}\n', ":1: every row needs a `step`"),
        ("loss,val_loss\n1.0,2.0\n", "must name a `step` column"),
        ("[1, 2]\n", "each line must be a JSON object"),
    ],
)
def test_a_file_it_cannot_replay_is_named_with_its_line_and_exits_2(tmp_path, content, message):
    path = tmp_path / ("rows.csv" if content.startswith("loss,") else "rows.jsonl")
    path.write_text(content)
    good = tmp_path / "good.jsonl"
    good.write_text('{"step": 1, "loss": 2.0}\n')
    result = replay(str(path), str(good))
    assert result.exit_code == 2
    assert message in result.output
    assert f"{good}: 1 steps" in result.output  # the other files are still replayed


def test_a_bad_setting_is_refused_with_its_name(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n')
    assert "spike_z: Input should be greater than 0" in replay(str(path), "--set", "spike_z=-1").output
    assert "telemetry.detectors.NAME=VALUE" in replay(str(path), "--set", "spike_z").output
    missing = replay(str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 2 and "cannot read it" in missing.output
