"""The run directory of a run made outside a gradwatch job (`gradwatch.start()` in a single process, a
plain Ray Train script, a framework callback under torchrun or Lightning).

Inside a job the driver writes the run directory; here rank 0 writes the same files itself:
`spec.json` at the start, `status.json` about every second, `result.json` at the end, next to the
`history.jsonl` and each rank's `steps-rankN.jsonl` that the telemetry writes in both cases. So
`gradwatch report <dir>`, `gradwatch replay <dir>/history.jsonl` and `read_status(<dir>)` work the same.

Where: `$GRADWATCH_STORAGE_PATH/<job id>` when the variable is set, else `./runs/<job id>` (the same
place `gradwatch run` writes its jobs to), or the `run_dir` given to `gradwatch.start()`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from gradwatch.names import JobState
from gradwatch.spec import JobSpec
from gradwatch.status import RESULT_FILE, STATUS_FILE, RunResult, write_atomic, write_record
from workers.board import BoardClient, JobBoard

STORAGE_ENV = "GRADWATCH_STORAGE_PATH"
DEFAULT_STORAGE = "runs"
STATUS_SECONDS = 1.0  # status.json is rewritten at most this often while the run goes on
OPTIMIZER_FILE = "optimizer.json"  # beside spec.json: what the training code gave run.watch()


def write_optimizer(run_dir: Path, optimizer: Any, scheduler: Any = None) -> None:
    """`optimizer.json` in the run directory: the optimizer's class and peak learning rate, and the
    learning-rate scheduler's class if there is one. A training function's spec does not say what it made;
    the report's header reads this file instead."""
    lrs = [g.get("initial_lr", g.get("lr")) for g in getattr(optimizer, "param_groups", [])]
    record = {
        "name": type(optimizer).__name__,
        "lr": max((float(lr) for lr in lrs if isinstance(lr, int | float)), default=None),
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
    }
    write_atomic(run_dir / OPTIMIZER_FILE, json.dumps(record))


def default_run_dir(job_id: str) -> Path:
    """`$GRADWATCH_STORAGE_PATH/<job_id>` if the variable is set (and not empty), else `./runs/<job_id>`."""
    return (Path(os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE) / job_id).absolute()


class LocalRunDir:
    """Rank 0's run directory and board: what the ranks post is kept here and written to status.json."""

    def __init__(self, path: Path, job_id: str, spec: JobSpec):
        self.path, self.job_id, self.spec = path, job_id, spec
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"cannot make the run directory {path} ({exc.strerror}): set {STORAGE_ENV} to a writable "
                "folder or pass gradwatch.start(run_dir=...)"
            ) from None
        self.board = JobBoard(job_id)
        self.started = time.time()
        self.result: RunResult | None = None
        self._lock = threading.Lock()
        self._written = 0.0
        write_atomic(path / "spec.json", spec.model_dump_json(indent=1))
        self.write_status("running")

    def client(self) -> BoardClient:
        return _LocalClient(self)

    def changed(self) -> None:
        """Something was posted: status.json follows, at most every STATUS_SECONDS."""
        if self.result is None and time.monotonic() - self._written >= STATUS_SECONDS:
            self.write_status("running")

    def write_status(self, state: JobState, warning: str | None = None) -> None:
        from workers.driver import run_status

        with self._lock:
            self._written = time.monotonic()
            status = run_status(self.job_id, state, self.board.snapshot(), {"warning": warning})
            write_record(self.path / STATUS_FILE, status)

    def finish(self, ranks: dict[int, dict[str, Any]], error: str | None = None) -> RunResult:
        """result.json (and the last status.json): succeeded, or failed with `error`; written once."""
        from workers.driver import run_result, unhealthy_ending

        if self.result is not None:
            return self.result
        for rank, report in ranks.items():
            self.board.post_rank_report(rank, report)
        snap = self.board.snapshot()
        state: JobState = "failed" if error else "succeeded"
        result = run_result(self.job_id, self.spec, self.path, snap, state, error, time.time() - self.started)
        if state == "succeeded":
            result.warning = unhealthy_ending(snap)
        self.result = result
        self.write_status(state, result.warning)
        write_record(self.path / RESULT_FILE, result)
        return result


class _LocalClient(BoardClient):
    """The board client of rank 0 outside a job: each call is made here, then status.json may follow."""

    def __init__(self, run_dir: LocalRunDir):
        super().__init__(run_dir.board, remote=False)
        self._run_dir = run_dir

    def _send(self, method: Any, *args: Any) -> None:
        method(*args)
        self._run_dir.changed()
