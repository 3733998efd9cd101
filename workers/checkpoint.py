"""Checkpoint files: model, optimizer, scheduler and the loop's position, in one directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"


def save_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        position: Any, extra: dict[str, Any]) -> Path:
    inner = model.module if hasattr(model, "module") else model
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_FILE
    torch.save({"model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "position": dataclasses.asdict(position),
                "extra": extra}, path)
    return path


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        device: torch.device) -> dict[str, Any]:
    # weights_only: a checkpoint in shared storage is data, never code to unpickle.
    state = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    inner = model.module if hasattr(model, "module") else model
    inner.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state
