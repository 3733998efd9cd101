"""Drivers report to the service over HTTP: status, progress, endpoints, events and the result.

No shared disk is needed between the service and the Ray nodes. Each job's driver gets the token
minted for that job at launch (scope job:progress, good for that one job only, see service/auth.py):
it opens the push routes of its own job and nothing else. The routes take their auth check as an
argument (`router_for`), so this module depends on no particular token scheme.

Whoever holds a job's token (its driver, and user code when the server runs it) is trusted with
that job's numbers, never with where Prometheus scrapes: a pushed `/metrics` endpoint must name the
address of a Ray node the job's own workers run on (asked of Ray, never taken from the push) and a
port in `ENDPOINT_PORTS`. A push breaking that, naming another job, or holding a string over its
bound is refused with 422 naming the field, and the refusal is kept as one of the job's events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from gradwatch.status import Endpoint, RunResult, RunStatus
from service.scheduler.launcher import Cluster, ClusterUnavailable
from service.store.errors import JobNotFound, TransitionRefused
from service.store.store import Store
from service.store.tables import Job

KEEP_EVENTS = 200  # the newest events a job's status keeps
MAX_EVENTS = 1000  # events in one push (a driver pushes about every second)
MAX_ENDPOINTS = 4096  # one per rank: the largest world size a spec allows
MAX_TEXT = 8192  # characters in any string of a push (an error with its traceback's tail fits)
MAX_KEY = 256  # characters in any key of a push's maps
ENDPOINT_PORTS = (1024, 65535)  # a worker's /metrics port: never a privileged one
HOSTS_REFRESH_S = 1.0  # Ray is asked again about a job's nodes at most this often


class ProgressIn(BaseModel):
    """What a driver sends about every second: its status.json and the events since the last push."""

    status: RunStatus
    events: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_EVENTS)


class ResultIn(BaseModel):
    """What a driver sends once at the end: its result.json."""

    result: RunResult


class PushOut(BaseModel):
    state: str
    stop_requested: str | None = None


# ------------------------------------------------------------ worker hosts
class WorkerHosts:
    """The addresses of the Ray nodes each job's workers run on, asked of the cluster and kept per
    job; asked again (at most every `HOSTS_REFRESH_S`) when a host is not among them, so a worker
    group restarted on other nodes is found and a flood of bad hosts costs Ray one query a second."""

    MAX_JOBS = 4096

    def __init__(self, cluster: Cluster, refresh_s: float = HOSTS_REFRESH_S):
        self.cluster, self.refresh_s = cluster, refresh_s
        self._hosts: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def known(self, job: Job) -> frozenset[str]:
        """What was last found for the job, without asking Ray."""
        with self._lock:
            return self._hosts.get(job.id, (0.0, frozenset()))[1]

    def of(self, job: Job, wanted: set[str]) -> frozenset[str]:
        """The job's worker hosts, fresh from the cluster when `wanted` holds one not known yet.
        ClusterUnavailable when Ray must be asked and cannot be."""
        with self._lock:
            at, hosts = self._hosts.get(job.id, (0.0, frozenset()))
        if wanted <= hosts or time.monotonic() - at < self.refresh_s:
            return hosts
        worker_hosts = getattr(self.cluster, "worker_hosts", None)
        found = frozenset(worker_hosts(job.ray_submission_id or job.id)) if worker_hosts else frozenset()
        with self._lock:
            if len(self._hosts) >= self.MAX_JOBS:
                self._hosts.pop(next(iter(self._hosts)))
            self._hosts[job.id] = (time.monotonic(), found)
        return found

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._hosts.pop(job_id, None)


def host_of(endpoint: Endpoint) -> str:
    return endpoint.host.strip("[]").lower()


def endpoint_problems(endpoints: list[Endpoint], hosts: frozenset[str] | None) -> list[tuple[tuple[Any, ...], str]]:
    """(field path, reason) for each endpoint Prometheus must not be pointed at; hosts None when
    the job's nodes cannot be known now (only the ports are judged)."""
    low, high = ENDPOINT_PORTS
    problems: list[tuple[tuple[Any, ...], str]] = []
    for i, endpoint in enumerate(endpoints):
        if hosts is not None and host_of(endpoint) not in hosts:
            where = ", ".join(sorted(hosts)) or "none found yet"
            problems.append(
                (
                    ("status", "endpoints", i, "host"),
                    f"{endpoint.host[:100]!r} is not the address of a Ray node this job's workers run on "
                    f"({where}): a worker reports its own node's address",
                )
            )
        if not low <= endpoint.port <= high:
            problems.append((("status", "endpoints", i, "port"), f"port {endpoint.port} is outside {low}-{high}"))
    return problems


def servable(endpoints: list[Endpoint], hosts: frozenset[str]) -> list[Endpoint]:
    """The endpoints Prometheus may scrape: on the job's own nodes, on an unprivileged port."""
    low, high = ENDPOINT_PORTS
    return [e for e in endpoints if host_of(e) in hosts and low <= e.port <= high]


# ---------------------------------------------------------------- bounds
def _strings(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str, int]]:
    """(path, "key" or "value", length) of every string in a parsed body."""
    if isinstance(value, str):
        yield path, "value", len(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield (*path, str(key)[:40]), "key", len(str(key))
            yield from _strings(item, (*path, str(key)[:40]))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


def bound_problems(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    problems = []
    for path, kind, length in _strings(body, ()):
        limit = MAX_KEY if kind == "key" else MAX_TEXT
        if length > limit:
            what = "a key of" if kind == "key" else "a text of"
            problems.append((path, f"{what} {length} characters, over the {limit} limit of a push"))
        if len(problems) >= 20:
            break
    return problems


def _refuse(problems: list[tuple[tuple[Any, ...], str]]) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": "value_error"} for loc, msg in problems])


# ---------------------------------------------------------------- routes
def _store(request: Request) -> Store:
    return request.app.state.store


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


async def _read(request: Request, model: type[BaseModel]) -> Any:
    """The body, read only after the route's token check passed (FastAPI would parse it first)."""
    try:
        # strict: a JSON true is no pid, 1.5 no step (the published schema's types, as written)
        body = model.model_validate_json(await request.body(), strict=True)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
    problems = bound_problems(body.model_dump(mode="json"))
    if problems:
        raise _refuse(problems)
    return body


def _same_job(job_id: str, field: str, given: str) -> None:
    if given != job_id:
        raise _refuse([((field, "job_id"), f"a push to job {job_id} carries that job's id only (got {given[:64]!r})")])


def _check_endpoints(store: Store, hosts: WorkerHosts, job_id: str, status: RunStatus) -> None:
    """Refuse (422, and an event of the job) endpoints off the job's nodes or on a bad port."""
    if not status.endpoints:
        return
    if len(status.endpoints) > MAX_ENDPOINTS:
        raise _refuse(
            [
                (
                    ("status", "endpoints"),
                    f"{len(status.endpoints)} endpoints, over one per rank of the largest job ({MAX_ENDPOINTS})",
                )
            ]
        )
    job = store.jobs.get(job_id)
    try:
        allowed: frozenset[str] | None = hosts.of(job, {host_of(e) for e in status.endpoints})
    except ClusterUnavailable:
        # Ray cannot say where the workers run now: the push is kept, its ports checked, and
        # /v1/targets serves none of these endpoints until a later push finds their nodes.
        allowed = None
    problems = endpoint_problems(status.endpoints, allowed)
    if not problems:
        return
    detail = "; ".join(f"{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg in problems)[:MAX_TEXT]
    event = {"kind": "refused", "name": "endpoints", "step": status.step, "raised": True, "detail": detail}
    try:
        store.jobs.push_progress(job_id, None, [event], None, KEEP_EVENTS)
    except (JobNotFound, TransitionRefused):
        pass  # ended meanwhile: the push is refused all the same
    raise _refuse(problems)


def router_for(reporter: Callable[..., Any]) -> APIRouter:
    """The push routes, each guarded by `reporter`: a dependency that lets in job {job_id}'s driver."""
    router = APIRouter(prefix="/v1/jobs", tags=["drivers"], dependencies=[Depends(reporter)])
    refusals: dict[int | str, dict[str, Any]] = {409: {}}

    @router.post(
        "/{job_id}/progress", response_model=PushOut, responses=refusals, openapi_extra=_body_schema(ProgressIn)
    )
    async def push_progress(job_id: str, request: Request) -> PushOut:
        """A running job's driver reports its status (step, losses, phase, endpoints, nodes) and events.
        `status.job_id` must be the route's job id; its endpoints must be on the Ray nodes of the job's
        workers, with a port in 1024-65535 (422 otherwise)."""
        body = await _read(request, ProgressIn)
        _same_job(job_id, "status", body.status.job_id)
        store = _store(request)
        await run_in_threadpool(_check_endpoints, store, request.app.state.worker_hosts, job_id, body.status)
        job = await run_in_threadpool(store.jobs.push_progress, job_id, body.status, body.events, None, KEEP_EVENTS)
        return PushOut(state=job.state, stop_requested=job.stop_requested)

    @router.post("/{job_id}/result", response_model=PushOut, responses=refusals, openapi_extra=_body_schema(ResultIn))
    async def push_result(job_id: str, request: Request) -> PushOut:
        """The driver's result at the end of the job; the state follows when Ray reports the job ended.
        `result.job_id` must be the route's job id (422 otherwise)."""
        body = await _read(request, ResultIn)
        _same_job(job_id, "result", body.result.job_id)
        job = await run_in_threadpool(_store(request).jobs.push_progress, job_id, None, [], body.result, KEEP_EVENTS)
        return PushOut(state=job.state, stop_requested=job.stop_requested)

    return router
