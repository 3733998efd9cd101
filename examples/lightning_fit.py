"""A Lightning Trainer run watched by gradwatch: a small MLP learns a synthetic regression on the CPU.

    python examples/lightning_fit.py                     # one process
    python examples/lightning_fit.py --devices 2 --job-id my-run   # DDP on 2 CPU processes (gloo)

One line on stderr gives rank 0's /metrics URL and the run directory ($GRADWATCH_STORAGE_PATH/<job id>,
else ./runs/<job id>); afterwards `gradwatch report <run directory>` draws the run and
`gradwatch replay <run directory>/history.jsonl` replays its detectors.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from gradwatch.integrations.lightning import GradwatchCallback


class Regressor(pl.LightningModule):
    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)
        )

    def training_step(self, batch: Any, _index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, _index: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))  # GradwatchCallback reads val_loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loaders(batch_size: int = 32) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    y = torch.tanh(x @ w / 4) + 0.05 * torch.randn(2048, 1, generator=g)
    train = torch.utils.data.TensorDataset(x[:1792], y[:1792])
    val = torch.utils.data.TensorDataset(x[1792:], y[1792:])
    return (
        torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        torch.utils.data.DataLoader(val, batch_size=batch_size),
    )


def main(argv: list[str] | None = None, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes; more than 1 trains under DDP (gloo)")
    parser.add_argument("--job-id", help="the run's id (default: a new gw- id; required with --devices > 1)")
    parser.add_argument("--prometheus-sd-dir", type=Path, help="write each rank's endpoint there as a file_sd file")
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=5.0,
        help="at the end, /metrics stays up until scraped again, at most this long",
    )
    args = parser.parse_args(argv)
    if args.devices > 1 and not args.job_id:
        parser.error("--devices > 1 needs --job-id: every rank must report under the same id")

    pl.seed_everything(0, verbose=False)
    gradwatch = GradwatchCallback(
        job_id=args.job_id,
        sd_dir=args.prometheus_sd_dir,
        telemetry={"interval": 10, "grace_seconds": args.grace_seconds},
    )
    train, val = loaders()
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        callbacks=[*(callbacks or []), gradwatch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=max(1, args.steps // 4) if args.steps < len(train) else None,
        check_val_every_n_epoch=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(Regressor(), train, val)
    return trainer


if __name__ == "__main__":
    main()
