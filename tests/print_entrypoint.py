"""A test-only training function (the spec's `train.entrypoint`) that prints: `marker` on stdout and
`marker (stderr)` on stderr from every rank, a line without its newline at the end, and a few steps
of a linear model. Config: `marker`."""

from __future__ import annotations

import sys

import ray.train.torch
import torch

import gradwatch


def train_func(config: dict) -> None:
    run = gradwatch.start()
    marker = config["marker"]
    print(marker)
    print(f"{marker} (stderr)", file=sys.stderr)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 1))
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    while run.step < (run.max_steps or 0):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))
        optimizer.step()
    sys.stdout.write(f"{marker} done at step {run.step}")  # no newline: still a line of its own
