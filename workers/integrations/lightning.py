"""`GradwatchCallback` for `lightning.Trainer`: per-layer telemetry, detectors, history and the guard.

    trainer = lightning.Trainer(..., callbacks=[GradwatchCallback()])

The callback feeds the rank's `Run` (`gradwatch.start()`): the loss (`on_before_backward`), the
gradients after the backward and before clipping and the optimizer step (`on_before_optimizer_step`),
the learning rate, the epoch (`current_epoch`), the validation loss (`val_loss` logged by the module)
and the end of the run. Lightning owns the update: an unsafe one (a non-finite loss or gradient on any
rank) is skipped by setting every gradient to None. docs/training-api.md says what that can and cannot do.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from workers.integrations._common import Attached, inner_optimizer, skip_update

__all__ = ["GradwatchCallback"]


def _batch_size(batch: Any) -> int | None:
    """The number of samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            size = _batch_size(item)
            if size is not None:
                return size
    return None


class GradwatchCallback(Attached, pl.Callback):
    """Attach gradwatch to a Lightning Trainer (one optimizer, automatic optimization). `job_id`: the same
    on every rank under DDP; the other keyword arguments go to `gradwatch.start()` (ignored inside a
    gradwatch job).

    Outside a gradwatch job the callback ends the run it made when training ends (result.json, and
    /metrics closed once its last values were scraped, at most `telemetry.grace_seconds` later)."""

    def __init__(self, job_id: str | None = None, **start_kwargs: Any):
        super().__init__(job_id, **start_kwargs)
        # this optimizer step's micro-batches: their losses (Lightning divides each by accumulate_grad_batches
        # before the backward, so their sum is the step's mean loss) and samples
        self._losses: list[torch.Tensor] = []
        self._samples = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "GradwatchCallback needs automatic optimization; with manual optimization call "
                "gradwatch.start(), run.watch() and run.report() in the training_step yourself"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradwatchCallback watches one optimizer; the module configured {len(trainer.optimizers)}"
            )
        max_steps: int | None = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None and math.isfinite(trainer.estimated_stepping_batches):
            max_steps = int(trainer.estimated_stepping_batches)
        run = self.attach(max_steps=max_steps)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        run.watch(pl_module, inner_optimizer(trainer.optimizers[0]), schedulers[0] if schedulers else None)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, _i: int) -> None:
        self._samples += _batch_size(batch) or 0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        run = self.need()
        if not self._losses:
            raise RuntimeError(
                "GradwatchCallback: no loss seen before the optimizer step (automatic optimization only)"
            )
        loss, samples = torch.stack(self._losses).float().sum(), self._samples
        self._losses, self._samples = [], 0
        if not run.report(loss, samples=samples or None):
            skip_update(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if (
            self.run is not None
            and self.run.telemetry is not None
            and value is not None
            and not trainer.sanity_checking
        ):
            self.run.log_validation(float(value), reduce=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.end(failed=True)
