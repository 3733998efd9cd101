"""Drivers report to the service over HTTP: status, progress, endpoints, events and the result.

No shared disk is needed between the service and the Ray nodes. Each job's driver gets a token
that is good for that one job only (an HMAC of the job id under a secret kept in the data dir): it
opens the push routes of its own job and nothing else; every other route keeps asking for the
service's token. `require_job_token` is the routes' only auth check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from service.store import Store

SECRET_FILE = "driver-push.key"
KEEP_EVENTS = 200  # the newest events a job's status keeps

_bearer = HTTPBearer(auto_error=False, description="The job's driver token (GRADWATCH_PUSH_TOKEN).")


def load_secret(data_dir: Path) -> bytes:
    """The service's signing secret for driver tokens; made once, readable by the service's user only."""
    path = data_dir / SECRET_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret.hex())
    return secret


def job_token(secret: bytes, job_id: str) -> str:
    """The driver token of one job."""
    return "gwj_" + hmac.new(secret, f"driver:{job_id}".encode(), hashlib.sha256).hexdigest()


def require_job_token(
    request: Request,
    job_id: str,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let in the driver of `job_id` only: its own token, never another job's nor the service's."""
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: a driver sends its job's token (GRADWATCH_PUSH_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = job_token(request.app.state.push_secret, job_id)
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(403, f"this token is not the driver token of job {job_id}")


class ProgressIn(BaseModel):
    """What a driver sends about every second: its status.json and the events since the last push."""

    status: dict[str, Any]
    events: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)


class ResultIn(BaseModel):
    """What a driver sends once at the end: its result.json."""

    result: dict[str, Any]


class PushOut(BaseModel):
    state: str
    stop_requested: str | None = None


router = APIRouter(prefix="/v1/jobs", tags=["drivers"], dependencies=[Depends(require_job_token)])


def _store(request: Request) -> Store:
    return request.app.state.store


@router.post("/{job_id}/progress", response_model=PushOut, responses={409: {}})
async def push_progress(job_id: str, body: ProgressIn, request: Request) -> PushOut:
    """A running job's driver reports its status (step, losses, phase, endpoints, nodes) and events."""
    job = await run_in_threadpool(_store(request).push_progress, job_id, body.status, body.events, None,
                                  KEEP_EVENTS)
    return PushOut(state=job.state, stop_requested=job.stop_requested)


@router.post("/{job_id}/result", response_model=PushOut, responses={409: {}})
async def push_result(job_id: str, body: ResultIn, request: Request) -> PushOut:
    """The driver's result at the end of the job; the state follows when Ray reports the job ended."""
    job = await run_in_threadpool(_store(request).push_progress, job_id, None, [], body.result, KEEP_EVENTS)
    return PushOut(state=job.state, stop_requested=job.stop_requested)
