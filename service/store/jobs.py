"""The jobs aggregate: submitting under queue caps, reading and listing (cursors, label filters), the
state machine and its recorded transitions, drivers' progress reports, stop requests, counts.

Terminal states are final: a transition out of one is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from typing import Any

from sqlalchemy import and_, func, or_, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, defer

from gradwatch.ids import new_job_id
from gradwatch.names import JOB_STATES, TERMINAL_STATES, JobState
from gradwatch.spec import JobSpec
from gradwatch.status import RunResult, RunStatus
from service.store.engine import Database, has_nul
from service.store.errors import BadCursor, JobNotFound, QueueFull, StoreError, TransitionRefused
from service.store.tables import Job, JobLabel, Transition

ALLOWED: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": TERMINAL_STATES,
}


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


class Jobs:
    """Thread-safe access to the jobs, their labels and transitions. Jobs it returns are detached snapshots."""

    def __init__(self, db: Database):
        self._db = db

    def create(
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
                with self._db.write() as session:
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

    def get(self, job_id: str) -> Job:
        with self._db.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job

    def listing(
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
        if has_nul(name, *(labels or {}).keys(), *(labels or {}).values()):
            return [], None  # no stored text holds a NUL (see has_nul)
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
        with self._db.read() as session:
            jobs = list(session.scalars(query))
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return jobs, (encode_cursor(jobs[-1]) if more and jobs else None)

    def _rarest_first(self, labels: dict[str, str]) -> list[tuple[str, str]]:
        """Labels by how few jobs carry them (counted on the label index), so a scan ends soonest."""
        items = list(labels.items())
        if len(items) < 2:
            return items
        with self._db.read() as session:
            counts = {
                (k, v): session.scalar(
                    select(func.count()).where(JobLabel.key == k, JobLabel.value == v).select_from(JobLabel)
                )
                or 0
                for k, v in items
            }
        return sorted(items, key=lambda item: counts[item])

    def in_states(self, *states: str) -> list[Job]:
        """Jobs in these states, in scheduling order: priority (high first), then first come."""
        query = select(Job).where(Job.state.in_(states)).order_by(Job.priority.desc(), Job.created_at, Job.id)
        with self._db.read() as session:
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
        with self._db.write() as session:
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

    def update(self, job_id: str, **fields: Any) -> Job:
        """Change bookkeeping fields (the driver's status, reason, world size); never the state."""
        if "state" in fields:
            raise ValueError("use transition() to change a job's state")
        with self._db.write() as session:
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
        with self._db.write() as session:
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
        with self._db.write() as session:
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
        with self._db.read() as session:
            return list(session.scalars(select(Transition).where(Transition.job_id == job_id).order_by(Transition.id)))

    def count_by_state(self) -> dict[str, int]:
        with self._db.read() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        counts: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        counts.update({state: n for state, n in rows})
        return counts

    def current_states(self, ended_since: float) -> list[tuple[str, str]]:
        """(job id, state) of every job not ended, or ended after `ended_since`."""
        query = select(Job.id, Job.state).where(or_(Job.state.in_(("queued", "running")), Job.ended_at >= ended_since))
        with self._db.read() as session:
            return [(job_id, state) for job_id, state in session.execute(query).all()]


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


def _job_for_update(session: Session, job_id: str) -> Job:
    """The job, locked for the rest of this write; JobNotFound when there is none."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    return job
