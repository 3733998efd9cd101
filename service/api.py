"""The HTTP API: jobs, logs, Prometheus targets, the Alertmanager webhook, metrics and health.

Handlers are thin: validation is the spec module's, state is the store's, Ray is the launcher's.
Every route but /healthz and /metrics needs the bearer token.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gradwatch.names import DEFAULT_RAY_DASHBOARD, JOB_STATES
from gradwatch.spec import JobSpec, SpecError, load_spec
from gradwatch.status import target_groups
from service.launcher import Cluster, Launcher, RayCluster, ray_token
from service.models import (
    AlertmanagerWebhook,
    AlertOut,
    AlertsPage,
    ErrorOut,
    IngestOut,
    JobDetail,
    JobOut,
    JobsPage,
    SpecErrorsOut,
    State,
    TargetGroup,
    parse_time,
    run_status,
)
from service.settings import Settings
from service.store import (
    AlertUpdate,
    BadCursor,
    JobNotFound,
    Store,
    TransitionRefused,
    fingerprint_of,
)

# --------------------------------------------------------------------- auth
_bearer = HTTPBearer(auto_error=False, description="The token `gradwatch up` prints (GRADWATCH_TOKEN).")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    expected = request.app.state.settings.token
    if not expected:
        return  # loopback-only service started without a token (settings.check_bind allows no other)
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send the header 'Authorization: Bearer <token>' "
            "(the token `gradwatch up` printed; the CLI and SDK read GRADWATCH_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(
            401,
            "invalid bearer token: it does not match this server's GRADWATCH_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_launcher(request: Request) -> Launcher:
    return request.app.state.launcher


StoreDep = Annotated[Store, Depends(get_store)]
LauncherDep = Annotated[Launcher, Depends(get_launcher)]
AUTH = [Depends(require_token)]
ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}}


# --------------------------------------------------------------------- jobs
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=AUTH, responses=ERRORS)

_SPEC_BODY = {
    "required": True,
    "description": "A job spec as JSON or YAML (`gradwatch schema` prints its JSON schema).",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
        "application/yaml": {"schema": {"type": "string"}},
    },
}


@jobs.post(
    "",
    status_code=201,
    response_model=JobDetail,
    openapi_extra={"requestBody": _SPEC_BODY},
    responses={413: {"model": ErrorOut}, 422: {"model": SpecErrorsOut}},
)
async def submit_job(request: Request, store: StoreDep, launcher: LauncherDep) -> JobDetail:
    """Validate a spec and queue the job; a bad spec is refused with every error and nothing is stored."""
    body = await request.body()
    user_code = "skip" if request.app.state.settings.allow_user_code else "deny"
    try:
        # "skip": user code is imported where it runs (the Ray workers), never in the service.
        spec = load_spec(body, user_code=user_code)
    except SpecError as exc:
        return JSONResponse(
            status_code=422, content={"detail": "the job spec is not valid", "errors": exc.errors}
        )
    job = await run_in_threadpool(store.create_job, spec)
    launcher.wake()
    transitions = await run_in_threadpool(store.transitions, job.id)
    return JobDetail.full(job, transitions, [])


@jobs.get("", response_model=JobsPage)
def list_jobs(
    store: StoreDep,
    state: Annotated[list[State] | None, Query(description="Repeat for several states.")] = None,
    name: Annotated[str | None, Query(max_length=63)] = None,
    label: Annotated[
        list[str] | None, Query(description="`key=value`, e.g. team=vision; repeat to require several.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    cursor: Annotated[str | None, Query(max_length=200, description="From next_cursor.")] = None,
) -> JobsPage:
    """Jobs, newest first, filtered by state, name and labels."""
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _query_error("label", f"write key=value, e.g. team=vision (got {item!r})")
        labels[key] = value
    page, next_cursor = store.list_jobs(
        state=state, name=name, labels=labels, limit=limit, offset=offset, cursor=cursor
    )
    return JobsPage(data=[JobOut.of(job) for job in page], next_cursor=next_cursor)


@jobs.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: str, store: StoreDep) -> JobDetail:
    """Spec, state and why, timestamps, progress, worker endpoints, transitions and alerts."""
    job = store.get_job(job_id)
    return JobDetail.full(job, store.transitions(job_id), store.list_alerts(job_id=job_id, limit=100))


@jobs.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def job_logs(
    job_id: str, request: Request, store: StoreDep, launcher: LauncherDep, follow: bool = False
) -> Response:
    """The driver's output; `follow=true` streams it until the job ends."""
    job = await run_in_threadpool(store.get_job, job_id)
    if not follow:
        return PlainTextResponse(await run_in_threadpool(launcher.logs, job))
    interval = request.app.state.settings.poll_interval
    return StreamingResponse(
        _follow_logs(job_id, store, launcher, interval), media_type="text/plain; charset=utf-8"
    )


async def _follow_logs(job_id: str, store: Store, launcher: Launcher, interval: float) -> AsyncIterator[str]:
    sent = 0
    while True:
        job = await run_in_threadpool(store.get_job, job_id)
        # Read the state before the text: once a job has ended its saved log is complete.
        text = await run_in_threadpool(launcher.logs, job)
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
        if job.terminal:
            return
        await asyncio.sleep(interval)


@jobs.post("/{job_id}/cancel", response_model=JobOut, responses={409: {"model": ErrorOut}})
def cancel_job(job_id: str, launcher: LauncherDep) -> JobOut:
    """A queued job ends cancelled at once; a running one is stopped (`stopping` until Ray confirms)."""
    return JobOut.of(launcher.cancel(job_id))


# ------------------------------------------------------------------ targets
targets = APIRouter(tags=["prometheus"], dependencies=AUTH, responses=ERRORS)


@targets.get("/v1/targets", response_model=list[TargetGroup])
def prometheus_targets(store: StoreDep) -> list[TargetGroup]:
    """Prometheus HTTP service discovery: the live worker endpoints of running jobs."""
    groups = []
    for job in store.jobs_in("running"):
        status = run_status(job)
        if status is not None:
            groups += [TargetGroup.model_validate(g) for g in target_groups(job.id, status.endpoints)]
    return groups


# ------------------------------------------------------------------- alerts
alerts = APIRouter(prefix="/v1/alerts", tags=["alerts"], dependencies=AUTH, responses=ERRORS)


@alerts.post("", response_model=IngestOut, responses={413: {"model": ErrorOut}})
def receive_alerts(payload: AlertmanagerWebhook, store: StoreDep) -> IngestOut:
    """Alertmanager's webhook (v4): store each alert firing or resolved, once per fingerprint+startsAt."""
    updates = []
    for alert in payload.alerts:
        starts_at = parse_time(alert.startsAt)
        assert starts_at is not None  # validated by AmAlert
        updates.append(
            AlertUpdate(
                fingerprint=alert.fingerprint or fingerprint_of(alert.labels),
                status=alert.status,
                starts_at=starts_at,
                ends_at=parse_time(alert.endsAt) if alert.status == "resolved" else None,
                labels=alert.labels,
                annotations=alert.annotations,
                generator_url=alert.generatorURL,
            )
        )
    new, updated = store.ingest_alerts(updates)
    return IngestOut(received=len(updates), new=new, updated=updated)


@alerts.get("", response_model=AlertsPage)
def list_alerts(
    store: StoreDep,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(pattern="^(firing|resolved)$")] = None,
    since_id: Annotated[
        int | None, Query(ge=0, le=2**62, description="Only alerts stored after this id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertsPage:
    """Alerts, newest first."""
    rows = store.list_alerts(job_id=job_id, status=status, since_id=since_id, limit=limit)
    return AlertsPage(data=[AlertOut.of(a) for a in rows])


# --------------------------------------------------------- metrics, health
class JobStateCollector(Collector):
    """gradwatch_jobs and gradwatch_job_state, read from the store at scrape time."""

    def __init__(self, store: Store, keep_ended_s: float):
        self.store = store
        self.keep_ended_s = keep_ended_s

    def collect(self):  # type: ignore[override]
        jobs_by_state = GaugeMetricFamily("gradwatch_jobs", "Jobs in the store by state.", labels=["state"])
        for state, n in self.store.count_by_state().items():
            jobs_by_state.add_metric([state], n)
        yield jobs_by_state
        current = GaugeMetricFamily(
            "gradwatch_job_state",
            "1 for a job's current state and 0 for the others, for jobs not ended or ended in the "
            "last minutes (long enough for a job-failed alert to fire).",
            labels=["job_id", "state"],
        )
        # Every state, 0 or 1, so a state change flips values instead of leaving a stale series.
        for job_id, state in self.store.current_states(time.time() - self.keep_ended_s):
            for each in JOB_STATES:
                current.add_metric([job_id, each], 1 if each == state else 0)
        yield current


class RequestMetrics:
    """API request count and latency by route template, method and status code (pure ASGI)."""

    def __init__(self, app: Any, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter(
            "gradwatch_api_requests_total",
            "API requests served.",
            ["route", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "gradwatch_api_request_duration_seconds",
            "Time to the start of the API's response.",
            ["route", "method"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        code = 500

        async def record(message: Any) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
                route = getattr(scope.get("route"), "path", "unmatched")
                self.latency.labels(route, scope["method"]).observe(time.perf_counter() - start)
                self.requests.labels(route, scope["method"], str(code)).inc()
            await send(message)

        await self.app(scope, receive, record)


class BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(413, _too_large_text(limit))


class BodyLimit:
    """413 for request bodies over the limit, announced (Content-Length) or streamed."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await JSONResponse({"detail": "Content-Length is not a number"}, 400)(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await _too_large(self.max_bytes)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _too_large_text(limit: int) -> str:
    return f"request body over the {limit} byte limit of this server"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_text(limit)}, 413)


def _query_error(name: str, reason: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", name), "msg": reason, "type": "value_error"}])


def _error_lines(errors: Any) -> list[str]:
    lines = []
    for item in errors:
        loc = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "<request>"
        lines.append(f"{loc}: {str(item.get('msg', 'invalid')).removeprefix('Value error, ')}")
    return lines


# ------------------------------------------------------------------ the app
def create_app(
    settings: Settings | None = None, *, cluster: Cluster | None = None, store: Store | None = None
) -> FastAPI:
    """The service: store, launcher (its scheduler runs while the app does) and API."""
    settings = settings or Settings()
    store = store or Store(settings.database_url)
    if cluster is None:
        cluster = RayCluster(settings.ray_address or DEFAULT_RAY_DASHBOARD, ray_token(settings))
    launcher = Launcher(store, settings, cluster)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.scheduler_enabled:
            launcher.start()
        try:
            yield
        finally:
            launcher.shutdown()

    app = FastAPI(
        title="gradwatch",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit distributed PyTorch training jobs to Ray and watch how they train.",
    )
    app.state.settings, app.state.store, app.state.launcher = settings, store, launcher
    registry = CollectorRegistry()
    registry.register(JobStateCollector(store, settings.terminal_metric_seconds))
    app.state.registry = registry

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc.job_id!r}: `gradwatch jobs` lists the jobs"}, 404)

    @app.exception_handler(TransitionRefused)
    async def _refused(_: Request, exc: TransitionRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409)

    @app.exception_handler(BadCursor)
    async def _bad_cursor(_: Request, exc: BadCursor) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": [f"query.cursor: {exc}"]}, 422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "the request is not valid", "errors": _error_lines(exc.errors())}, 422)

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness, without a token."""
        return {
            "status": "ok",
            "scheduler": "running"
            if launcher.running
            else ("stopped" if settings.scheduler_enabled else "paused"),
        }

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus metrics of the service, without a token."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    for router in (jobs, targets, alerts):
        app.include_router(router)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, registry=registry)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            spec_schema = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(spec_schema.pop("$defs", {}))
            components["JobSpec"] = spec_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
