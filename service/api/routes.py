"""The HTTP API: jobs, logs, reports, Prometheus targets, the Alertmanager webhook, metrics and health.

Handlers are thin: validation is the spec module's, state is the store's, Ray is the launcher's.
Every route but /healthz and /openapi.json needs a bearer token with the route's scope
(service/auth.py); requests a web page could forge (a foreign Host or Origin, a cross-site
fetch, a body that is neither JSON nor YAML) are refused before any route sees them.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError, WithJsonSchema

from gradwatch.names import DEFAULT_RAY_DASHBOARD, JOB_STATES
from gradwatch.spec import SpecError, load_spec
from gradwatch.status import target_groups
from service.api.models import (
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
)
from service.api.openapi import allowed_methods
from service.api.openapi import document as openapi_document
from service.auth import Authenticator, Principal
from service.scheduler import push
from service.scheduler.launcher import Cluster, ClusterUnavailable, Launcher, RayCluster
from service.scheduler.local_ray import ray_token
from service.settings import Settings, check_bind
from service.store.alerts import AlertUpdate, fingerprint_of
from service.store.errors import BadCursor, JobNotFound, QueueFull, TransitionRefused
from service.store.jobs import CURSOR
from service.store.store import Store
from service.store.tables import Job

BODY_TYPES = frozenset({"application/json", "application/yaml", "application/x-yaml", "text/yaml"})
MAX_LABEL_FILTERS = 16  # as many as a job can carry
LOG_CHUNK_BYTES = 256 * 1024  # the most a log stream sends at once

# --------------------------------------------------------------------- auth
_bearer = HTTPBearer(
    auto_error=False,
    description="A user's token (`gradwatch user add`), or the operator's that `gradwatch up` prints.",
)


def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None:
        raise HTTPException(
            401,
            "missing bearer token: send the header 'Authorization: Bearer <token>' "
            "(your token from `gradwatch user add`, or the one `gradwatch up` printed; "
            "the CLI and SDK read GRADWATCH_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = request.app.state.auth.verify(credentials.credentials)
    if principal is None:
        raise HTTPException(
            401,
            "invalid bearer token: this server does not know it, or it was revoked",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal


def need(*scopes: str) -> Any:
    """A dependency: the caller, when their token holds one of `scopes`; 403 otherwise."""

    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if any(principal.can(scope) for scope in scopes):
            return principal
        held = ", ".join(sorted(principal.scopes)) or "none"
        raise HTTPException(
            403,
            f"the token of {principal.user} lacks scope {' or '.join(scopes)} (it has {held}): "
            f"an admin can give you one with `gradwatch user add NAME --scope {scopes[0]}`",
        )

    return Depends(check)


def require_job_token(job_id: str, principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
    """For a job's own progress route: the token minted for that job at launch (or an admin's)."""
    if principal.admin or (principal.job_id == job_id and principal.can("job:progress")):
        return principal
    raise HTTPException(403, f"only job {job_id}'s own token (given to its driver at launch) may report its progress")


def json_or_yaml(request: Request) -> None:
    """415 for a body that is neither JSON nor YAML: a form or text/plain is what a web page can send
    without a CORS preflight. Listed after the scope check, so a token without the scope gets 403."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in BODY_TYPES and not kind.endswith("+json"):
        raise HTTPException(
            415,
            f"a body of type {kind or 'unknown'!r} is not accepted: send JSON (Content-Type: "
            "application/json) or YAML (application/yaml)",
        )


JsonOrYaml = Annotated[None, Depends(json_or_yaml)]
Reader = Annotated[Principal, need("read")]
Submitter = Annotated[Principal, need("submit")]
JobReporter = Annotated[Principal, Depends(require_job_token)]


def visible_job(store: Store, job_id: str, reader: Principal) -> Job:
    """The job, when the caller may see it (their own, or any with read-all); JobNotFound (404, as
    for a job that does not exist) otherwise, so another user's job ids do not leak."""
    job = store.jobs.get(job_id)
    if not reader.sees(job.owner):
        raise JobNotFound(job_id)
    return job


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_launcher(request: Request) -> Launcher:
    return request.app.state.launcher


StoreDep = Annotated[Store, Depends(get_store)]
LauncherDep = Annotated[Launcher, Depends(get_launcher)]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut},
    403: {"model": ErrorOut},
    404: {"model": ErrorOut},
}


# --------------------------------------------------------------------- jobs
jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

_SPEC_BODY = {
    "required": True,
    "description": "A job spec as JSON or YAML (`gradwatch schema` prints its JSON schema).",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
        "application/yaml": {"schema": {"$ref": "#/components/schemas/JobSpec"}},
    },
}


@jobs.post(
    "",
    status_code=201,
    response_model=JobDetail,
    openapi_extra={"requestBody": _SPEC_BODY},
    responses={
        413: {"model": ErrorOut},
        415: {"model": ErrorOut},
        422: {"model": SpecErrorsOut},
        429: {"model": ErrorOut},
    },
)
async def submit_job(
    request: Request, store: StoreDep, launcher: LauncherDep, user: Submitter, _: JsonOrYaml
) -> JobDetail | JSONResponse:
    """Validate a spec and queue the job as the token's user; a bad spec is refused with every error
    and nothing is stored."""
    settings: Settings = request.app.state.settings
    body = await request.body()
    try:
        # Off the event loop: a large spec takes a while to parse. "skip": user code is imported
        # where it runs (the Ray workers), never in the service.
        spec = await run_in_threadpool(
            load_spec,
            body,
            user_code="skip" if settings.allow_user_code else "deny",
            data_roots=[str(root) for root in settings.data_root_paths],
            worker_memory_bytes=settings.worker_memory_bytes,
        )
    except SpecError as exc:
        return _spec_errors(exc.errors)
    if spec.owner is not None and spec.owner != user.user:
        return _spec_errors(
            [
                f"owner: a job belongs to the user of the token that submits it ({user.user}); "
                f"leave owner out (got {spec.owner!r})"
            ]
        )
    if spec.priority > settings.max_priority and not user.admin:
        raise HTTPException(
            403,
            f"priority {spec.priority} is above this server's ceiling of {settings.max_priority} for "
            "non-admins: lower it, or ask an admin to submit the job",
        )
    unfit = await run_in_threadpool(launcher.unfit, spec)
    if unfit is not None:
        return _spec_errors([unfit])
    try:
        job = await run_in_threadpool(
            store.jobs.create,
            spec,
            owner=user.user,
            max_queued_per_owner=settings.max_queued_per_user,
            max_queued=settings.max_queued_jobs,
        )
    except QueueFull as exc:
        raise HTTPException(429, str(exc)) from None
    launcher.wake()
    transitions = await run_in_threadpool(store.jobs.transitions, job.id)
    return JobDetail.full(job, transitions, [])


def _spec_errors(errors: list[str]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": "the job spec is not valid", "errors": errors})


@jobs.get("", response_model=JobsPage)
def list_jobs(
    store: StoreDep,
    reader: Reader,
    state: Annotated[list[State] | None, Query(description="Repeat for several states.")] = None,
    name: Annotated[str | None, Query(max_length=63)] = None,
    label: Annotated[
        list[Annotated[str, WithJsonSchema({"type": "string", "pattern": "^[^=]+="})]] | None,
        Query(
            description="`key=value`, e.g. team=vision; repeat to require several.",
            json_schema_extra={"maxItems": MAX_LABEL_FILTERS},
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    cursor: Annotated[
        str | None, Query(max_length=200, description="From next_cursor.", json_schema_extra={"pattern": CURSOR})
    ] = None,
) -> JobsPage:
    """Jobs, newest first, filtered by state, name and labels: the caller's own (every user's with
    scope read-all)."""
    if len(label or []) > MAX_LABEL_FILTERS:
        raise _query_error("label", f"at most {MAX_LABEL_FILTERS} label filters (got {len(label or [])})")
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _query_error("label", f"write key=value, e.g. team=vision (got {item!r})")
        labels[key] = value
    page, next_cursor = store.jobs.listing(
        state=state,
        name=name,
        labels=labels,
        limit=limit,
        offset=offset,
        cursor=cursor,
        owner=None if reader.reads_all else reader.user,
    )
    return JobsPage(data=[JobOut.of(job) for job in page], next_cursor=next_cursor)


@jobs.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: str, store: StoreDep, reader: Reader) -> JobDetail:
    """Spec, state and why, timestamps, progress, worker endpoints, transitions and alerts."""
    job = visible_job(store, job_id, reader)
    return JobDetail.full(job, store.jobs.transitions(job_id), store.alerts.listing(job_id=job_id, limit=100))


@jobs.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, 429: {"model": ErrorOut}},
)
async def job_logs(
    job_id: str, request: Request, store: StoreDep, launcher: LauncherDep, reader: Reader, follow: bool = False
) -> Response:
    """The driver's output; `follow=true` streams it until the job ends (only new bytes each time)."""
    job = await run_in_threadpool(visible_job, store, job_id, reader)
    if not follow:
        return PlainTextResponse(await run_in_threadpool(launcher.logs, job))
    followers: LogFollowers = request.app.state.log_followers
    refused = followers.refusal(reader.user)
    if refused is not None:
        raise HTTPException(429, refused)
    followers.open(reader.user)
    stream = _follow_logs(job_id, store, launcher, request.app.state, lambda: followers.close(reader.user))
    return StreamingResponse(stream, media_type="text/plain; charset=utf-8")


class LogFollowers:
    """Open `logs?follow=true` streams, of everyone and per user: each user has a share, so one
    reader's streams never lock the others out. Touched on the event loop only."""

    def __init__(self, settings: Settings):
        self.settings = settings  # its limits read at each open
        self.of: dict[str, int] = {}

    @property
    def open_streams(self) -> int:
        return sum(self.of.values())

    def refusal(self, user: str) -> str | None:
        """Why one more stream for `user` is refused (the 429's text), or None."""
        mine, everyone = self.of.get(user, 0), self.open_streams
        if mine >= self.settings.max_log_followers_per_user:
            return (
                f"{user} has {mine} log streams open, the limit per user "
                "(max_log_followers_per_user): close one, or read without follow"
            )
        if everyone >= self.settings.max_log_followers:
            return f"{everyone} log streams are open, this server's limit (max_log_followers): try again later"
        return None

    def open(self, user: str) -> None:
        self.of[user] = self.of.get(user, 0) + 1

    def close(self, user: str) -> None:
        left = self.of.get(user, 0) - 1
        if left > 0:
            self.of[user] = left
        else:
            self.of.pop(user, None)


async def _follow_logs(
    job_id: str, store: Store, launcher: Launcher, state: Any, closed: Callable[[], None]
) -> AsyncIterator[str]:
    sent = 0
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # chunks may split a character
    try:
        while True:
            job = await run_in_threadpool(store.jobs.get, job_id)
            # Read the state before the text: once a job has ended its saved log is complete.
            while True:
                chunk = await run_in_threadpool(launcher.log_bytes, job, sent, LOG_CHUNK_BYTES)
                sent += len(chunk)
                if chunk:
                    yield decoder.decode(chunk)
                if len(chunk) < LOG_CHUNK_BYTES:
                    break
            if job.terminal:
                yield decoder.decode(b"", final=True)
                return
            await asyncio.sleep(state.settings.poll_interval)
    finally:
        closed()


@jobs.get(
    "/{job_id}/report",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}}, 501: {"model": ErrorOut}},
)
async def job_report(job_id: str, request: Request, store: StoreDep, reader: Reader) -> Response:
    """The run's report: one self-contained HTML page of its dynamics, built now (live while the job runs)."""
    from service.report.report import ReportError, report_for_job, response_headers  # numpy and plotly only when asked

    job = await run_in_threadpool(visible_job, store, job_id, reader)
    try:
        page = await run_in_threadpool(report_for_job, job, request.app.state.settings.runs_dir)
    except ReportError as exc:
        raise HTTPException(501, str(exc)) from None
    return HTMLResponse(page, headers=response_headers())  # its CSP, nosniff, no framing, no caching


@jobs.post("/{job_id}/cancel", response_model=JobOut, responses={409: {"model": ErrorOut}, 403: {"model": ErrorOut}})
def cancel_job(job_id: str, store: StoreDep, launcher: LauncherDep, user: Submitter) -> JobOut:
    """A queued job ends cancelled at once; a running one is stopped (`stopping` until Ray confirms).
    Only the job's owner or an admin may cancel it."""
    job = visible_job(store, job_id, user)
    if not user.admin and job.owner != user.user:
        raise HTTPException(
            403, f"job {job_id} belongs to {job.owner or 'nobody'}: only its owner or an admin may cancel it"
        )
    return JobOut.of(launcher.cancel(job_id))


# ------------------------------------------------------------------ targets
targets = APIRouter(tags=["prometheus"], responses=ERRORS)


@targets.get("/v1/targets", response_model=list[TargetGroup])
def prometheus_targets(
    request: Request, store: StoreDep, _: Annotated[Principal, need("targets:read")]
) -> list[TargetGroup]:
    """Prometheus HTTP service discovery: the live worker endpoints of running jobs, those on a Ray node
    of the job's own workers with a port in 1024-65535 only (whatever a status file says)."""
    hosts: push.WorkerHosts = request.app.state.worker_hosts
    groups = []
    for job in store.jobs.in_states("running"):
        status = job.last_status()
        if status is None or not status.endpoints:
            continue
        try:
            allowed = hosts.of(job, {push.host_of(e) for e in status.endpoints})
        except ClusterUnavailable:
            allowed = hosts.known(job)  # Ray cannot be asked now: what it said last
        groups += target_groups(job.id, push.servable(status.endpoints, allowed))
    return [TargetGroup.model_validate(group) for group in groups]


# ------------------------------------------------------------------- alerts
alerts = APIRouter(prefix="/v1/alerts", tags=["alerts"], responses=ERRORS)


@alerts.post(
    "",
    response_model=IngestOut,
    responses={413: {"model": ErrorOut}, 415: {"model": ErrorOut}, 422: {"model": SpecErrorsOut}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AlertmanagerWebhook"}}},
        }
    },
)
async def receive_alerts(
    request: Request, store: StoreDep, _: Annotated[Principal, need("alerts:write")], __: JsonOrYaml
) -> IngestOut:
    """Alertmanager's webhook (v4): store each alert firing or resolved, once per fingerprint, labels and
    startsAt; an update with other labels than the stored alert's, or older than it (a `firing` replayed
    after its `resolved`), is counted as refused and changes nothing. Only a token with scope
    alerts:write (Alertmanager's) may send it; the body is read after that."""
    try:
        payload = AlertmanagerWebhook.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None
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
    done = await run_in_threadpool(store.alerts.ingest, updates)
    return IngestOut(received=len(updates), new=done.new, updated=done.updated, refused=done.refused)


@alerts.get("", response_model=AlertsPage)
def list_alerts(
    store: StoreDep,
    reader: Reader,
    job_id: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(pattern="^(firing|resolved)$")] = None,
    since_id: Annotated[int | None, Query(ge=0, le=2**62, description="Only alerts stored after this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertsPage:
    """Alerts, newest first: about the caller's own jobs (every alert with scope read-all)."""
    rows = store.alerts.listing(
        job_id=job_id,
        status=status,
        since_id=since_id,
        limit=limit,
        owner=None if reader.reads_all else reader.user,
    )
    return AlertsPage(data=[AlertOut.of(a) for a in rows])


# --------------------------------------------------------- metrics, health
class JobStateCollector(Collector):
    """gradwatch_jobs and gradwatch_job_state, read from the store at scrape time."""

    def __init__(self, store: Store, keep_ended_s: float):
        self.store = store
        self.keep_ended_s = keep_ended_s

    def collect(self) -> Iterator[Metric]:
        jobs_by_state = GaugeMetricFamily("gradwatch_jobs", "Jobs in the store by state.", labels=["state"])
        for state, n in self.store.jobs.count_by_state().items():
            jobs_by_state.add_metric([state], n)
        yield jobs_by_state
        current = GaugeMetricFamily(
            "gradwatch_job_state",
            "1 for a job's current state and 0 for the others, for jobs not ended or ended in the "
            "last minutes (long enough for a job-failed alert to fire).",
            labels=["job_id", "state"],
        )
        # Every state, 0 or 1, so a state change flips values instead of leaving a stale series.
        for job_id, state in self.store.jobs.current_states(time.time() - self.keep_ended_s):
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


class RequestGuard:
    """Refuses what a web page in a browser could send: a Host this server does not answer to (DNS
    rebinding) and a cross-site request (Sec-Fetch-Site, Origin). Pure ASGI, before any route runs;
    routes that read a body also refuse any but JSON and YAML (`json_or_yaml`)."""

    def __init__(self, app: Any, host_names: frozenset[str]):
        self.app = app
        self.host_names = host_names

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            code, detail = refusal
            await JSONResponse({"detail": detail}, code)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Any) -> tuple[int, str] | None:
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key.lower(), value)
        host = headers.get(b"host", b"").decode("latin-1")
        if "*" not in self.host_names and _host_name(host) not in self.host_names:
            return 403, (
                f"Host {host[:100]!r} is not a name this server answers to ({', '.join(sorted(self.host_names))}): "
                "the operator can add it to GRADWATCH_ALLOWED_HOSTS"
            )
        site = headers.get(b"sec-fetch-site")
        if site is not None and site not in (b"same-origin", b"none"):
            return 403, f"cross-site request refused (Sec-Fetch-Site: {site.decode('latin-1')[:40]})"
        origin = headers.get(b"origin")
        if origin is not None and urlsplit(origin.decode("latin-1")).netloc.lower() != host.lower():
            return 403, f"cross-origin request refused (Origin {origin.decode('latin-1')[:100]!r})"
        return None


def _host_name(host: str) -> str:
    """`name:port`, `[::1]:port` or `name` -> the name, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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
    """The service: store, launcher (its scheduler runs while the app does) and API.

    However it is launched (`gradwatch up`, `uvicorn --factory`, a test), it refuses to start
    without a token to check or on an address no allowed Host name reaches.
    """
    settings = settings or Settings()
    check_bind(settings)
    _private_data_dir(settings)
    store = store or Store(settings.database_url)
    auth = _authenticator(settings, store)
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

    app = _App(
        title="gradwatch",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit distributed PyTorch training jobs to Ray and watch how they train.",
        docs_url=None,  # the docs pages load scripts from a CDN; /openapi.json is the reference
        redoc_url=None,
    )
    app.state.settings, app.state.store, app.state.launcher = settings, store, launcher
    app.state.auth = auth
    app.state.worker_hosts = push.WorkerHosts(cluster)
    app.state.log_followers = LogFollowers(settings)
    registry = CollectorRegistry()
    registry.register(JobStateCollector(store, settings.terminal_metric_seconds))
    app.state.registry = registry
    _error_handlers(app)
    _meta_routes(app, launcher, settings, registry)
    for router in (jobs, targets, alerts):
        app.include_router(router)
    # Drivers push their job's progress and result with the token minted for that job at launch.
    app.include_router(push.router_for(require_job_token))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestGuard, host_names=settings.host_names)
    app.add_middleware(RequestMetrics, registry=registry)
    return app


def _private_data_dir(settings: Settings) -> None:
    """The store, tokens and logs: readable by the service's user only."""
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.chmod(settings.data_dir, 0o700)
    except OSError:
        pass


def _authenticator(settings: Settings, store: Store) -> Authenticator:
    """The token check; the service refuses to start with no token to check against."""
    auth = Authenticator(settings, store)
    if not auth.configured():
        raise RuntimeError(
            "refusing to start without authentication: set GRADWATCH_TOKEN (or GRADWATCH_TOKEN_FILE), "
            f"or put a token in {settings.token_file_of('admin')} (`gradwatch up` makes one), "
            "or add a user with `gradwatch user add`"
        )
    return auth


def _error_handlers(app: FastAPI) -> None:
    """The store's refusals and invalid requests as their HTTP answers, each with a body saying why."""

    @app.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no job {exc.job_id!r}: `gradwatch jobs` lists the jobs"}, 404)

    @app.exception_handler(TransitionRefused)
    async def _refused(_: Request, exc: TransitionRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409)

    @app.exception_handler(BadCursor)
    async def _bad_cursor(_: Request, exc: BadCursor) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": [f"query.cursor: {exc}"]}, 422)

    @app.exception_handler(405)
    async def _not_allowed(request: Request, _: Exception) -> JSONResponse:
        # Starlette's Allow names the methods of the first route that fits the path; a path has several.
        allowed = allowed_methods(app.openapi(), request.url.path)
        detail = f"{request.method} is not a method of {request.url.path}: use {' or '.join(allowed)}"
        return JSONResponse({"detail": detail}, 405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "the request is not valid", "errors": _error_lines(exc.errors())}, 422)


def _meta_routes(app: FastAPI, launcher: Launcher, settings: Settings, registry: CollectorRegistry) -> None:
    """/healthz (no token) and the service's own /metrics."""

    @app.get("/healthz", tags=["meta"])
    def healthz() -> dict[str, str]:
        """Liveness, without a token."""
        return {
            "status": "ok",
            "scheduler": "running" if launcher.running else ("stopped" if settings.scheduler_enabled else "paused"),
        }

    @app.get("/metrics", tags=["meta"], response_class=PlainTextResponse, responses=ERRORS)
    def metrics(_: Annotated[Principal, need("targets:read", "read-all")]) -> Response:
        """Prometheus metrics of the service, every job's state among them (Prometheus' token, or a
        token with read-all)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _App(FastAPI):
    """The service's app: its OpenAPI document is service/api/openapi.py's, for the settings it runs with."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = openapi_document(self, self.state.settings)
        return self.openapi_schema
