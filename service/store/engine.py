"""The store's database: the engine (SQLite pragmas and locking, or any SQLAlchemy URL), the tables
made and checked on open, and the sessions every aggregate reads and writes through.

SQLite by default (WAL, a busy timeout and `BEGIN IMMEDIATE` writes, so concurrent threads queue for the
write lock instead of failing); PostgreSQL or any other SQLAlchemy URL by setting.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.store.errors import StoreError
from service.store.tables import Base


class Database:
    """One engine with the store's tables, and its sessions: reads, and writes that take the write lock
    up front. Objects read or written through it are detached snapshots (nothing expires on commit)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        Base.metadata.create_all(self.engine)
        check_columns(self.engine)
        self.read = sessionmaker(self.engine, expire_on_commit=False)
        self._write_session = sessionmaker(self.engine.execution_options(gw_write=True), expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        with self._write_session() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()


def has_nul(*texts: str | None) -> bool:
    """Whether any text holds a NUL byte, which no stored text does (PostgreSQL refuses to store or
    compare one), so a filter with one matches nothing."""
    return any(text is not None and "\x00" in text for text in texts)


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


def make_engine(url: str) -> Engine:
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


def check_columns(engine: Engine) -> None:
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
