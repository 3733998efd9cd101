"""Checkpoints and the way back: the state a checkpoint holds, the last good one kept in memory as the
rollback target, and what a rollback (lower learning rate) or a rewind (batches left out) restores."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from gradwatch.spec import RollbackSpec
from workers.rewind import BatchLog, FedBatch
from workers.session import Session

STATE_FILE = "state.pt"
# While one of these holds, the weights are suspect: a checkpoint is saved but not kept as the rollback target.
SUSPECT = ("divergence", "exploding_gradients", "loss_spike")


class Checkpoints:
    """One rank's model, optimizer and scheduler with their checkpoints, rollbacks and rewinds."""

    def __init__(self, session: Session, rank: int, device: torch.device) -> None:
        self.session, self.rank, self.device = session, rank, device
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.good: dict[str, Any] | None = None  # the last good state: where a rollback or rewind goes
        self.rollbacks = 0
        self.lr_scale = 1.0
        # rewind-and-skip (workers/rewind.py): the batches fed per step, those left out
        self.batch_log = BatchLog()
        self.rewinds = 0
        self._initial_lrs: list[float] = []

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """What a checkpoint saves and a rollback restores (the optimizer's learning rates as they start)."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._initial_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]

    def snapshot(self, position: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's state: the weights, optimizer and scheduler, the run's `position` (step, epoch,
        ...), the rollbacks and rewinds so far, and the caller's `extra` state (all copies)."""
        assert self.model is not None and self.optimizer is not None
        inner: torch.nn.Module = getattr(self.model, "module", self.model)  # DDP's wrapped model, or the model
        return {
            "model": copy.deepcopy(inner.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()) if self.scheduler is not None else None,
            **position,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "extra": copy.deepcopy(extra),
            "rewinds": self.rewinds,
            "batch_log": self.batch_log.state_dict(),
        }

    def load_weights(self, state: dict[str, Any]) -> None:
        """The model, optimizer and scheduler as `state` has them."""
        assert self.model is not None and self.optimizer is not None
        inner: torch.nn.Module = getattr(self.model, "module", self.model)
        inner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def save(self, state: dict[str, Any], anomalies: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Save `state` through the session with `metrics` (rank 0 writes, every rank calls); kept in memory
        as the rollback target unless one of the SUSPECT `anomalies` holds."""
        if not any(anomalies.get(k) for k in SUSPECT):
            self.good = state  # every rank keeps the last good state in memory: a rollback must not wait on storage
        checkpoint_dir = None
        if self.rank == 0:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="gradwatch-ckpt-"))
            torch.save(state, checkpoint_dir / STATE_FILE)
        self.session.report(metrics, checkpoint_dir)

    def latest(self) -> dict[str, Any] | None:
        """The session's latest checkpoint's state (after a worker-group restart), or None when there is none."""
        with self.session.latest_checkpoint_dir() as path:
            if path is None:
                return None
            # weights_only: a checkpoint in shared storage is data, never code to unpickle.
            state: dict[str, Any] = torch.load(Path(path) / STATE_FILE, map_location=self.device, weights_only=True)
        return state

    def resume(self, state: dict[str, Any]) -> None:
        """Go on from a restored checkpoint's `state` (its weights loaded): its rollbacks, rewinds and
        skipped batches, and it is the rollback target."""
        self.lr_scale, self.rollbacks = state["lr_scale"], state["rollbacks"]
        self.good = state
        self.rewinds = state.get("rewinds", 0)
        self.batch_log.load_state_dict(state.get("batch_log"))

    def rollback(self, cfg: RollbackSpec) -> dict[str, Any]:
        """Back to the last good state with the learning rate scaled by cfg.lr_factor once more; returns
        that state (the run's position to go back to)."""
        assert self.good is not None and self.optimizer is not None
        good = self.good
        self.rollbacks += 1
        self.lr_scale *= cfg.lr_factor
        self.load_weights(good)
        ratio = self.lr_scale / good["lr_scale"]
        for group in self.optimizer.param_groups:
            group["lr"] *= ratio
        if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * self.lr_scale for lr in self._initial_lrs]
        return good

    def rewind(self, seen_at: int, skip_steps: int) -> tuple[dict[str, Any], list[FedBatch]]:
        """Back to the last good state, the batches of the `skip_steps` steps ending at `seen_at` left out
        from now on; returns that state and the batches left out."""
        assert self.good is not None
        good = self.good
        left_out = self.batch_log.rewind(good["step"], seen_at, skip_steps)
        self.rewinds += 1
        self.load_weights(good)
        return good, left_out
