"""Run under torchrun (2 CPU processes): examples/lightning_fit.py's module under Lightning DDP (gloo), a
NaN written into rank 1's gradient after the all-reduce at POISON_STEP. Each rank writes what it saw to
OUT/rank<r>.json: whether its weights stayed as they were on that step, its skipped updates, a hash of
its final weights. The checkout must be on PYTHONPATH."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from examples.lightning_fit import Regressor, loaders
from gradwatch.integrations.lightning import GradwatchCallback
from tests.integrations.ddp_nan import write_rank_report

POISON_STEP = 5


class Poison(pl.Callback):
    def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
        if trainer.global_step + 1 == POISON_STEP:
            if trainer.global_rank == 1:
                next(module.parameters()).grad.view(-1)[0] = float("nan")
            self.before = [p.detach().clone() for p in module.parameters()]

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        if hasattr(self, "before") and not hasattr(self, "unchanged"):
            self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, module.parameters(), strict=True))


def main() -> None:
    out, job_id, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    pl.seed_everything(0, verbose=False)
    poison, gradwatch = Poison(), GradwatchCallback(job_id=job_id, serve_metrics=False)
    train, val = loaders()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[poison, gradwatch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=steps // 2,
        num_sanity_val_steps=0,
    )
    module = Regressor()
    trainer.fit(module, train, val)
    run = gradwatch.run
    assert run is not None
    write_rank_report(out, trainer.global_rank, getattr(poison, "unchanged", None), run, module.parameters())


if __name__ == "__main__":
    main()
