"""Where a training loop runs: inside a Ray Train worker, or in this process alone.

The loop only talks to a `Session`, so the same code runs as rank r of a
DDP group under Ray Train and as a single process in unit tests.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...
    def latest_checkpoint_dir(self) -> AbstractContextManager[Path | None]: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...
    def node_address(self) -> str: ...
    def node_id(self) -> str | None: ...


class LocalSession:
    """One process, no Ray, no process group: for tests and quick checks."""

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_root: Path | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.checkpoint_root = Path(checkpoint_root or tempfile.mkdtemp(prefix="gradwatch-ckpt-"))
        self.reports: list[dict[str, Any]] = []
        self._checkpoints: list[Path] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    @contextmanager
    def latest_checkpoint_dir(self) -> Iterator[Path | None]:
        yield self._checkpoints[-1] if self._checkpoints else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            kept = self.checkpoint_root / f"checkpoint_{len(self._checkpoints):06d}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(checkpoint_dir), kept)
            self._checkpoints.append(kept)

    def node_address(self) -> str:
        return "127.0.0.1"

    def node_id(self) -> str | None:
        return None


class RayTrainSession:
    """Rank `rank` of a Ray Train worker group (DDP via prepare_model)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(model)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return self._torch.prepare_data_loader(loader)

    @contextmanager
    def latest_checkpoint_dir(self) -> Iterator[Path | None]:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as path:
            yield Path(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        try:
            self._train.report(metrics, checkpoint=checkpoint)
        finally:
            if checkpoint_dir is not None:  # report() has persisted it to the run's storage
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def node_address(self) -> str:
        import ray

        try:
            return ray.util.get_node_ip_address()
        except Exception:  # outside a connected worker: best effort
            return socket.gethostbyname(socket.gethostname())

    def node_id(self) -> str | None:
        """The Ray node this rank runs on (several nodes may share one address)."""
        import ray

        return ray.get_runtime_context().get_node_id()
