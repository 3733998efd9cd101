"""What each rank of a torchrun NaN test saw, written by the rank's script and read by the test."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def write_rank_report(out: Path, rank: int, unchanged: bool | None, run: Any, parameters: Iterable[Any]) -> None:
    """OUT/rank<r>.json: whether the weights stayed as they were on the poisoned step, the run's skipped
    updates, step and world size, and whether the final weights are finite, with their hash."""
    flat = torch.cat([p.detach().reshape(-1) for p in parameters])
    report = {
        "unchanged": unchanged,
        "skipped": run.skipped_steps,
        "step": run.step,
        "world_size": run.world_size,
        "finite": bool(torch.isfinite(flat).all()),
        "hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
