"""A real two-rank run of the training API outside a job (a gloo process group of two CPU processes, no Ray),
made to exercise every part of the report: telemetry measured every few steps (sparse norms and noise
scale), a warm-up then cosine learning-rate schedule, custom scalars (`run.log`), system metrics, and
layers whose names hold markup.

    python -m tests.service.report_run RUN_DIR STEPS
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Module names may hold anything but '.': these reach the report as layer names.
HOSTILE_LAYERS = (
    "<a href=//evil>x</a>",
    "<b>bold</b>",
    "<!--<script>",
    "</script><script>alert(1)</script>",
)
WARMUP = 20
INTERVAL = 4


def _rank(rank: int, world: int, init: str, run_dir: str, steps: int) -> None:
    import gradwatch
    from workers.session import LocalSession

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

    class GroupSession(LocalSession):
        def __init__(self) -> None:
            super().__init__()
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()

    run = gradwatch.start(
        job_id="gw-hostile",
        name="report-run",
        max_steps=steps,
        run_dir=run_dir,
        serve_metrics=False,
        session=GroupSession(),
        telemetry={"interval": INTERVAL, "grace_seconds": 0, "system_interval": 0.05},
    )
    torch.manual_seed(0)
    layers: OrderedDict[str, torch.nn.Module] = OrderedDict()
    for i, name in enumerate(HOSTILE_LAYERS):
        layers[name] = torch.nn.Linear(16 if i == 0 else 32, 32 if i < len(HOSTILE_LAYERS) - 1 else 1)
        if i < len(HOSTILE_LAYERS) - 1:
            layers[f"act{i}"] = torch.nn.Tanh()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(layers))
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def shape(step: int) -> float:  # linear warm-up, then cosine to a tenth
        if step < WARMUP:
            return (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, steps - WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, shape)
    optimizer = run.watch(model, adamw, scheduler)
    generator = torch.Generator().manual_seed(1 + rank)
    true_w = torch.linspace(-1, 1, 16).unsqueeze(1)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        y = x @ true_w + 0.1 * torch.randn(32, 1, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        run.backward(loss, samples=len(x))
        optimizer.step()
        scheduler.step()
        if run.step % 10 == 0:
            run.log(accuracy_proxy=1.0 / (1.0 + loss.item()), tokens_seen=float(run.step * 32))
    run.finish()
    run.close()
    dist.destroy_process_group()


def main(run_dir: str, steps: int, world: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp, "rendezvous").as_uri()
        mp.spawn(_rank, args=(world, init, run_dir, steps), nprocs=world, join=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], int(sys.argv[2]))
