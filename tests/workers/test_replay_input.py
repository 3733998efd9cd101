"""What `gradwatch replay` reads: CSV however its header is written, Lightning's metrics.csv, Hugging Face's
trainer_state.json, run directories; and the bad inputs it refuses, each named with its file and line."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest
from typer.testing import CliRunner

from bench.corpus import UNHEALTHY
from service.cli.main import app
from workers.replay import ReplayError, open_input, replay_file

runner = CliRunner()
SPIKE = UNHEALTHY["one_step_2x_spike"](0)  # 2000 steps, a 2x loss spike at its onset, a val_loss every 20
LR = 3e-4


def _lr(step: int) -> float:
    return LR * min(1.0, step / 100)  # a 100-step warm-up, then constant


def _cells(names: list[str], values: Sequence[Sequence[object]], sep: str) -> str:
    return sep.join(names) + "\n" + "".join(sep.join(str(v) for v in row) + "\n" for row in values)


def _rows(names: tuple[str, str, str, str, str], sep: str = ",", decimal: str = ".") -> str:
    """SPIKE as CSV with these names for step, loss, val_loss, lr and grad_norm."""
    values = []
    for r in SPIKE.rows:
        row = [r["step"], r["loss"], r.get("val_loss", ""), _lr(r["step"]), 1.0 + (r["step"] % 7) / 10]
        values.append([str(v).replace(".", decimal) for v in row])
    return _cells(list(names), values, sep)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SPIKE replayed from a plain CSV with gradwatch's own names."""
    path = tmp_path_factory.mktemp("ref") / "plain.csv"
    path.write_text(_rows(("step", "loss", "val_loss", "lr", "grad_norm")))
    result = replay_file(path)
    assert result.steps == len(SPIKE.rows) and result.warnings == []
    assert result.anomalies.get("loss_spike") == SPIKE.onset
    return result.as_json()


def _same_replay(got: dict, reference: dict) -> None:
    for key in ("steps", "events", "anomalies", "phases"):
        assert got[key] == reference[key], key


@pytest.mark.parametrize(
    "names,sep,decimal,bom",
    [
        (("step", " loss", " val_loss", " lr", " grad_norm"), ",", ".", False),  # `step, loss`
        (("Step", "Loss", "Val_Loss", "LR", "Grad_Norm"), ",", ".", True),  # case, a byte-order mark
        (("step", "loss", "val_loss", "lr", "grad_norm"), "\t", ".", False),
        (("step", "loss", "val_loss", "lr", "grad_norm"), ";", ",", False),  # a European spreadsheet
        (("global_step", "train_loss", "eval_loss", "learning_rate", "gradient_norm"), ",", ".", False),
        (("iteration", "train/loss", "val/loss", "lr-AdamW", "train/grad_norm"), ",", ".", False),
        (("iter", "loss", "validation_loss", "lr", "grad_norm"), ",", ".", False),
        (("step", "loss", "eval/loss", "lr", "grad_norm"), ",", ".", False),
    ],
)
def test_a_header_however_written_replays_like_gradwatchs_own_names(tmp_path, reference, names, sep, decimal, bom):
    path = tmp_path / "curve.csv"
    path.write_text(("\ufeff" if bom else "") + _rows(names, sep, decimal), encoding="utf-8")
    result = replay_file(path)
    assert result.warnings == []
    _same_replay(result.as_json(), reference)


def test_an_unknown_column_is_a_warning_and_a_second_name_for_one_value_too(tmp_path, reference):
    text = _rows(("step", "loss", "val_loss", "lr", "grad_norm")).splitlines()
    text = [f"{line},{'accuracy' if n == 0 else 0.5},{'train_loss' if n == 0 else 9.0}" for n, line in enumerate(text)]
    path = tmp_path / "extra.csv"
    path.write_text("\n".join(text) + "\n")
    result = replay_file(path)
    _same_replay(result.as_json(), reference)  # the loss column is replayed, not train_loss
    assert result.warnings == [
        f"{path}:1: column 'train_loss' also gives loss; replaying column 'loss'",
        f"{path}:1: column 'accuracy' is not replayed (replay reads step, loss, val_loss, lr, grad_norm and "
        "layer_grad_norm/NAME, layer_update_ratio/NAME columns, by the names `gradwatch replay --help` lists)",
    ]


def test_lightning_metrics_csv_with_the_rows_of_one_step_over_several_lines(tmp_path):
    # CSVLogger's columns, sorted; LearningRateMonitor's lr, the training loss and the validation loss each
    # on their own line of the step; the epoch means at the epoch's last step
    names = ["epoch", "lr-Adam", "lr-Adam-momentum", "step", "train_loss_epoch", "train_loss_step", "val_loss"]
    lines = []
    for r in SPIKE.rows:
        step, epoch = r["step"], r["step"] // 500
        lines.append([epoch, _lr(step), 0.9, step, "", "", ""])
        lines.append([epoch, "", "", step, "", r["loss"], ""])
        if "val_loss" in r:
            lines.append([epoch, "", "", step, "", "", r["val_loss"]])
        if step % 500 == 499:
            lines.append([epoch, "", "", step, 1.234, "", ""])
    path = tmp_path / "lightning_logs" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    path.write_text(_cells(names, lines, ","))
    result = replay_file(path.parent)  # the version directory: its metrics.csv
    assert result.file == str(path) and result.warnings == []
    # the same curve, one row a step (Lightning logs no gradient norm here)
    plain = tmp_path / "plain.csv"
    plain.write_text(
        _cells(
            ["step", "loss", "val_loss", "lr"],
            [[r["step"], r["loss"], r.get("val_loss", ""), _lr(r["step"])] for r in SPIKE.rows],
            ",",
        )
    )
    _same_replay(result.as_json(), replay_file(plain).as_json())
    assert result.anomalies.get("loss_spike") == SPIKE.onset


def _trainer_state(rows: list[dict], max_steps: int) -> dict:
    """A trainer_state.json as Transformers' Trainer writes it: logging every 10 steps, eval every 100."""
    log = []
    for r in rows:
        step = r["step"]
        if step % 10 == 0:
            log.append(
                {
                    "epoch": round(step / 500, 4),
                    "grad_norm": 1.0 + (step % 7) / 10,
                    "learning_rate": _lr(step),
                    "loss": r["loss"],
                    "step": step,
                }
            )
        if step % 100 == 0:
            log.append(
                {
                    "epoch": round(step / 500, 4),
                    "eval_loss": r["loss"] * 1.05,
                    "eval_runtime": 1.2345,
                    "eval_samples_per_second": 810.2,
                    "eval_steps_per_second": 101.3,
                    "step": step,
                }
            )
    last = rows[-1]["step"]
    log.append(
        {
            "epoch": round(last / 500, 4),
            "step": last,
            "total_flos": 1.2e15,
            "train_loss": 0.987,  # the run's mean, at the step whose own loss was logged above
            "train_runtime": 321.5,
            "train_samples_per_second": 99.5,
            "train_steps_per_second": 6.2,
        }
    )
    return {
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(last / 500, 4),
        "eval_steps": 100,
        "global_step": last,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log,
        "logging_steps": 10,
        "max_steps": max_steps,
        "num_train_epochs": 4,
        "save_steps": 500,
        "total_flos": 1.2e15,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }


def test_a_hugging_face_trainer_state_json_with_its_planned_length(tmp_path):
    state = _trainer_state(SPIKE.rows, max_steps=4000)
    path = tmp_path / "checkpoint-2000" / "trainer_state.json"
    path.parent.mkdir()
    path.write_text(json.dumps(state, indent=2))
    result = replay_file(path)
    assert result.steps == len(SPIKE.rows) // 10 and result.max_steps == 4000 and result.warnings == []

    # the same log as rows, replayed with the same planned length: the same verdicts
    rows = tmp_path / "rows.jsonl"
    entries = [e for e in state["log_history"] if "train_runtime" not in e]
    rows.write_text(
        "".join(
            json.dumps(
                {"step": e["step"], "loss": e["loss"], "lr": e["learning_rate"], "grad_norm": e["grad_norm"]}
                if "loss" in e
                else {"step": e["step"], "val_loss": e["eval_loss"]}
            )
            + "\n"
            for e in entries
        )
    )
    same = replay_file(rows, max_steps=4000).as_json()
    _same_replay(result.as_json(), same)
    # the file's planned length reaches the detectors: another length, another replay of its length
    assert replay_file(path, max_steps=2000).max_steps == 2000

    # named otherwise, written on one line, with a key it does not read: found by its content, warned of
    state["log_history"][0]["mean_token_accuracy"] = 0.5
    other = tmp_path / "state.txt"
    other.write_text(json.dumps(state))
    again = replay_file(other)
    _same_replay(again.as_json(), result.as_json())
    assert again.warnings == [
        f"{other}: log_history keys not replayed: mean_token_accuracy "
        "(replay reads step, loss, eval_loss, learning_rate and grad_norm)"
    ]


def test_a_history_goes_back_only_after_a_restart_rollback_or_rewind_row(tmp_path):
    rows: list[dict[str, object]] = [
        {"step": s, "loss": 2.0 - s / 100, "global_loss": 2.0 - s / 100} for s in range(1, 41)
    ]
    rows.insert(20, {"step": 20, "val_loss": 1.9, "time": 1.0})  # a validation row beside its step's row
    rows.append({"step": 40, "event": "rewind", "to_step": 30, "cause": "loss_spike"})
    rows += [{"step": s, "loss": 1.7 - s / 100, "global_loss": 1.7 - s / 100} for s in range(31, 51)]
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = replay_file(tmp_path)  # the run directory
    assert result.file == str(path) and result.steps == 60


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("acc.csv", "step,accuracy\n1,0.5\n2,0.6\n", ":1: no row has a training loss to replay; the header line has "),
        ("val.csv", "step,val_loss\n1,0.5\n2,0.6\n", ":1: no row has a training loss to replay"),
        (
            "val.jsonl",
            '{"step": 1, "eval_loss": 0.5}\n',
            "training loss to replay; the rows have the keys step, eval_loss",
        ),
        ("text.csv", "step,loss\n1,2.0\n2,high\n", ":3: loss must be a number (got 'high')"),
        ("semi.csv", "step;loss\n1;2,0\n2;2,0;1\n", ":3: more values than header columns (3 > 2)"),
        ("back.csv", "step,loss\n1,2.0\n3,1.9\n2,1.8\n", ":4: step 2 comes after step 3 ("),
        ("again.csv", "step,loss\n1,2.0\n2,1.9\n2,1.8\n", ":4: step 2 again with another loss (1.8; "),
        ("again.jsonl", '{"step": 1, "loss": 2}\n{"step": 1, "loss": 3}\n', ":2: step 1 again with another loss"),
        ("half.csv", "step,loss\n1.5,2.0\n", ":2: step must be a whole number, 0 or more (got '1.5')"),
        ("nan.csv", "step,loss\nnan,2.0\n", ":2: step must be a whole number"),
        ("nostep.csv", "Steps;loss\n1;2\n", ":1: the CSV header must name a `step` column"),
        ("empty.csv", "", "empty file: nothing to replay"),
        ("trainer_state.json", '{"log_history": [\n', ":2: not JSON (Expecting value)"),
        ("state.json", '{\n"global_step": 3\n}\n', "a JSON document without `log_history` (it has global_step)"),
        ("trainer_state.json", '{"log_history": [{"step": 1, "eval_loss": 2.0}], "max_steps": 9}', "`loss`"),
        ("trainer_state.json", '{"log_history": [{"step": 1, "loss": 2.0}], "max_steps": "9"}', "max_steps must"),
        ("trainer_state.json", '{"log_history": [{"step": 2, "loss": 2}, {"step": 1, "loss": 2}]}', "[1]: step 1"),
    ],
)
def test_a_bad_input_is_refused_with_its_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ReplayError) as caught:
        replay_file(path)
    assert str(caught.value).startswith(str(path))
    assert message in str(caught.value)


def test_a_file_without_a_loss_names_what_it_found_and_what_it_accepts(tmp_path):
    path = tmp_path / "acc.csv"
    path.write_text("Step, Accuracy, val_loss\n1, 0.5, 2.0\n")
    with pytest.raises(ReplayError) as caught:
        replay_file(path)
    message = str(caught.value)
    assert "the header line has the columns Step, Accuracy, val_loss" in message
    assert "loss: loss, train_loss, train/loss, train_loss_step" in message
    assert "step: step, global_step, iter, iteration" in message


def test_text_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("step,loss\n1,2.0\n2,\xe9\n".encode("latin-1"))
    with pytest.raises(ReplayError, match="not UTF-8 text"):
        replay_file(path)


def test_rows_are_read_merged_and_in_step_order(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("step,loss,val_loss,lr\n1,2.0,,0.1\n1,,1.9,\n1,2.0,,\n2,nan,,\n2,nan,,\n3,1.5,1.4,0.1\n")
    rows = [row for _, row in open_input(path).rows()]
    assert rows[0] == {"step": 1, "loss": 2.0, "lr": 0.1, "val_loss": 1.9}
    assert rows[1]["step"] == 2 and math.isnan(rows[1]["loss"])  # a NaN given twice is the same value
    assert rows[2] == {"step": 3, "loss": 1.5, "val_loss": 1.4, "lr": 0.1}
    assert len(rows) == 3


def test_the_cli_exits_2_on_a_file_without_a_loss_and_warns_of_an_unknown_column(tmp_path):
    bad = tmp_path / "metrics.csv"
    bad.write_text("step,epoch,accuracy\n0,0,0.1\n1,0,0.2\n")
    good = tmp_path / "good.csv"
    good.write_text("step,loss,tokens\n" + "".join(f"{s},{2.0 - s / 100},{s * 512}\n" for s in range(1, 31)))
    result = runner.invoke(app, ["replay", str(bad), str(good)])
    assert result.exit_code == 2
    assert f"{bad}:1: no row has a training loss to replay; the header line has the columns step, epoch, accuracy" in (
        result.stderr
    )
    assert f"warning: {good}:1: column 'tokens' is not replayed" in result.stderr
    assert f"warning: {bad}:1: column 'accuracy' is not replayed" in result.stderr
    assert f"{good}: 30 steps" in result.stdout  # the good file is still replayed

    ok = runner.invoke(app, ["replay", "--json", str(good)])
    assert ok.exit_code == 0 and "column 'tokens'" in ok.stderr
    replayed = json.loads(ok.stdout)
    assert replayed["steps"] == 30 and replayed["warnings"] == [ok.stderr.strip().removeprefix("warning: ")]

    helped = runner.invoke(app, ["replay", "--help"], terminal_width=200)
    assert "trainer_state.json" in helped.output and "metrics.csv" in helped.output
