"""A test-only training function (the spec's `train.entrypoint`): rank 1 blocks forever at a given step.

It blocks only on a fresh start: a run restored from a checkpoint trains to its end, so `on_hang:
restart` can succeed. Config: `block_at` (the step whose data loading never ends on rank 1),
`every` (checkpoint cadence), `step_delay` (seconds per step, pacing the run on any machine).
"""

from __future__ import annotations

import json
import threading
import time

import ray.train.torch
import torch

import gradwatch


def train_func(config: dict) -> None:
    run = gradwatch.start()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(torch.nn.Linear(8, 1))
    optimizer = run.watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    restored = run.restore()  # None on the first attempt only
    block_at, every, delay = config["block_at"], config.get("every", 50), config.get("step_delay", 0.0)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    while run.step < run.max_steps:
        if restored is None and run.rank == 1 and run.step + 1 == block_at:
            if run.run_dir is not None:  # when it blocked, for the test to time the detection from
                (run.run_dir / "blocked.json").write_text(json.dumps({"step": block_at, "time": time.time()}))
            threading.Event().wait()  # a data loader that never returns
        if delay:
            time.sleep(delay)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))
        optimizer.step()
        if run.step % every == 0 or run.step == run.max_steps:
            run.save_checkpoint({"restored": restored is not None})
