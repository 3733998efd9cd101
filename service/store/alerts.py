"""The alerts aggregate: what Alertmanager posts, one row per alert (its fingerprint and startsAt),
stored in bounded batches, never rewritten by a forged or stale update, and listed per job or owner."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gradwatch.names import AlertStatus
from service.store.engine import Database, has_nul
from service.store.tables import Alert, Job


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


class Ingested(NamedTuple):
    """What one notification did: alerts stored anew, stored ones changed, and updates refused
    (another alert's labels under a known fingerprint, or older than the stored alert)."""

    new: int
    updated: int
    refused: int


_INGEST_ATTEMPTS = 5


class Alerts:
    """Thread-safe access to the stored alerts. Rows it returns are detached snapshots."""

    def __init__(self, db: Database):
        self._db = db

    def ingest(self, updates: Iterable[AlertUpdate], *, now: float | None = None, batch: int = 100) -> Ingested:
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
        with self._db.write() as session:
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

    def listing(
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
        if has_nul(job_id, status, owner):
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
        with self._db.read() as session:
            return list(session.scalars(query))


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
