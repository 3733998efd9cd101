"""Progress and the run's end as the driver (or, outside a job, the run directory) learns of them: rank 0's
progress posts, each rank's report, the outcome, and result.json when the ranks write it themselves."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from gradwatch.names import TEST_REPORTS_ENV
from workers.board import BoardClient
from workers.rundir import LocalRunDir

if TYPE_CHECKING:
    from workers.telemetry import Telemetry


def reports_for_tests() -> bool:
    """Whether the test hook (gradwatch.names.TEST_REPORTS_ENV) is on: normal jobs neither copy their
    parameters to the host for a fingerprint nor keep sample indices."""
    return os.environ.get(TEST_REPORTS_ENV) == "1"


def rank_report(
    tel: Telemetry, job_id: str, rank: int, step: int, skipped_steps: int, params: list[torch.Tensor]
) -> dict[str, Any]:
    """What this rank ended with: its steps, skipped updates and mean step time; under the test
    hook also a fingerprint of its parameters (a copy of all of them to the host)."""
    registry, labels = tel.metrics.registry, {"job_id": job_id, "rank": str(rank)}
    step_sum = registry.get_sample_value("gradwatch_step_duration_seconds_sum", labels) or 0.0
    step_count = registry.get_sample_value("gradwatch_step_duration_seconds_count", labels) or 0.0
    report: dict[str, Any] = {
        "rank": rank,
        "steps": step,
        "skipped_steps": skipped_steps,
        "mean_step_seconds": step_sum / step_count if step_count else None,
    }
    if reports_for_tests():
        flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in params])
        report.update(
            param_sum=float(flat.double().sum()),
            param_hash=hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
            params_finite=bool(torch.isfinite(flat).all()),
        )
    return report


class Progress:
    """One rank's link to whoever follows the run: the job's board, or rank 0's own run directory."""

    def __init__(self, rank: int, world_size: int, board: BoardClient | None) -> None:
        self.rank, self.world_size, self.board = rank, world_size, board
        # start() outside a job: the ranks write the run directory themselves (rank 0's local_dir), no driver
        self.own_run_dir = False
        self.local_dir: LocalRunDir | None = None
        self.finished = False
        self._t_start = time.time()
        self._last_post = 0.0

    def post(
        self,
        tel: Telemetry,
        *,
        step: int,
        max_steps: int | None,
        epoch: int,
        last_val: tuple[float, float | None] | None,
        samples: int,
        rollbacks: int,
        force: bool = False,
    ) -> None:
        """Rank 0 tells the job's driver how far it got (at most twice a second unless forced)."""
        if self.rank != 0 or self.board is None:
            return
        now = time.time()
        if not force and now - self._last_post < 0.5:
            return
        self._last_post = now
        monitor, last = tel.monitor, tel.last
        self.board.post_progress(
            {
                "step": step,
                "max_steps": max_steps,
                "epoch": epoch,
                "world_size": self.world_size,
                "train_loss": last.get("global_loss", last.get("loss")),
                "loss_ema": monitor.loss_ema,
                "val_loss": last_val[0] if last_val else None,
                "val_accuracy": last_val[1] if last_val else None,
                "grad_norm": last.get("grad_norm"),
                "lr": last.get("lr"),
                "samples_per_second": samples * self.world_size / max(now - self._t_start, 1e-9),
                "phase": monitor.phase,
                "anomalies": {k: v for k, v in monitor.anomalies.items() if v},
                "rollbacks": rollbacks,
            }
        )

    def finish(
        self,
        tel: Telemetry,
        outcome: dict[str, Any],
        mine: dict[str, Any],
        *,
        error: str | None,
        post_progress: Callable[[], None],
    ) -> None:
        """Post the run's `outcome` (rank 0, after its last progress from `post_progress`) and this rank's
        report `mine`, once. Outside a job every rank calls it (with more than one rank it gathers the
        ranks' reports) and rank 0 writes result.json: succeeded, or failed with `error`."""
        if self.board and not self.finished:
            self.board.post_rank_report(self.rank, mine)
            if self.rank == 0:
                post_progress()
                self.board.post_final(outcome)
        if self.own_run_dir and not self.finished:  # outside a job: rank 0 writes result.json
            ranks = {self.rank: mine}
            if self.world_size > 1 and dist.is_available() and dist.is_initialized():
                everyone: list[Any] = [None] * self.world_size
                dist.all_gather_object(everyone, mine)
                ranks = {r: rep for r, rep in enumerate(everyone) if rep is not None}
            if self.local_dir is not None:
                tel.flush()  # the history is complete before the result says the run is over
                self.local_dir.finish(ranks, error=error)
        self.finished = True
