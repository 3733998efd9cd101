"""What the HTTP API accepts and returns (the job spec itself lives in gradwatch/spec.py; the driver's
status and result, which these answers show, in gradwatch/status.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gradwatch.names import JobState
from gradwatch.status import Endpoint, LostNode, RunStatus
from service.store.tables import Alert, Job, Transition

State = JobState


@overload
def iso(ts: float) -> str: ...
@overload
def iso(ts: float | None) -> str | None: ...


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> float | None:
    """RFC 3339 -> unix seconds; Alertmanager's zero time (year 1) means unset."""
    if not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ErrorOut(BaseModel):
    detail: str


class SpecErrorsOut(BaseModel):
    detail: str = "the job spec is not valid"
    errors: list[str] = Field(description="One line per problem: `field.path: reason (got VALUE)`.")


class JobOut(BaseModel):
    """A job as listed: who, what state and why, and how far it got."""

    id: str
    name: str
    owner: str | None
    labels: dict[str, str]
    priority: int
    state: State
    reason: str | None
    created_at: str
    started_at: str | None
    ended_at: str | None
    world_size: int | None
    step: int | None = None
    max_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    phase: str | None = None
    warning: str | None = Field(
        None,
        description="Why a job that reached its last step is no plain "
        "success: a non-finite final loss, or divergence still held.",
    )
    stopping: bool = Field(False, description="A cancel or timeout was sent to Ray; the state follows.")

    @classmethod
    def of(cls, job: Job, **extra: Any) -> JobOut:
        status = job.last_status() or _NO_STATUS
        return cls(
            id=job.id,
            name=job.name,
            owner=job.owner,
            labels=job.labels,
            priority=job.priority,
            state=job.state,
            reason=job.reason,
            created_at=iso(job.created_at),
            started_at=iso(job.started_at),
            ended_at=iso(job.ended_at),
            world_size=job.world_size,
            step=status.step,
            max_steps=status.max_steps or job.max_steps,
            train_loss=status.train_loss,
            val_loss=status.val_loss,
            val_accuracy=status.val_accuracy,
            phase=status.phase,
            warning=status.warning if job.state == "succeeded" else None,
            stopping=bool(job.stop_requested) and job.state == "running",
            **extra,
        )


# What a job shows before its driver's first report.
_NO_STATUS = RunStatus(job_id="", state="queued", updated_at=0.0)


class TransitionOut(BaseModel):
    from_state: State | None
    to_state: State
    at: str
    reason: str | None

    @classmethod
    def of(cls, t: Transition) -> TransitionOut:
        return cls(from_state=t.from_state, to_state=t.to_state, at=iso(t.at), reason=t.reason)


class AlertOut(BaseModel):
    id: int
    job_id: str | None
    alertname: str
    severity: str | None
    status: Literal["firing", "resolved"]
    starts_at: str
    ends_at: str | None
    summary: str | None
    description: str | None
    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    received_at: str

    @classmethod
    def of(cls, a: Alert) -> AlertOut:
        return cls(
            id=a.id,
            job_id=a.job_id,
            alertname=a.alertname,
            severity=a.severity,
            status=a.status,
            starts_at=iso(a.starts_at),
            ends_at=iso(a.ends_at),
            summary=a.summary,
            description=a.description,
            fingerprint=a.fingerprint,
            labels=a.labels,
            annotations=a.annotations,
            received_at=iso(a.received_at),
        )


class JobDetail(JobOut):
    """One job in full: the spec, telemetry highlights, worker endpoints, history and alerts."""

    spec: dict[str, Any]
    grad_norm: float | None = None
    samples_per_second: float | None = None
    anomalies: dict[str, bool] = Field(default_factory=dict)
    restarts: int = 0
    endpoints: list[Endpoint] = Field(default_factory=list)
    nodes: dict[str, str] = Field(default_factory=dict, description="Rank -> the Ray node it last ran on.")
    lost_nodes: list[LostNode] = Field(default_factory=list)
    waiting: str | None = Field(None, description="What a restarting worker group waits for.")
    ray_submission_id: str | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    progress_updated_at: str | None = None
    transitions: list[TransitionOut] = Field(default_factory=list)
    alerts: list[AlertOut] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The driver's newest events (phases, anomalies, rollbacks, hangs with their stacks), oldest first.",
    )

    @classmethod
    def full(cls, job: Job, transitions: list[Transition], alerts: list[Alert]) -> JobDetail:
        status = job.last_status()
        running = job.state == "running"
        return cls(
            **JobOut.of(job).model_dump(),
            spec=job.spec,
            grad_norm=status.grad_norm if status else None,
            samples_per_second=status.samples_per_second if status else None,
            anomalies=status.anomalies if status else {},
            restarts=status.restarts if status else 0,
            endpoints=status.endpoints if status and running else [],
            nodes=status.nodes if status else {},
            lost_nodes=status.lost_nodes if status else [],
            waiting=status.waiting if status and running else None,
            ray_submission_id=job.ray_submission_id,
            resources={"cpus": job.cpus, "gpus": job.gpus},
            progress_updated_at=iso(status.updated_at) if status else None,
            transitions=[TransitionOut.of(t) for t in transitions],
            alerts=[AlertOut.of(a) for a in alerts],
            events=job.events or [],
        )


class JobsPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next (older) page.")


class AlertsPage(BaseModel):
    data: list[AlertOut]


class TargetGroup(BaseModel):
    """Prometheus HTTP service discovery: one group per worker endpoint."""

    targets: list[str]
    labels: dict[str, str]


# ----------------------------------------------------- Alertmanager webhook
# Bounds on what one webhook call may store: gradwatch's rules send a few short labels and
# annotations; Alertmanager's own `max_alerts` on the webhook keeps a call under the count.
MAX_ALERTS_PER_CALL = 1000
MAX_ALERT_BYTES = 16 * 1024  # labels and annotations of one alert together
_Key = Annotated[str, Field(max_length=128)]


class AmAlert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[_Key, Annotated[str, Field(max_length=1024)]] = Field(default_factory=dict, max_length=32)
    annotations: dict[_Key, Annotated[str, Field(max_length=8192)]] = Field(default_factory=dict, max_length=16)
    startsAt: str = Field(max_length=64)
    endsAt: str | None = Field(None, max_length=64)
    generatorURL: str | None = Field(None, max_length=2048)
    fingerprint: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _bounded(self) -> AmAlert:
        size = sum(len(k) + len(v) for part in (self.labels, self.annotations) for k, v in part.items())
        if size > MAX_ALERT_BYTES:
            raise ValueError(
                f"labels and annotations hold {size} characters, over the {MAX_ALERT_BYTES} limit of one alert"
            )
        return self

    @field_validator("startsAt")
    @classmethod
    def _time(cls, value: str) -> str:
        if parse_time(value) is None:
            raise ValueError("startsAt must be an RFC 3339 time, e.g. 2026-01-02T03:04:05Z")
        return value


class AlertmanagerWebhook(BaseModel):
    """Alertmanager's webhook payload, version 4."""

    model_config = ConfigDict(extra="allow")

    version: str = "4"
    status: Literal["firing", "resolved"] | None = None
    receiver: str | None = None
    groupKey: str | None = None
    alerts: list[AmAlert] = Field(
        max_length=MAX_ALERTS_PER_CALL,
        description=f"At most {MAX_ALERTS_PER_CALL} (set Alertmanager's webhook `max_alerts`).",
    )


class IngestOut(BaseModel):
    received: int
    new: int
    updated: int
    refused: int = Field(
        0,
        description="Updates left unstored: a known fingerprint and startsAt with other labels, or older "
        "than the stored alert (a `firing` after its `resolved`, a resolution before the stored endsAt).",
    )
