"""`GradwatchCallback` for `transformers.Trainer`: per-layer telemetry, detectors, history and the guard.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[GradwatchCallback()])

The callback feeds the rank's `Run` (`gradwatch.start()`): the loss of each micro-batch (a forward hook
on the model), the gradients before the optimizer step (`on_pre_optimizer_step`, after the Trainer's own
clipping at `max_grad_norm`), the learning rate, the epoch (`state.epoch`), the eval loss (`on_evaluate`)
and the end of the run. The Trainer owns the update: an unsafe one (a non-finite loss or gradient on any
rank) is skipped by setting every gradient to None. docs/training-api.md says what that can and cannot do.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from workers.integrations._common import Attached, inner_optimizer, skip_update

__all__ = ["GradwatchCallback"]


class GradwatchCallback(Attached, TrainerCallback):
    """Attach gradwatch to a Hugging Face Trainer. `job_id`: the same on every rank under DDP; the other
    keyword arguments go to `gradwatch.start()` (ignored inside a gradwatch job, where the job gives them).

    Outside a gradwatch job the callback ends the run it made when training ends (result.json, and
    /metrics closed once its last values were scraped, at most `telemetry.grace_seconds` later)."""

    def __init__(self, job_id: str | None = None, **start_kwargs: Any):
        super().__init__(job_id, **start_kwargs)
        self._losses: list[torch.Tensor] = []
        self._hook: Any = None

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any
    ) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("GradwatchCallback: the Trainer gave no model or optimizer at on_train_begin")
        run = self.attach(max_steps=state.max_steps)
        scheduler = kw.get("lr_scheduler")
        run.watch(model, inner_optimizer(optimizer), scheduler, batch_size=args.per_device_train_batch_size)
        run.epoch = int(state.epoch or 0)

        def keep_loss(_module: Any, _inputs: Any, outputs: Any) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
            if model.training and isinstance(loss, torch.Tensor):
                self._losses.append(loss.detach())

        self._hook = model.register_forward_hook(keep_loss)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.run is not None:
            self.run.epoch = int(state.epoch or 0)  # the Trainer's epoch (fractional there), 0-based

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any
    ) -> None:
        run = self.need()
        if not self._losses:
            raise RuntimeError(
                "GradwatchCallback: the model returned no `loss` in its output this step; gradwatch reads the "
                "loss from the model's output (pass labels to the model)"
            )
        loss, self._losses = torch.stack(self._losses).float().mean(), []
        samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if not run.report(loss, samples=samples):
            skip_update(model, optimizer)

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if self.run is not None and metrics and "eval_loss" in metrics:
            self.run.log_validation(float(metrics["eval_loss"]))  # the Trainer already reduced it over ranks

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.end()
