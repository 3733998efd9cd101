"""What both callbacks share: the run they feed, the rank's session and the update guard's skip."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from workers.session import LocalSession
from workers.training import Run, current, in_job, inner_optimizer, start

__all__ = ["Attached", "begin", "inner_optimizer", "skip_update"]


class _ProcessGroupSession(LocalSession):
    """A rank of a process group the framework launched itself (torchrun, Lightning's DDP), no Ray."""

    def __init__(self) -> None:
        backend = str(dist.get_backend())
        device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" and torch.cuda.is_available() else "cpu"
        super().__init__(device=device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()


class Attached:
    """What each callback holds: the job id and `start()` keywords it was given, the run it feeds, and
    whether it made that run (and so ends it: inside a gradwatch job or under a user's own
    `gradwatch.start()` the run is someone else's)."""

    def __init__(self, job_id: str | None = None, **start_kwargs: Any) -> None:
        self.job_id, self.start_kwargs = job_id, start_kwargs
        self.run: Run | None = None
        self._owned = False

    def attach(self, **defaults: Any) -> Run:
        """The rank's run, made or found; `defaults` (what the framework knows, as max_steps) give way
        to the keywords the user passed."""
        self.run, self._owned = begin(self.job_id, {**defaults, **self.start_kwargs})
        return self.run

    def need(self) -> Run:
        if self.run is None:
            raise RuntimeError(
                "GradwatchCallback: the training did not start through the callback (add it before training)"
            )
        return self.run

    def end(self, *, failed: bool = False) -> None:
        """Training ended: the run's result written (unless it `failed`: then closed before finish(), and
        result.json says so) and, when the callback made it, its endpoint closed."""
        if self.run is None:
            return
        if not failed:
            self.run.finish()
        if self._owned:
            self.run.close()


def begin(job_id: str | None, start_kwargs: dict[str, Any]) -> tuple[Run, bool]:
    """The process's run and whether the callback made it (and so ends it): the job's inside a gradwatch
    job or one `gradwatch.start()` already made, else a new one for this rank."""
    run = current()
    if run is not None:
        return run, False
    session = None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        try:
            import ray.train

            ray.train.get_context()
        except (ImportError, RuntimeError):
            session = _ProcessGroupSession()
        if job_id is None and session is not None:
            raise ValueError(
                "GradwatchCallback(job_id=...): under DDP every rank needs the same job_id "
                "(e.g. GradwatchCallback(job_id='my-run')); each rank would make up its own otherwise"
            )
    # inside a gradwatch job the job's worker entry ends the run when the training function returns
    run = start(job_id=job_id, session=session, **start_kwargs)
    try:
        check_guard(run)
    except ValueError:
        if not in_job():
            run.close(0)  # result.json says why it never trained
        raise
    return run, not in_job()


def check_guard(run: Run) -> None:
    """What the guard can do where the framework owns the loop: skip an update, alert, stop. A rollback
    or rewind would have to move the framework's own step counter, scheduler and data loader back."""
    spec = run.spec
    for field, value, instead in (
        ("on_divergence", spec.on_divergence, "'alert' or 'stop'"),
        ("on_spike", spec.on_spike, "'alert'"),
    ):
        if value in ("rollback", "rewind"):
            raise ValueError(
                f"GradwatchCallback: {field}={value!r} needs gradwatch to own the training loop (its step, "
                f"scheduler and data order); with a framework's Trainer use {field}={instead} "
                "(docs/training-api.md)"
            )


def skip_update(model: torch.nn.Module, optimizer: Any = None) -> None:
    """The update guard where the framework calls `optimizer.step()` itself: every gradient set to None,
    so the torch optimizers leave every parameter (and its momentum) as it was this step.

    Under a GradScaler (accelerate's, as `optimizer.scaler`) the scaler must have checked the gradients
    for infs before they are dropped, or its `step()` fails with no inf checks recorded: the gradients
    are unscaled first when the framework has not done so yet."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        from torch.amp.grad_scaler import OptState

        inner = inner_optimizer(optimizer)
        state = scaler._per_optimizer_states[id(inner)]  # the scaler's own record of this step
        if state["stage"] is OptState.READY:
            scaler.unscale_(inner)
    for p in model.parameters():
        p.grad = None
