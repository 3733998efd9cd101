"""The training loop on one worker, without Ray: learns, checkpoints, resumes, guards."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from gradwatch.names import TEST_REPORTS_ENV
from gradwatch.spec import load_spec
from tests.conftest import DIVERGED, EXAMPLES, small_spec
from workers.board import BoardClient, JobBoard
from workers.driver import unhealthy_ending
from workers.loop import DivergenceStop, Trainer
from workers.session import LocalSession


def local(spec_overrides: dict, tmp_path, **kw) -> Trainer:
    spec = load_spec(small_spec(scaling={"num_workers": 1}, **spec_overrides))
    return Trainer(spec, LocalSession(tmp_path / "ckpt"), run_dir=tmp_path, **kw)


def test_learns_digits_and_writes_history(tmp_path):
    trainer = local({"max_steps": 150}, tmp_path)
    out = trainer.train()
    assert out.steps == 150
    assert out.val_loss < 0.5 * out.first_val_loss
    assert out.val_accuracy > 0.85
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    measured = [r for r in lines if "layer_grad_norm" in r]
    assert measured and measured[-1]["step"] == 150
    assert all(0 < v < 1 for v in measured[-1]["layer_update_ratio"].values())
    assert any("val_loss" in r for r in lines)


@pytest.mark.parametrize(
    "model,data",
    [
        ({"name": "cnn", "channels": [8]}, {"name": "digits", "as_images": True}),
        (
            {"name": "char-transformer", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
            {"name": "text", "block_size": 32, "max_chars": 20000},
        ),
        ({"name": "mlp", "hidden": [16]}, {"name": "synthetic-regression", "n_samples": 512}),
        ({"name": "mlp", "hidden": [16]}, {"name": "synthetic-classification", "n_samples": 512}),
    ],
)
def test_every_builtin_model_and_data_trains(tmp_path, model, data):
    trainer = local({"model": model, "data": data, "max_steps": 40, "validation": {"every_steps": 10}}, tmp_path)
    out = trainer.train()
    assert out.steps == 40
    assert math.isfinite(out.train_loss)
    assert out.val_loss < out.first_val_loss


@pytest.mark.parametrize("name", ["constant", "cosine", "step"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_and_schedules(tmp_path, name, optimizer):
    trainer = local(
        {
            "optimizer": {"name": optimizer, "lr": 0.05 if optimizer == "sgd" else 0.005},
            "schedule": {"name": name, "warmup_steps": 5, "step_size": 10},
            "max_steps": 30,
        },
        tmp_path,
    )
    out = trainer.train()
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "history.jsonl").read_text().splitlines()) if "lr" in r]
    assert out.val_loss < out.first_val_loss
    assert lrs[0] < lrs[1]  # warmup ramps up
    if name == "constant":
        assert lrs[-1] == pytest.approx(lrs[5])
    else:
        assert lrs[-1] < max(lrs)


def test_resume_continues_from_the_checkpoint(tmp_path):
    session = LocalSession(tmp_path / "ckpt")
    job = small_spec(scaling={"num_workers": 1}, checkpoint={"every_steps": 25})
    # a first worker group ran 40 of the job's 60 steps (its last checkpoint at 40) and went away
    first = Trainer(load_spec({**job, "max_steps": 40}), session, run_dir=tmp_path)
    first.train()
    ran_before = len((tmp_path / "history.jsonl").read_text().splitlines())
    # a new worker on the same session resumes there, mid-run
    second = Trainer(load_spec({**job, "max_steps": 60}), session, run_dir=tmp_path)
    assert second.restore() == 40
    assert torch.equal(next(second.model.parameters()), next(first.model.parameters()))
    # the detectors resume too: same start level, same phases, no new warm-up
    resumed, original = second.telemetry.monitor, first.telemetry.monitor
    assert resumed.loss.initial == original.loss.initial and resumed.first_step == 1
    assert resumed.phases_entered == original.phases_entered
    assert resumed.loss.ema == pytest.approx(original.loss.ema)
    # and it trains on from step 41 to the end, never repeating a step
    out = second.train()
    assert out.steps == 60 and second.step == 60
    after = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()[ran_before:]]
    steps = [r["step"] for r in after if "loss" in r]
    assert steps == list(range(41, 61)), steps
    assert out.val_loss < out.first_val_loss


def test_only_the_test_hook_fingerprints_the_parameters_and_keeps_sample_indices(tmp_path, monkeypatch):
    reports = {}
    for hook in ("1", ""):
        monkeypatch.setenv(TEST_REPORTS_ENV, hook)
        board = JobBoard("local")
        (run_dir := tmp_path / f"hook{hook}").mkdir()
        trainer = local({"max_steps": 5}, run_dir, board=BoardClient(board, remote=False))
        trainer.train()
        reports[hook] = board.ranks[0]
    assert reports["1"]["params_finite"] and len(reports["1"]["param_hash"]) == 64
    assert len(reports["1"]["first_epoch_indices"]) == 5 * trainer.spec.batch_size
    assert set(reports[""]) == {"rank", "steps", "skipped_steps", "mean_step_seconds"}
    assert reports[""]["steps"] == 5 and trainer.seen_first_epoch is None


def test_nonfinite_gradients_never_reach_the_weights(tmp_path):
    trainer = local({"max_steps": 10, "optimizer": {"name": "sgd", "lr": 0.1}}, tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    x, y, idx = next(iter(trainer.train_loader))
    x = x.clone()
    x[0, 0] = float("nan")
    lr_before = trainer.scheduler.last_epoch
    trainer.train_step(x, y, idx)
    assert trainer.scheduler.last_epoch == lr_before  # a skipped update does not use up the schedule
    assert trainer.telemetry.monitor.anomalies_raised == {"nonfinite": 1}  # an event, not a divergence
    after = list(trainer.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=False))
    m = trainer.telemetry.metrics
    assert m.registry.get_sample_value("gradwatch_skipped_steps_total", {"job_id": "local", "rank": "0"}) == 1
    assert (
        m.registry.get_sample_value("gradwatch_nonfinite_total", {"job_id": "local", "rank": "0", "kind": "loss"}) == 1
    )


def test_on_divergence_stop_fails_with_the_reason(tmp_path):
    spec = diverging(on_divergence="stop")
    trainer = Trainer(spec, LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    with pytest.raises(DivergenceStop, match="diverged"):
        trainer.train()


def diverging(**overrides):
    data = yaml.safe_load((EXAMPLES / "diverging.yaml").read_text())
    data.update({"scaling": {"num_workers": 1}, "max_steps": 500, **overrides})
    return load_spec(data)


def test_on_divergence_rollback_recovers(tmp_path):
    trainer = Trainer(diverging(on_divergence="rollback"), LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    out = trainer.train()
    assert out.rollbacks >= 1
    assert out.steps == 500
    assert math.isfinite(out.train_loss) and out.val_loss < out.first_val_loss
    assert (
        trainer.telemetry.metrics.registry.get_sample_value(
            "gradwatch_rollbacks_total", {"job_id": "local", "rank": "0"}
        )
        == out.rollbacks
    )


def test_a_run_whose_updates_are_all_skipped_ends_failed_with_the_reason(tmp_path):
    trainer = Trainer(diverging(max_skipped_steps=20), LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    with pytest.raises(DivergenceStop) as stopped:
        trainer.train()
    reason = DIVERGED.fullmatch(str(stopped.value))
    assert reason, str(stopped.value)
    since, last_step = int(reason["since"]), int(reason["last"])
    assert int(reason["steps"] or reason["of"]) == 20
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    nonfinite = {r["step"] for r in history if r.get("nonfinite")}
    assert since == min(nonfinite)  # never 10 applied updates in a row since the first non-finite step
    assert trainer.step == since + 19 < 500  # stopped at once, long before max_steps
    skipped = int(reason["skipped"] or reason["steps"])
    window = range(since, since + 20)
    assert skipped == len(nonfinite & set(window)) >= 2
    applied_runs = "".join("s" if step in nonfinite else "a" for step in window).split("s")
    assert max(map(len, applied_runs)) < 10  # never 10 applied updates in a row: the guard's own rule
    assert last_step == since - 1 and math.isfinite(float(reason["loss"]))


def test_max_skipped_steps_null_goes_on_to_the_end(tmp_path):
    trainer = Trainer(diverging(max_skipped_steps=None), LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    out = trainer.train()
    assert out.steps == 500
    assert not math.isfinite(out.train_loss)
    assert out.skipped_steps > 20
    # what the driver then reports beside "succeeded"
    held = {k: v for k, v in trainer.telemetry.monitor.anomalies.items() if v}
    final = {"final": {"train_loss": out.train_loss}, "progress": {"anomalies": held}}  # the board's last snapshot
    assert unhealthy_ending(final) == ("its final train loss is inf and it was still diverging at the end")
    assert unhealthy_ending({"final": {"train_loss": 0.1}, "progress": {"anomalies": {}}}) is None


def test_a_long_healthy_sgd_run_on_digits_raises_nothing(tmp_path):
    # The run that used to page: SGD on digits well past convergence, its loss near zero and noisy,
    # its validation loss flat and noisy.
    trainer = local(
        {
            "max_steps": 1500,
            "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "model": {"name": "mlp", "hidden": [64]},
            "validation": {"every_steps": 50},
            "telemetry": {"interval": 10},
            "checkpoint": {"every_steps": 1500},
        },
        tmp_path,
    )
    out = trainer.train()
    assert out.val_accuracy > 0.9
    assert out.extra["anomalies"] == []
    assert [p["phase"] for p in out.extra["phases"]][-1] in ("converged", "refinement")


def test_digits_are_scikit_learns_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from gradwatch.spec import DigitsData
    from workers.data import _split, build_data

    spec = DigitsData(name="digits")
    bundle = build_data(spec, seed=3)
    digits = load_digits()
    x, y = torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    train, val = _split(len(x), spec.val_fraction, spec.train_fraction, 3)
    assert torch.equal(bundle.train.x, x[train]) and torch.equal(bundle.val.x, x[val])
    assert torch.equal(bundle.train.y, y[train]) and torch.equal(bundle.val.y, y[val])
    assert bundle.train.y.dtype == torch.long
    # a worker's start pays no scikit-learn import for the data set
    probe = (
        "import sys; from gradwatch.spec import DigitsData; from workers.data import build_data; "
        "build_data(DigitsData(name='digits'), 0); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
