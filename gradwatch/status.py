"""What a job's driver tells the service: its live status and its final result.

The driver pushes a `RunStatus` to the service about every second and a `RunResult` at the end
(workers/push.py): that push is the one way the service learns a running job's status. It also
writes both to the run folder, `<storage>/<job id>/status.json` and `result.json`, the run's local
artifacts (report, replay, `gradwatch run --json`); the service reads result.json only when the
result's push could not be delivered. The service, the CLI and the test fakes read and write them
through these models alone. Non-finite numbers (a NaN loss) travel as null: JSON has no NaN.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from gradwatch.names import JobState


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _integral(value: Any) -> Any:
    # JSON Schema's integer holds 3.0: read it as 3, even where the body is read strictly
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Number = Annotated[float | None, BeforeValidator(_finite_or_none)]
Int = Annotated[int, BeforeValidator(_integral)]


class _Record(BaseModel):
    # Files written by a newer driver may carry more fields: read what this version knows.
    model_config = ConfigDict(extra="ignore")


class Endpoint(_Record):
    """One rank's `/metrics` endpoint."""

    rank: Int = Field(ge=0)
    host: str
    port: Int = Field(ge=1, le=65535)
    pid: Int | None = None
    node: str | None = Field(None, description="The Ray node id the rank runs on.")

    @property
    def target(self) -> str:
        """`host:port` as Prometheus writes a target (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


class LostNode(_Record):
    """A Ray node that left the cluster while it ran ranks of the job."""

    node: str
    address: str = ""
    ranks: list[Int] = Field(default_factory=list)
    step: Int | None = Field(None, description="The job's step when the loss was seen.")
    at: float | None = None


class Progress(_Record):
    """How far a running job got, as rank 0 last posted it."""

    step: Int | None = None
    max_steps: Int | None = None
    epoch: Int | None = None
    world_size: Int | None = None
    train_loss: Number = None
    loss_ema: Number = None
    val_loss: Number = None
    val_accuracy: Number = None
    grad_norm: Number = None
    lr: Number = None
    samples_per_second: Number = None
    phase: str | None = None
    anomalies: dict[str, bool] = Field(default_factory=dict, description="Anomalies held now.")
    resumed_step: Int | None = Field(None, description="The checkpoint step the current worker group resumed from.")


class RunStatus(Progress):
    """status.json: the job's state, progress and live endpoints."""

    job_id: str
    state: JobState
    restarts: Int = 0
    rollbacks: Int = 0
    endpoints: list[Endpoint] = Field(default_factory=list)
    nodes: dict[str, str] = Field(default_factory=dict, description="Rank -> the Ray node id of its latest start.")
    lost_nodes: list[LostNode] = Field(default_factory=list, description="Nodes lost while they ran ranks.")
    waiting: str | None = Field(None, description="Why the workers are not placed yet, while they are not.")
    warning: str | None = Field(
        None, description="Set at the end: why a run that reached its last step is still no plain success."
    )
    updated_at: float


class PhaseEntered(_Record):
    phase: str
    step: Int


class AnomalyRaised(_Record):
    kind: str
    first_step: Int


class RankReport(_Record):
    """What one rank ended with: DDP keeps replicas equal, so equal fingerprints say the run stayed sound."""

    rank: Int
    steps: Int
    skipped_steps: Int = Field(0, description="Updates skipped as unsafe (a non-finite loss or gradient).")
    mean_step_seconds: Number = None
    # Under the test hook (gradwatch.names.TEST_REPORTS_ENV) only: a fingerprint of the final
    # parameters, and the built-in loop's first-epoch sample indices.
    params_finite: bool | None = None
    param_hash: str | None = Field(None, description="sha256 of the final parameters, as float32.")
    param_sum: float | None = None
    first_epoch_indices: list[Int] | None = None


class RunResult(_Record):
    """result.json: how the job ended."""

    job_id: str
    state: JobState
    steps: Int = 0
    world_size: Int
    train_loss: Number = None
    val_loss: Number = None
    val_accuracy: Number = None
    first_val_loss: Number = None
    wall_seconds: float = 0.0
    run_dir: str = Field(description="Where the job's checkpoints, history, status and result are.")
    error: str | None = None
    warning: str | None = Field(
        None,
        description="Why a run that reached its last step is still no plain "
        "success (a non-finite final loss, divergence still held).",
    )
    restarts: Int = 0
    rollbacks: Int = 0
    phases: list[PhaseEntered] = Field(default_factory=list)
    anomalies: list[AnomalyRaised] = Field(default_factory=list)
    ranks: list[RankReport] = Field(default_factory=list, description="Each rank's final report, by rank.")
    nodes: dict[str, str] = Field(default_factory=dict, description="Rank -> the Ray node id it ended on.")
    lost_nodes: list[LostNode] = Field(default_factory=list)
    workers: list[dict[str, Any]] = Field(
        default_factory=list, description="Each rank's node, steps and parameter hash."
    )

    def summary(self) -> str:
        """One line for a person: steps, loss and time, and why an ending is no plain success."""
        if self.state != "succeeded":
            return self.error or self.state
        parts = [f"finished {self.steps} steps"]
        if self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.4g}")
        parts.append(f"in {self.wall_seconds:.0f} s")
        line = ", ".join(parts)
        return f"{line}, but {self.warning}" if self.warning else line


STATUS_FILE = "status.json"
RESULT_FILE = "result.json"


def write_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Replace `path` at once: readers (the service, Prometheus) never see half a file. `mode`
    (less the umask) from the start: a private file (0o600) is never readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_record(path: Path, record: BaseModel) -> None:
    write_atomic(path, record.model_dump_json(indent=1))


def read_status(run_dir: Path) -> RunStatus | None:
    """The job's last status.json, or None when there is none (yet) or it cannot be read."""
    return _read(run_dir / STATUS_FILE, RunStatus)


def read_result(run_dir: Path) -> RunResult | None:
    return _read(run_dir / RESULT_FILE, RunResult)


def _read(path: Path, model: type[Any]) -> Any:
    try:
        return model.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def target_groups(job_id: str, endpoints: list[Endpoint]) -> list[dict[str, Any]]:
    """Prometheus service discovery (file_sd and HTTP SD alike): one group per live endpoint."""
    # the Ray node id too: several nodes may share one address
    return [
        {
            "targets": [e.target],
            "labels": {"job_id": job_id, "rank": str(e.rank), **({"node": e.node} if e.node else {})},
        }
        for e in endpoints
    ]


def event_line(event: dict[str, Any]) -> str:
    """One job event for a person: `step 7: anomaly nonfinite raised - loss is nan`."""
    verb = "raised" if event.get("raised", True) else "cleared"
    line = f"step {event.get('step')}: {event.get('kind')} {event.get('name')} {verb}"
    return f"{line} - {event['detail']}" if event.get("detail") else line
