"""The store's tables: jobs with their labels and transitions, alerts, users and their tokens."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from gradwatch.names import TERMINAL_STATES, AlertStatus, JobState
from gradwatch.status import RunResult, RunStatus


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, float: Float}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    owner: Mapped[str | None] = mapped_column(String(128))
    labels: Mapped[dict[str, Any]]
    priority: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]]
    state: Mapped[JobState] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float]
    started_at: Mapped[float | None]
    ended_at: Mapped[float | None]
    ray_submission_id: Mapped[str | None] = mapped_column(String(64))
    world_size: Mapped[int | None] = mapped_column(Integer)
    max_steps: Mapped[int | None] = mapped_column(Integer)
    cpus: Mapped[float]
    gpus: Mapped[float]
    # What the driver last reported (gradwatch.status): its RunStatus, its newest events and, at the
    # end, its RunResult, each as JSON; read them through last_status() and final_result().
    run_status: Mapped[dict[str, Any] | None]
    events: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    run_result: Mapped[dict[str, Any] | None]
    # "cancel" or "timeout" once the service asked Ray to stop the job; the state follows when Ray confirms.
    stop_requested: Mapped[str | None] = mapped_column(String(16))
    stop_requested_at: Mapped[float | None]

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_state_created", "state", "created_at", "id"),
        Index("ix_jobs_name_created", "name", "created_at", "id"),
        Index("ix_jobs_ended", "ended_at"),
    )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def last_status(self) -> RunStatus | None:
        """The driver's last status, or None before its first report."""
        return RunStatus.model_validate(self.run_status) if self.run_status else None

    def final_result(self) -> RunResult | None:
        """The driver's result, or None until it reported one."""
        return RunResult.model_validate(self.run_result) if self.run_result else None


class JobLabel(Base):
    """One label of a job, so label filters use an index (newest first) instead of scanning JSON."""

    __tablename__ = "job_labels"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float]  # the job's, repeated so one index both filters and orders

    __table_args__ = (Index("ix_job_labels_lookup", "key", "value", "created_at", "job_id"),)


class Transition(Base):
    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[JobState | None] = mapped_column(String(16))
    to_state: Mapped[JobState] = mapped_column(String(16))
    at: Mapped[float]
    reason: Mapped[str | None] = mapped_column(Text)


class Alert(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(String(64))  # no foreign key: alerts may name unknown jobs
    alertname: Mapped[str] = mapped_column(String(200))
    severity: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[AlertStatus] = mapped_column(String(16))
    starts_at: Mapped[float]
    ends_at: Mapped[float | None]
    summary: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    labels: Mapped[dict[str, Any]]
    annotations: Mapped[dict[str, Any]]
    generator_url: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[float]
    updated_at: Mapped[float]

    __table_args__ = (
        UniqueConstraint("fingerprint", "starts_at", name="uq_alerts_fingerprint_starts"),
        Index("ix_alerts_job_received", "job_id", "received_at"),
        Index("ix_alerts_received", "received_at"),
    )


class User(Base):
    """A person (or a program) who holds tokens."""

    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]


class Token(Base):
    """A bearer token: its public id, the SHA-256 of its secret part (never the secret), and its scopes."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[str] = mapped_column(String(200))  # space-separated
    digest: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(32))  # a job's own token: good for that job only
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]
