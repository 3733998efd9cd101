"""A training function with its own objective: a small autoencoder on the bundled 8x8 digits.

The loss is a reconstruction error plus an L1 penalty on the code, reported to gradwatch as two
named losses. gradwatch measures the model, skips unsafe updates on every rank alike, and saves
and restores the run through Ray Train's checkpoints. Run it as a job:

    gradwatch run examples/custom/autoencoder.yaml
"""

from __future__ import annotations

import time

import ray.train.torch
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import gradwatch


class AutoEncoder(torch.nn.Module):
    def __init__(self, features: int = 64, code: int = 8, hidden: int = 32):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, code)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(code, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, features)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.encoder(x)
        return self.decoder(code), code


def digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(x) * val_fraction)
    return TensorDataset(x[order[n_val:]]), TensorDataset(x[order[:n_val]])


def objective(model: torch.nn.Module, x: torch.Tensor, sparsity: float):
    recon, code = model(x)
    reconstruction = torch.nn.functional.mse_loss(recon, x)
    regularisation = sparsity * code.abs().mean()
    return reconstruction + regularisation, reconstruction, regularisation


def train_func(config: dict) -> None:
    run = gradwatch.start()
    torch.manual_seed(config.get("seed", 0))  # the same initial weights on every rank
    train, val = digits(seed=config.get("seed", 0))
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(train, batch_size=config.get("batch_size", 64), shuffle=True, drop_last=True)
    )
    model = ray.train.torch.prepare_model(AutoEncoder(code=config.get("code", 8)))
    optimizer = run.watch(model, torch.optim.Adam(model.parameters(), lr=config.get("lr", 3e-3)))
    state = run.restore() or {"epoch": 0}
    run.epoch = state["epoch"]
    sparsity, delay = config.get("sparsity", 1e-3), config.get("rank1_step_delay", 0.0)
    nan_at = config.get("nan_at_step")  # test hook: a NaN loss on the last rank at this step

    while run.step < run.max_steps:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(run.epoch)
        for (x,) in loader:
            loss, reconstruction, regularisation = objective(model, x, sparsity)
            if nan_at is not None and run.step + 1 == nan_at and run.rank == run.world_size - 1:
                loss = loss * float("nan")
            if delay and run.rank == 1:
                time.sleep(delay)
            optimizer.zero_grad()
            run.backward(
                loss, losses={"reconstruction": reconstruction, "regularisation": regularisation}, samples=len(x)
            )
            optimizer.step()  # skipped by itself when the update was not safe
            if run.step % run.spec.validation.every_steps == 0 or run.step == run.max_steps:
                run.log_validation(validate(model, val, sparsity), reduce=True)
            if run.step % run.spec.checkpoint.every_steps == 0 or run.step == run.max_steps:
                run.save_checkpoint({"epoch": run.epoch})
            if run.step >= run.max_steps:
                break
        else:
            run.epoch += 1


@torch.no_grad()
def validate(model: torch.nn.Module, val: TensorDataset, sparsity: float) -> float:
    model.eval()
    loss = objective(model, val.tensors[0], sparsity)[0].item()
    model.train()
    return loss
