"""The job store: jobs, every state transition, and the alerts about them.

SQLAlchemy 2 with typed models; SQLite by default (WAL, a busy timeout and
`BEGIN IMMEDIATE` writes, so concurrent threads queue for the write lock
instead of failing), any SQLAlchemy URL by setting. Terminal states are final:
a transition out of one is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    inspect,
    or_,
    select,
    tuple_,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, defer, mapped_column, sessionmaker

from gradwatch.ids import new_job_id
from gradwatch.names import JOB_STATES, TERMINAL_STATES, AlertStatus, JobState
from gradwatch.spec import JobSpec
from gradwatch.status import RunResult, RunStatus
from service.auth import new_token_text, split_token

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": TERMINAL_STATES,
}


class StoreError(Exception):
    """Base of the store's errors; the message is for people."""


class JobNotFound(StoreError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class TransitionRefused(StoreError):
    """The job is not in a state the requested change can leave from (e.g. it already ended)."""


class BadCursor(StoreError):
    pass


class QueueFull(StoreError):
    """A submit over a queued-jobs cap (the user's or everyone's)."""


class UserExists(StoreError):
    pass


class UserNotFound(StoreError):
    pass


# ---------------------------------------------------------------------- tables
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


# ----------------------------------------------------------------- the store
@dataclass(frozen=True)
class AlertUpdate:
    """One alert of an Alertmanager notification, already parsed."""

    fingerprint: str
    status: AlertStatus
    starts_at: float
    ends_at: float | None
    labels: dict[str, str]
    annotations: dict[str, str]
    generator_url: str | None = None


def demand_of(spec: JobSpec) -> tuple[float, float]:
    """(CPUs, GPUs) the job's workers ask Ray for."""
    demand = spec.scaling.demand()
    return demand["CPU"], demand.get("GPU", 0.0)


# A page's end: the last job's creation time and id. Any text of this form is a place in the list.
CURSOR = r"^[0-9]{1,17}(\.[0-9]{1,17})?(e[-+][0-9]{2})?~[A-Za-z0-9._-]{1,64}$"


def encode_cursor(job: Job) -> str:
    return f"{job.created_at!r}~{job.id}"


def decode_cursor(cursor: str) -> tuple[float, str]:
    if not re.fullmatch(CURSOR, cursor):
        raise BadCursor(f"cursor {cursor[:40]!r} is not one this server gave out; start without it")
    created_at, job_id = cursor.split("~", 1)
    return float(created_at), job_id


class Store:
    """Thread-safe access to the job store. Objects it returns are detached snapshots."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _make_engine(url)
        Base.metadata.create_all(self.engine)
        _check_columns(self.engine, url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_session = sessionmaker(self.engine.execution_options(gw_write=True), expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_session() as session, session.begin():
            yield session

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        spec: JobSpec,
        *,
        owner: str | None = None,
        max_queued_per_owner: int | None = None,
        max_queued: int | None = None,
        now: float | None = None,
    ) -> Job:
        """Store a queued job. `owner` (the authenticated user) replaces the spec's; the caps are
        checked in the same write transaction, so concurrent submits cannot overshoot them."""
        if owner is not None:
            spec = spec.model_copy(update={"owner": owner})
        cpus, gpus = demand_of(spec)
        at = time.time() if now is None else now
        for _ in range(5):
            job = Job(
                id=new_job_id(),
                name=spec.name,
                owner=spec.owner,
                labels=dict(spec.labels),
                priority=spec.priority,
                spec=spec.model_dump(mode="json"),
                state="queued",
                reason="waiting for the scheduler",
                created_at=at,
                cpus=cpus,
                gpus=gpus,
                world_size=spec.scaling.num_workers,
                max_steps=spec.max_steps,
            )
            try:
                with self._write() as session:
                    _check_queue_caps(session, spec.owner, max_queued_per_owner, max_queued)
                    session.add(job)
                    session.flush()
                    session.add_all(
                        JobLabel(job_id=job.id, key=k, value=v, created_at=at) for k, v in spec.labels.items()
                    )
                    session.add(
                        Transition(job_id=job.id, from_state=None, to_state="queued", at=at, reason="submitted")
                    )
                return job
            except IntegrityError:  # an id collision (1 in 2**48 per pair): draw again
                continue
        raise StoreError("could not allocate a job id")

    def get_job(self, job_id: str) -> Job:
        with self._read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    def list_jobs(
        self,
        *,
        state: str | Collection[str] | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        offset: int = 0,
        cursor: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Newest first. Returns the page and a cursor for the next one (None at the end); `owner`
        keeps that user's jobs only."""
        if _has_nul(name, *(labels or {}).keys(), *(labels or {}).values()):
            return [], None  # no stored text holds one (and PostgreSQL refuses to compare it)
        query = select(Job).options(defer(Job.spec, raiseload=True))  # a listing shows no spec
        order: tuple[Any, Any] = (Job.created_at, Job.id)
        for n, (key, value) in enumerate(self._rarest_first(labels or {})):
            label = aliased(JobLabel)
            query = query.join(label, and_(label.job_id == Job.id, label.key == key)).where(label.value == value)
            if n == 0:  # walk the rarest label's index newest first
                order = (label.created_at, label.job_id)
        if state:
            states = [state] if isinstance(state, str) else list(state)
            query = query.where(Job.state.in_(states)) if len(states) > 1 else query.where(Job.state == states[0])
        if name:
            query = query.where(Job.name == name)
        if owner is not None:
            query = query.where(Job.owner == owner)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(tuple_(*order) < tuple_(created_at, job_id))
        query = query.order_by(order[0].desc(), order[1].desc()).offset(offset).limit(limit + 1)
        with self._read() as session:
            jobs = list(session.scalars(query))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (encode_cursor(jobs[-1]) if more and jobs else None)

    def _rarest_first(self, labels: dict[str, str]) -> list[tuple[str, str]]:
        """Labels by how few jobs carry them (counted on the label index), so a scan ends soonest."""
        items = list(labels.items())
        if len(items) < 2:
            return items
        with self._read() as session:
            counts = {
                (k, v): session.scalar(
                    select(func.count()).where(JobLabel.key == k, JobLabel.value == v).select_from(JobLabel)
                )
                or 0
                for k, v in items
            }
        return sorted(items, key=lambda item: counts[item])

    def jobs_in(self, *states: str) -> list[Job]:
        """Jobs in these states, in scheduling order: priority (high first), then first come."""
        query = select(Job).where(Job.state.in_(states)).order_by(Job.priority.desc(), Job.created_at, Job.id)
        with self._read() as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: str,
        to: str,
        reason: str,
        *,
        expect: Collection[str] | None = None,
        now: float | None = None,
        **fields: Any,
    ) -> Job:
        """Move a job to `to`, record why, and set `fields`; refused out of a terminal state."""
        if to not in JOB_STATES:
            raise ValueError(f"unknown state {to!r}")
        at = time.time() if now is None else now
        with self._write() as session:
            job = _job_for_update(session, job_id)
            if job.state in TERMINAL_STATES:
                raise TransitionRefused(f"job {job_id} already ended {job.state}; it cannot become {to}")
            if expect is not None and job.state not in expect:
                raise TransitionRefused(f"job {job_id} is {job.state}, not {' or '.join(sorted(expect))}")
            if to not in ALLOWED[job.state]:
                raise TransitionRefused(f"job {job_id} cannot go from {job.state} to {to}")
            session.add(Transition(job_id=job_id, from_state=job.state, to_state=to, at=at, reason=reason))
            job.state, job.reason = to, reason
            if to == "running":
                job.started_at = at
            if to in TERMINAL_STATES:
                job.ended_at = at
            for key, value in fields.items():
                setattr(job, key, value)
        return job

    def update_job(self, job_id: str, **fields: Any) -> Job:
        """Change bookkeeping fields (the driver's status, reason, world size); never the state."""
        if "state" in fields:
            raise ValueError("use transition() to change a job's state")
        with self._write() as session:
            job = _job_for_update(session, job_id)
            for key, value in fields.items():
                setattr(job, key, value)
        return job

    def push_progress(
        self,
        job_id: str,
        status: RunStatus | None,
        events: list[dict[str, Any]],
        result: RunResult | None = None,
        keep_events: int = 200,
    ) -> Job:
        """A driver's report of a running job: its status replaces the last one, events are appended
        (the newest `keep_events` kept) and a result is kept beside them. Refused once the job ended."""
        with self._write() as session:
            job = _job_for_update(session, job_id)
            if job.state != "running":
                raise TransitionRefused(f"job {job_id} is {job.state}; its driver's reports are no longer taken")
            if status is not None:
                job.run_status = status.model_dump(mode="json")
                job.world_size = status.world_size or job.world_size
            if events:
                job.events = [*(job.events or []), *events][-keep_events:]
            if result is not None:
                job.run_result = result.model_dump(mode="json")
        return job

    def request_stop(self, job_id: str, kind: str, reason: str, *, now: float | None = None) -> tuple[Job, bool]:
        """Cancel (kind "cancel") or time out ("timeout") a job.

        A queued job ends at once. A running one is marked; the launcher stops its
        Ray job and the state follows when Ray confirms. Returns the job and whether
        its Ray job needs a stop.
        """
        at = time.time() if now is None else now
        finals: dict[str, JobState] = {"cancel": "cancelled", "timeout": "timed_out"}
        final = finals[kind]
        with self._write() as session:
            job = _job_for_update(session, job_id)
            if job.state in TERMINAL_STATES:
                raise TransitionRefused(f"job {job_id} already ended {job.state}")
            if job.state == "queued":
                session.add(Transition(job_id=job_id, from_state="queued", to_state=final, at=at, reason=reason))
                job.state, job.reason, job.ended_at = final, reason, at
                return job, False
            if job.stop_requested is None:
                job.stop_requested, job.stop_requested_at = kind, at
                job.reason = f"stopping: {reason}"
            return job, True

    def transitions(self, job_id: str) -> list[Transition]:
        with self._read() as session:
            return list(session.scalars(select(Transition).where(Transition.job_id == job_id).order_by(Transition.id)))

    def count_by_state(self) -> dict[str, int]:
        with self._read() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        counts.update({state: n for state, n in rows})
        return counts

    def current_states(self, ended_since: float) -> list[tuple[str, str]]:
        """(job id, state) of every job not ended, or ended after `ended_since`."""
        query = select(Job.id, Job.state).where(or_(Job.state.in_(("queued", "running")), Job.ended_at >= ended_since))
        with self._read() as session:
            return [(job_id, state) for job_id, state in session.execute(query).all()]

    def count_jobs(self, owner: str, state: str) -> int:
        with self._read() as session:
            query = select(func.count()).select_from(Job).where(Job.owner == owner, Job.state == state)
            return session.scalar(query) or 0

    # ------------------------------------------------------- users and tokens
    def add_user(self, name: str, scopes: list[str], *, now: float | None = None) -> str:
        """A new user and their first token; returns the token's text (shown once, stored hashed)."""
        at = time.time() if now is None else now
        try:
            with self._write() as session:
                if session.get(User, name) is not None:
                    raise UserExists(f"user {name!r} exists: `gradwatch user token {name}` gives them another token")
                session.add(User(name=name, created_at=at, revoked_at=None))
        except IntegrityError:
            raise UserExists(f"user {name!r} exists") from None
        return self.issue_token(name, scopes, now=at)

    def issue_token(self, user: str, scopes: list[str], *, job_id: str | None = None, now: float | None = None) -> str:
        """A new token for `user`; `job_id` makes it good for that job only, until the job ends."""
        at = time.time() if now is None else now
        with self._write() as session:
            if job_id is None:
                row = session.get(User, user)
                if row is None or row.revoked_at is not None:
                    raise UserNotFound(f"no active user {user!r}: `gradwatch user list` shows them")
            token_id = secrets.token_hex(8)
            text = new_token_text(token_id)
            _, secret = split_token(text) or ("", "")
            session.add(
                Token(
                    id=token_id,
                    user=user,
                    scopes=" ".join(scopes),
                    digest=_digest(secret),
                    job_id=job_id,
                    created_at=at,
                    revoked_at=None,
                )
            )
        return text

    def users(self) -> list[tuple[User, list[Token]]]:
        """Every user with their people's tokens (job tokens left out), oldest first."""
        with self._read() as session:
            users = list(session.scalars(select(User).order_by(User.created_at, User.name)))
            tokens = list(session.scalars(select(Token).where(Token.job_id.is_(None)).order_by(Token.created_at)))
        return [(u, [t for t in tokens if t.user == u.name]) for u in users]

    def revoke_user(self, name: str, *, now: float | None = None) -> int:
        """Revoke a user and every token they hold (not their running jobs' own); returns how many."""
        at = time.time() if now is None else now
        with self._write() as session:
            user = session.get(User, name)
            if user is None:
                raise UserNotFound(f"no user {name!r}: `gradwatch user list` shows them")
            user.revoked_at = user.revoked_at or at
            tokens = list(
                session.scalars(
                    select(Token).where(Token.user == name, Token.revoked_at.is_(None), Token.job_id.is_(None))
                )
            )
            for token in tokens:
                token.revoked_at = at
        return len(tokens)

    def has_tokens(self) -> bool:
        with self._read() as session:
            return session.scalar(select(Token.id).where(Token.revoked_at.is_(None)).limit(1)) is not None

    def authenticate(self, text: str) -> Token | None:
        """The live token `text` is, or None (unknown, wrong secret, revoked, or its job ended)."""
        parts = split_token(text)
        if parts is None:
            return None
        token_id, secret = parts
        with self._read() as session:
            token = session.get(Token, token_id)
            if token is None or not secrets.compare_digest(token.digest, _digest(secret)):
                return None
            if token.revoked_at is not None:
                return None
            if token.job_id is not None:
                job = session.get(Job, token.job_id)
                return token if job is not None and job.state not in TERMINAL_STATES else None
            user = session.get(User, token.user)
            return token if user is not None and user.revoked_at is None else None

    # ---------------------------------------------------------------- alerts
    def ingest_alerts(self, updates: Iterable[AlertUpdate], *, now: float | None = None, batch: int = 100) -> Ingested:
        """Store firing/resolved alerts; one row per alert: its fingerprint, labels and startsAt.

        An update changes a stored alert only when it carries the same labels (a known fingerprint
        with other labels is another sender's forgery, or a collision) and is not older than what
        is stored: a resolved alert stays resolved (Prometheus gives an alert that fires again a new
        startsAt, so a `firing` for a resolved row is a replay), and a resolution is moved only to a
        later endsAt. Updates refused so are counted, never stored.

        At most `batch` alerts per write transaction, so a large notification never holds the
        store's write lock for long. Text longer than its column is clipped and NUL bytes replaced
        (PostgreSQL refuses both); the label and annotation maps keep everything.
        """
        items = list(updates)
        total = Ingested(0, 0, 0)
        for start in range(0, len(items), batch):
            done = self._ingest_batch(items[start : start + batch], now)
            total = Ingested(*(a + b for a, b in zip(total, done, strict=True)))
        return total

    def _ingest_batch(self, updates: list[AlertUpdate], now: float | None) -> Ingested:
        at = time.time() if now is None else now
        items = [_fit_alert(item) for item in updates]
        for attempt in range(_INGEST_ATTEMPTS):
            try:
                return self._ingest(items, at)
            except IntegrityError:
                # Another writer stored one of these alerts first (PostgreSQL writers do not queue
                # for one lock as SQLite's do); a second pass finds its row and updates it.
                if attempt == _INGEST_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _ingest(self, items: list[AlertUpdate], at: float) -> Ingested:
        new = updated = refused = 0
        with self._write() as session:
            for item in items:
                row = session.scalars(
                    select(Alert).where(Alert.fingerprint == item.fingerprint, Alert.starts_at == item.starts_at)
                ).first()
                if row is None:
                    session.add(
                        Alert(
                            job_id=_clip(item.labels.get("job_id"), 64),
                            alertname=_clip(item.labels.get("alertname", "unnamed"), 200),
                            severity=_clip(item.labels.get("severity"), 32),
                            status=item.status,
                            starts_at=item.starts_at,
                            ends_at=item.ends_at,
                            summary=_clip(item.annotations.get("summary")),
                            description=_clip(item.annotations.get("description")),
                            fingerprint=item.fingerprint,
                            labels=item.labels,
                            annotations=item.annotations,
                            generator_url=_clip(item.generator_url),
                            received_at=at,
                            updated_at=at,
                        )
                    )
                    session.flush()  # a repeat inside the same notification must find this row
                    new += 1
                elif row.labels != item.labels or _older(item, row):
                    refused += 1
                elif (row.status, row.ends_at, row.annotations) != (
                    item.status,
                    item.ends_at,
                    item.annotations,
                ):
                    row.status, row.ends_at, row.annotations = item.status, item.ends_at, item.annotations
                    row.summary = _clip(item.annotations.get("summary"))
                    row.description = _clip(item.annotations.get("description"))
                    row.updated_at = at
                    updated += 1
        return Ingested(new, updated, refused)

    def list_alerts(
        self,
        *,
        job_id: str | None = None,
        status: str | None = None,
        limit: int = 100,
        since_id: int | None = None,
        owner: str | None = None,
    ) -> list[Alert]:
        """Newest first; `since_id` keeps only alerts stored after that row, `owner` only alerts about
        that user's jobs (an alert naming no stored job belongs to nobody)."""
        if _has_nul(job_id, status, owner):
            return []  # stored text holds none (see _clip)
        query = select(Alert)
        if owner is not None:
            query = query.where(Alert.job_id.in_(select(Job.id).where(Job.owner == owner)))
        if job_id:
            query = query.where(Alert.job_id == job_id)
        if status:
            query = query.where(Alert.status == status)
        if since_id is not None:
            query = query.where(Alert.id > since_id)
        query = query.order_by(Alert.received_at.desc(), Alert.id.desc()).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))


_INGEST_ATTEMPTS = 5


class Ingested(NamedTuple):
    """What one notification did: alerts stored anew, stored ones changed, and updates refused
    (another alert's labels under a known fingerprint, or older than the stored alert)."""

    new: int
    updated: int
    refused: int


def _older(item: AlertUpdate, row: Alert) -> bool:
    """Whether `item` is older news than the stored `row` of the same alert: a `firing` once it was
    resolved, or a resolution before the stored one's endsAt."""
    if row.status != "resolved":
        return False
    if item.status == "firing":
        return True
    return row.ends_at is not None and (item.ends_at is None or item.ends_at < row.ends_at)


def _clip(text: str | None, limit: int | None = None) -> str | None:
    """Text a column takes on every backend: no NUL byte, at most `limit` characters."""
    if text is None:
        return None
    text = text.replace("\x00", "\ufffd")
    return text[:limit] if limit is not None else text


def _has_nul(*texts: str | None) -> bool:
    return any(text is not None and "\x00" in text for text in texts)


def _fit_alert(item: AlertUpdate) -> AlertUpdate:
    """The same alert with NUL bytes replaced in every string (PostgreSQL stores none)."""

    def clean(mapping: dict[str, str]) -> dict[str, str]:
        return {str(_clip(k)): str(_clip(v)) for k, v in mapping.items()}

    return AlertUpdate(
        fingerprint=str(_clip(item.fingerprint, 64)),
        status=item.status,
        starts_at=item.starts_at,
        ends_at=item.ends_at,
        labels=clean(item.labels),
        annotations=clean(item.annotations),
        generator_url=_clip(item.generator_url),
    )


def fingerprint_of(labels: dict[str, str]) -> str:
    """Alertmanager sends a fingerprint; this stands in when a sender does not."""
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _strict_json(value: Any) -> str:
    """JSON that PostgreSQL accepts: a NaN or infinite loss (a real training outcome) becomes its name."""
    return json.dumps(_finite(value), allow_nan=False)


def _digest(secret: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 cannot be brute-forced, no slow hash needed.
    return hashlib.sha256(secret.encode()).hexdigest()


def _check_queue_caps(session: Session, owner: str | None, per_owner: int | None, total: int | None) -> None:
    if total is not None:
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0
        if queued >= total:
            raise QueueFull(
                f"the queue is full ({queued} jobs queued, the server's limit is {total}): "
                "try again when some have started"
            )
    if per_owner is not None and owner is not None:
        mine = (
            session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued", Job.owner == owner)) or 0
        )
        if mine >= per_owner:
            raise QueueFull(
                f"{owner} already has {mine} jobs queued, the limit per user: wait for some to start, "
                "or cancel some (`gradwatch jobs --state queued`)"
            )


def _make_engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, json_serializer=_strict_json)
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Tokens' hashes and everyone's jobs: readable by the service's user only (SQLite gives
        # its -wal and -shm files the database file's mode).
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(path, 0o600)
        except OSError:
            pass  # not ours to change (or read-only): SQLite reports what it cannot open
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN, so writes can take the lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes can fail with SQLITE_BUSY without
        # waiting; IMMEDIATE takes the write lock first and waits its turn (busy_timeout).
        write = connection.get_execution_options().get("gw_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _check_columns(engine: Engine, url: str) -> None:
    """Refuse a store whose tables an older gradwatch made (create_all adds tables, never columns)."""
    found = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in found.get_columns(table.name)}
        missing = [c.name for c in table.columns if c.name not in have]
        if missing:
            where = engine.url.render_as_string(hide_password=True)
            raise StoreError(
                f"the store at {where} was made by another gradwatch version: its {table.name} table lacks "
                f"{', '.join(missing)}. Point GRADWATCH_DATABASE_URL at a new database, or move this one aside"
            )


def _job_for_update(session: Session, job_id: str) -> Job:
    """The job, locked for the rest of this write; JobNotFound when there is none."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    return job
