"""Drivers report to the service over HTTP: status, progress, endpoints, events and the result.

No shared disk is needed between the service and the Ray nodes. Each job's driver gets the token
minted for that job at launch (scope job:progress, good for that one job only, see service/auth.py):
it opens the push routes of its own job and nothing else. The routes take their auth check as an
argument (`router_for`), so this module depends on no particular token scheme.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from gradwatch.status import RunResult, RunStatus
from service.store import Store

KEEP_EVENTS = 200  # the newest events a job's status keeps


class ProgressIn(BaseModel):
    """What a driver sends about every second: its status.json and the events since the last push."""

    status: RunStatus
    events: list[dict[str, Any]] = Field(default_factory=list, max_length=10_000)


class ResultIn(BaseModel):
    """What a driver sends once at the end: its result.json."""

    result: RunResult


class PushOut(BaseModel):
    state: str
    stop_requested: str | None = None


def _store(request: Request) -> Store:
    return request.app.state.store


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _read(request: Request, model: type[BaseModel]) -> Any:
    """The body, read only after the route's token check passed (FastAPI would parse it first)."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def router_for(reporter: Callable[..., Any]) -> APIRouter:
    """The push routes, each guarded by `reporter`: a dependency that lets in job {job_id}'s driver."""
    router = APIRouter(prefix="/v1/jobs", tags=["drivers"], dependencies=[Depends(reporter)])

    @router.post(
        "/{job_id}/progress", response_model=PushOut, responses={409: {}}, openapi_extra=_body_schema(ProgressIn)
    )
    async def push_progress(job_id: str, request: Request) -> PushOut:
        """A running job's driver reports its status (step, losses, phase, endpoints, nodes) and events."""
        body = await _read(request, ProgressIn)
        job = await run_in_threadpool(
            _store(request).push_progress, job_id, body.status, body.events, None, KEEP_EVENTS
        )
        return PushOut(state=job.state, stop_requested=job.stop_requested)

    @router.post("/{job_id}/result", response_model=PushOut, responses={409: {}}, openapi_extra=_body_schema(ResultIn))
    async def push_result(job_id: str, request: Request) -> PushOut:
        """The driver's result at the end of the job; the state follows when Ray reports the job ended."""
        body = await _read(request, ResultIn)
        job = await run_in_threadpool(_store(request).push_progress, job_id, None, [], body.result, KEEP_EVENTS)
        return PushOut(state=job.state, stop_requested=job.stop_requested)

    return router
