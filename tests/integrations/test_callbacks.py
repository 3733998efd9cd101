"""The framework callbacks in one process: real transformers.Trainer and lightning.Trainer on tiny models
built from config (no downloads), a NaN injected into one step's gradients, the guard's skip checked on
the weights and on the run's own series."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("lightning.pytorch")

import workers.training as training  # noqa: E402
from gradwatch.status import read_result  # noqa: E402
from workers.integrations._common import skip_update  # noqa: E402

POISON_STEP = 5


@pytest.fixture(autouse=True)
def fresh_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    monkeypatch.setenv("GRADWATCH_STORAGE_PATH", str(tmp_path / "runs"))  # the run directories
    monkeypatch.setattr(training, "_run", None)
    yield
    run = training.current()
    if run is not None:
        run.close(0)


def _value(run: Any, name: str) -> float | None:
    return run.telemetry.metrics.registry.get_sample_value(name, {"job_id": run.job_id, "rank": "0"})


def test_hf_trainer_feeds_the_run_and_skips_a_nan_step(tmp_path: Any) -> None:
    from gradwatch.integrations.transformers import GradwatchCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 64, (64, 16))]

    class Poison(transformers.TrainerCallback):  # type: ignore[name-defined]
        """Runs before gradwatch's callback: a NaN in one gradient at POISON_STEP."""

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step + 1 == POISON_STEP:
                next(model.parameters()).grad.view(-1)[0] = float("nan")
                self.before = [p.detach().clone() for p in model.parameters()]

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if state.global_step == POISON_STEP:
                self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, model.parameters(), strict=True))

    poison, callback = Poison(), GradwatchCallback(serve_metrics=False)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=6,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data[:16], callbacks=[poison, callback]
    )
    trainer.train()
    run = callback.run
    assert run is not None and run.step == trainer.state.global_step == 12  # a skipped update is still a step
    assert run.skipped_steps == 1
    assert poison.unchanged, "the weights moved on the step with a NaN gradient"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run.flush()
    assert _value(run, "gradwatch_skipped_steps_total") == 1.0
    assert run.last_val is not None and math.isfinite(run.last_val[0])
    if isinstance(run.model, pl.LightningModule):
        assert _value(run, "gradwatch_epoch") == 1.0  # trainer.current_epoch: 8 batches an epoch, 12 steps
        result = read_result(run.run_dir or pytest.fail("no run directory"))
        assert result is not None and result.state == "succeeded" and result.steps == 12
    telemetry = run.telemetry
    assert telemetry is not None and math.isfinite(telemetry.last["loss"]) and telemetry.last["lr"] > 0
    assert _value(run, "gradwatch_epoch") == 1.0  # 8 steps an epoch: the Trainer's epoch 1 at step 12
    result = read_result(run.run_dir or pytest.fail("no run directory"))  # the callback ended the run it made
    assert result is not None and result.state == "succeeded" and result.steps == 12
    assert result.ranks[0].skipped_steps == 1


class _Tiny(pl.LightningModule):  # type: ignore[name-defined]
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch: Any, _i: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, _i: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_lightning_trainer_feeds_the_run_and_skips_a_nan_step() -> None:
    from gradwatch.integrations.lightning import GradwatchCallback

    torch.manual_seed(0)
    x = torch.randn(128, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=16)

    class Poison(pl.Callback):  # type: ignore[name-defined]
        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            if trainer.global_step + 1 == POISON_STEP:
                next(module.parameters()).grad.view(-1)[0] = float("nan")
                self.before = [p.detach().clone() for p in module.parameters()]

        def on_train_batch_end(self, trainer: Any, module: Any, *a: Any) -> None:
            if hasattr(self, "before") and not hasattr(self, "unchanged"):
                self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, module.parameters(), strict=True))

    poison, callback = Poison(), GradwatchCallback(serve_metrics=False)
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        devices=1,
        callbacks=[poison, callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        val_check_interval=6,
        num_sanity_val_steps=0,
    )
    module = _Tiny()
    trainer.fit(module, loader, loader)
    run = callback.run
    assert run is not None and run.skipped_steps == 1
    assert poison.unchanged, "the weights moved on the step with a NaN gradient"
    assert all(torch.isfinite(p).all() for p in module.parameters())
    run.flush()
    assert _value(run, "gradwatch_skipped_steps_total") == 1.0
    assert run.last_val is not None and math.isfinite(run.last_val[0])
    if isinstance(run.model, pl.LightningModule):
        assert _value(run, "gradwatch_epoch") == 1.0  # trainer.current_epoch: 8 batches an epoch, 12 steps
        result = read_result(run.run_dir or pytest.fail("no run directory"))
        assert result is not None and result.state == "succeeded" and result.steps == 12


def test_a_skip_under_a_grad_scaler_leaves_the_weights_and_lets_the_scaler_step() -> None:
    """The guard drops the gradients before the scaler checked them for infs (no clipping unscaled them):
    the scaler still steps, finding nothing to apply, and the weights and the optimizer state stay."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    class Wrapped:  # accelerate's AcceleratedOptimizer carries its scaler as `.scaler`
        def __init__(self) -> None:
            self.optimizer, self.scaler = optimizer, scaler

    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
    skip_update(model, Wrapped())
    scaler.step(optimizer)  # no "No inf checks were recorded" failure
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert not optimizer.state  # Adam never stepped: no moments made


def test_lightning_with_gradient_accumulation_reports_one_step_per_update_and_refuses_a_rollback() -> None:
    from gradwatch.integrations.lightning import GradwatchCallback

    x = torch.randn(96, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)
    seen: list[float] = []

    class Losses(pl.Callback):  # type: ignore[name-defined]
        def on_before_backward(self, trainer: Any, module: Any, loss: Any) -> None:
            seen.append(float(loss.detach()))

    callback = GradwatchCallback(serve_metrics=False)
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        callbacks=[Losses(), callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accumulate_grad_batches=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(_Tiny(), loader)
    run = callback.run
    assert run is not None and run.step == trainer.global_step == 3 and len(seen) == 6
    run.flush()
    assert _value(run, "gradwatch_samples_total") == 6 * 16  # both micro-batches of each of the 3 updates
    # each micro-batch's loss came divided by accumulate_grad_batches: their sum is the update's mean loss
    telemetry = run.telemetry
    assert telemetry is not None and telemetry.last["loss"] == pytest.approx(seen[-2] + seen[-1], rel=1e-5)

    training._run = None
    refused = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=[GradwatchCallback(on_divergence="rollback", serve_metrics=False)],
    )
    with pytest.raises(ValueError, match="on_divergence='rollback' needs gradwatch to own the training loop"):
        refused.fit(_Tiny(), loader)
    assert training.current() is None  # the refused run was closed, not left behind
