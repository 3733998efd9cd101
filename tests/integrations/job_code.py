"""Training functions for gradwatch jobs (`train.entrypoint`) that train with a framework's own Trainer
and GradwatchCallback, run by Ray Train on every rank. `nan_at_step`: a NaN written into rank 1's
gradient after the all-reduce at that step."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class _Poison(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == 1:
            next(module.parameters()).grad.view(-1)[0] = float("nan")


def train_lightning(config: dict[str, Any]) -> None:
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from examples.lightning_fit import Regressor, loaders
    from gradwatch.integrations.lightning import GradwatchCallback

    pl.seed_everything(0, verbose=False)
    steps = int(config["steps"])
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        callbacks=[_Poison(int(config.get("nan_at_step", 0))), GradwatchCallback()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=max(1, steps // 2),
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
