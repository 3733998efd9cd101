"""Run under torchrun (2 CPU processes): examples/hf_trainer.py's Trainer under DDP (gloo), a NaN written
into rank 1's gradient after the all-reduce at POISON_STEP. Each rank writes what it saw to OUT/rank<r>.json:
whether its weights stayed as they were on that step, its skipped updates, a hash of its final weights.
The checkout must be on PYTHONPATH. Arguments: OUT JOB_ID STEPS."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from examples.hf_trainer import main as train
from gradwatch.integrations.transformers import GradwatchCallback
from tests.integrations.ddp_nan import write_rank_report

POISON_STEP = 5


class Poison(TrainerCallback):
    """Runs before gradwatch's callback: at POISON_STEP rank 1's first gradient becomes NaN."""

    unchanged: bool | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step + 1 == POISON_STEP:
            if dist.get_rank() == 1:
                next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
            self.before = [p.detach().clone() for p in model.parameters()]

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if hasattr(self, "before") and self.unchanged is None:
            self.unchanged = all(torch.equal(a, p) for a, p in zip(self.before, model.parameters(), strict=True))


def main() -> None:
    out, job_id, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    poison = Poison()
    trainer = train(["--steps", steps, "--job-id", job_id, "--grace-seconds", "0"], callbacks=[poison])
    gradwatch = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GradwatchCallback))
    run = gradwatch.run
    assert run is not None and trainer.model is not None
    write_rank_report(out, dist.get_rank(), poison.unchanged, run, trainer.model.parameters())


if __name__ == "__main__":
    main()
