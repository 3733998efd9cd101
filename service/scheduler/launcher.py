"""Start, watch and stop jobs on Ray.

One Ray job per gradwatch job: its entrypoint is `python -m workers.driver`,
which runs Ray Train on the cluster, pushes its status to the API about every
second (service/scheduler/push.py) and rewrites `<storage>/<job id>/status.json` as a
local artifact. A scheduler thread starts queued jobs when the cluster has
room (priority, then first come), follows running ones through Ray's job status
and the pushed status (the one status path: status.json is never read here), enforces
timeouts, carries out cancels, and on service start picks up the jobs the store
says are running. The result comes by push too; result.json is read only where the
push could not be delivered (the service unreachable for the driver's whole retry
window at the end, workers/push.py) and the run folder is shared.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from gradwatch.names import RAY_TRAIN_ENV
from gradwatch.spec import DATA_ROOTS_ENV, JobSpec, SpecError, format_duration, load_spec, overran
from gradwatch.status import RunResult, read_result, write_atomic
from service.auth import JOB_TOKEN_FILE_ENV
from service.settings import Settings
from service.store.errors import JobNotFound, TransitionRefused
from service.store.jobs import demand_of
from service.store.store import Store
from service.store.tables import Job

log = logging.getLogger("gradwatch.launcher")

# Resource numbers from Ray's autoscaler report trail the cluster by a few seconds; a job
# whose workers just came up stays reserved this long so it is not counted free twice.
PLACED_GRACE_S = 10.0
RESTOP_INTERVAL_S = 5.0
# A job stored before specs carried max_queued waits as long as a new job does by default.
DEFAULT_MAX_QUEUED_S = JobSpec.model_fields["max_queued"].default
ACTIVE_RAY_STATES = ("PENDING", "RUNNING")
RAY_TIMEOUT_S = 10.0
# A cluster's first job submission starts Ray's job machinery: measured over 10 s on a busy 2-core host.
RAY_SUBMIT_TIMEOUT_S = 120.0
# How long a submit whose answer was lost may still land on Ray: watched (and stopped) that long.
ORPHAN_WATCH_S = 2 * RAY_SUBMIT_TIMEOUT_S


# -------------------------------------------------------------- the cluster
@dataclass(frozen=True)
class Resources:
    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpus - other.cpus, self.gpus - other.gpus)

    def fits_in(self, other: Resources) -> bool:
        return self.cpus <= other.cpus + 1e-9 and self.gpus <= other.gpus + 1e-9

    def __str__(self) -> str:
        parts = [_count(self.cpus, "CPU")]
        if self.gpus:
            parts.append(_count(self.gpus, "GPU"))
        return " and ".join(parts)


def _count(n: float, unit: str) -> str:
    n = max(n, 0.0)
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


@dataclass(frozen=True)
class RayJob:
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str | None = None


class ClusterUnavailable(Exception):
    """Ray could not be asked (down, unreachable, refused our token)."""


class Cluster(Protocol):
    """What the launcher needs from a Ray cluster."""

    def resources(self) -> tuple[Resources, Resources]:
        """(free, total)."""

    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str], env: dict[str, str]) -> None: ...

    def status(self, submission_id: str) -> RayJob | None:
        """None when Ray has no such job."""

    def stop(self, submission_id: str) -> None: ...

    def logs(self, submission_id: str) -> str: ...

    def live_workers(self, submission_id: str) -> int:
        """Ray Train worker actors of this job that are not dead yet."""

    def worker_hosts(self, submission_id: str) -> frozenset[str]:
        """The addresses of the Ray nodes this job's live Ray Train workers run on: the only hosts its
        pushed /metrics endpoints may name (service/scheduler/push.py)."""


class RayCluster:
    """A Ray cluster reached through its dashboard: the Jobs SDK plus the state and status endpoints."""

    def __init__(self, address: str, token: str | None = None):
        self.address = address.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.address, headers=self.headers, timeout=RAY_TIMEOUT_S)
        self._client: Any = None
        self._ray_job_ids: dict[str, str] = {}
        self._lock = threading.Lock()

    def _jobs(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient  # imports ray: only when used

                class _Client(JobSubmissionClient):
                    # The SDK sets no timeout: a draining dashboard would hang the scheduler.
                    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
                        slow = method == "POST" and endpoint == "/api/jobs/"
                        kwargs.setdefault("timeout", RAY_SUBMIT_TIMEOUT_S if slow else RAY_TIMEOUT_S)
                        return super()._do_request(method, endpoint, **kwargs)

                try:
                    self._client = _Client(self.address, headers=self.headers)
                except Exception as exc:
                    raise ClusterUnavailable(f"cannot reach Ray at {self.address}: {exc}") from None
            return self._client

    def connect(self) -> None:
        """Build the Jobs client now (it imports Ray: seconds on a busy host) rather than at the first submit."""
        self._jobs()

    def _get(self, path: str, **params: Any) -> Any:
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise ClusterUnavailable(f"cannot reach Ray at {self.address}: {exc}") from None
        if response.status_code in (401, 403):
            raise ClusterUnavailable(
                f"Ray at {self.address} refused our token ({response.text.strip()}): "
                "set RAY_AUTH_TOKEN or put the cluster's token in ~/.ray/auth_token"
            )
        if response.status_code != 200:
            raise ClusterUnavailable(f"Ray answered {path} with {response.status_code}: {response.text[:200]}")
        return response.json()

    def resources(self) -> tuple[Resources, Resources]:
        body = self._get("/api/cluster_status")
        report = ((body.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport") or {}
        usage = report.get("usage")
        if not usage or "CPU" not in usage:  # nodes still joining report memory before their CPUs
            raise ClusterUnavailable("Ray has not reported its resources yet")
        used_cpu, total_cpu = usage.get("CPU", [0.0, 0.0])
        used_gpu, total_gpu = usage.get("GPU", [0.0, 0.0])
        total = Resources(total_cpu, total_gpu)
        return total - Resources(used_cpu, used_gpu), total

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._jobs()
        try:
            return getattr(client, method)(*args, **kwargs)
        except RuntimeError as exc:
            if "status code 404" in str(exc) or "does not exist" in str(exc):
                raise LookupError(str(exc)) from None
            raise ClusterUnavailable(f"Ray {method} failed: {exc}") from None
        except Exception as exc:  # requests' connection errors and the like
            raise ClusterUnavailable(f"Ray {method} failed: {type(exc).__name__}: {exc}") from None

    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str], env: dict[str, str]) -> None:
        runtime_env = {"env_vars": env} if env else None
        self._call(
            "submit_job",
            entrypoint=entrypoint,
            submission_id=submission_id,
            metadata=metadata,
            runtime_env=runtime_env,
        )

    def status(self, submission_id: str) -> RayJob | None:
        try:
            info = self._call("get_job_info", submission_id)
        except LookupError:
            return None
        if info.job_id:
            self._ray_job_ids[submission_id] = info.job_id
        return RayJob(status=str(getattr(info.status, "value", info.status)), message=info.message)

    def stop(self, submission_id: str) -> None:
        try:
            self._call("stop_job", submission_id)
        except LookupError:
            pass

    def logs(self, submission_id: str) -> str:
        try:
            return self._call("get_job_logs", submission_id)
        except LookupError:
            return ""

    def live_workers(self, submission_id: str) -> int:
        ray_job_id = self._ray_job_ids.get(submission_id)
        if ray_job_id is None:
            self.status(submission_id)
            ray_job_id = self._ray_job_ids.get(submission_id)
        if ray_job_id is None:
            return 0  # the driver never started, so no worker did
        body = self._get(
            "/api/v0/actors",
            filter_keys=["job_id", "class_name", "state"],
            filter_predicates=["=", "=", "!="],
            filter_values=[ray_job_id, "RayTrainWorker", "DEAD"],
            limit=1000,
        )
        return len(((body.get("data") or {}).get("result") or {}).get("result") or [])

    def worker_hosts(self, submission_id: str) -> frozenset[str]:
        ray_job_id = self._ray_job_ids.get(submission_id)
        if ray_job_id is None:
            self.status(submission_id)
            ray_job_id = self._ray_job_ids.get(submission_id)
        if ray_job_id is None:
            return frozenset()
        actors = self._get(
            "/api/v0/actors",
            filter_keys=["job_id", "class_name", "state"],
            filter_predicates=["=", "=", "="],
            filter_values=[ray_job_id, "RayTrainWorker", "ALIVE"],
            limit=1000,
        )
        node_ids = {a.get("node_id") for a in ((actors.get("data") or {}).get("result") or {}).get("result") or []}
        if not node_ids - {None}:
            return frozenset()
        nodes = self._get("/api/v0/nodes", filter_keys=["state"], filter_predicates=["="], filter_values=["ALIVE"])
        found = ((nodes.get("data") or {}).get("result") or {}).get("result") or []
        return frozenset(n["node_ip"] for n in found if n.get("node_id") in node_ids and n.get("node_ip"))


# ---------------------------------------------------------------- launcher
class Launcher:
    """Schedules queued jobs onto Ray and follows them to the end."""

    def __init__(self, store: Store, settings: Settings, cluster: Cluster):
        self.store = store
        self.settings = settings
        self.cluster = cluster
        self._placed_at: dict[str, float] = {}
        self._stop_sent_at: dict[str, float] = {}
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self._log_lock = threading.Lock()
        self._log_cache: dict[str, tuple[float, bytes]] = {}
        # Submissions whose answer was lost and whose job was marked failed: stopped on every pass
        # should they land after all (submission id -> when first seen).
        self._orphans: dict[str, float] = {}

    # ----------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gradwatch-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Run a scheduler pass now (after a submit or a cancel) rather than at the next tick."""
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        connect = getattr(self.cluster, "connect", None)
        if connect is not None:  # so the first job does not wait for it
            try:
                connect()
            except ClusterUnavailable:
                pass  # the first submit tries again
        # The first pass is the reconciliation: jobs the store says are running are looked up in Ray.
        while not self._stop_event.is_set():
            try:
                self.tick()
            except Exception:  # keep scheduling whatever one pass hit
                log.exception("scheduler pass failed")
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    def tick(self) -> None:
        """One pass: follow running jobs, then start queued ones that fit."""
        with self._tick_lock:
            for job in self.store.jobs.in_states("running"):
                try:
                    self._follow(job)
                except (JobNotFound, TransitionRefused):
                    continue
            self._stop_orphans()
            self._start_queued()

    def _stop_orphans(self) -> None:
        now = time.time()
        for sid, since in list(self._orphans.items()):
            try:
                ray_job = self.cluster.status(sid)
            except ClusterUnavailable:
                continue
            if ray_job is not None and ray_job.status in ACTIVE_RAY_STATES:
                log.warning("stopping %s: its submit was reported failed but it landed on Ray", sid)
                self._stop_orphan(sid)
            elif ray_job is not None or now - since > ORPHAN_WATCH_S:
                self._orphans.pop(sid, None)  # ended, or never landed

    def _stop_orphan(self, sid: str) -> None:
        try:
            self.cluster.stop(sid)
        except ClusterUnavailable as exc:  # the next pass sends it again
            log.warning("could not stop %s yet: %s", sid, exc)

    # -------------------------------------------------------------- cancel
    def cancel(self, job_id: str, reason: str = "cancelled on request") -> Job:
        """End a queued job now; ask Ray to stop a running one (the state follows when it stopped)."""
        job, needs_stop = self.store.jobs.request_stop(job_id, "cancel", reason)
        if needs_stop:
            self._send_stop(job)
        self.wake()
        return job

    def _send_stop(self, job: Job) -> None:
        if not job.ray_submission_id:
            return
        self._stop_sent_at[job.id] = time.time()
        try:
            self.cluster.stop(job.ray_submission_id)
        except ClusterUnavailable as exc:  # the next pass sends it again
            log.warning("could not stop %s yet: %s", job.id, exc)

    # ---------------------------------------------------------------- logs
    def logs(self, job: Job) -> str:
        """The driver's output so far: the saved copy once the job ended, else Ray's."""
        saved = self.settings.jobs_dir / job.id / "driver.log"
        if saved.exists():
            return saved.read_text(errors="replace")
        if not job.ray_submission_id:
            return ""
        try:
            return self.cluster.logs(job.ray_submission_id)
        except ClusterUnavailable:
            return ""

    def log_bytes(self, job: Job, offset: int, limit: int) -> bytes:
        """At most `limit` bytes of the driver's output from `offset` on: the saved copy read from
        there once the job ended; while it runs, Ray's log fetched at most once a poll interval
        for all followers of the job together."""
        saved = self.settings.jobs_dir / job.id / "driver.log"
        if saved.exists():
            with open(saved, "rb") as f:
                f.seek(offset)
                return f.read(limit)
        if not job.ray_submission_id:
            return b""
        with self._log_lock:
            at, text = self._log_cache.get(job.id, (0.0, b""))
            if time.monotonic() - at >= self.settings.poll_interval:
                try:
                    text = self.cluster.logs(job.ray_submission_id).encode()
                except ClusterUnavailable:
                    pass
                self._log_cache[job.id] = (time.monotonic(), text)
        return text[offset : offset + limit]

    # ------------------------------------------------------------ following
    def _result(self, job: Job) -> RunResult | None:
        """The driver's result as it pushed it; else, where the run folder is shared, the result.json it
        wrote when the push could not be delivered (the driver logs that it could not)."""
        return job.final_result() or read_result(self.settings.runs_dir / job.id)

    def _follow(self, job: Job) -> None:
        now = time.time()
        status = job.last_status()  # the driver's last push, with its world size: nothing to copy
        if status is not None and (status.endpoints or (status.step or 0) > 0):
            self._placed_at.setdefault(job.id, now)
        sid = job.ray_submission_id or job.id
        try:
            ray_job = self.cluster.status(sid)
        except ClusterUnavailable as exc:
            log.warning("cannot check %s: %s", job.id, exc)
            return
        if ray_job is None:
            self._finish(
                job,
                "failed",
                f"Ray has no job {sid}: the Ray cluster was restarted, or the "
                "service stopped before it submitted the job",
            )
            return
        if ray_job.status in ACTIVE_RAY_STATES:
            self._enforce(job, now)
            return
        self._conclude(job, ray_job, now)

    def _enforce(self, job: Job, now: float) -> None:
        if job.stop_requested:
            if now - self._stop_sent_at.get(job.id, 0.0) > RESTOP_INTERVAL_S:
                self._send_stop(job)
            return
        reason = overran(job.spec.get("timeout"), now - (job.started_at or now))
        if reason is not None:
            job, needs_stop = self.store.jobs.request_stop(job.id, "timeout", reason)
            if needs_stop:
                self._send_stop(job)

    def _conclude(self, job: Job, ray_job: RayJob, now: float) -> None:
        job = self.store.jobs.get(job.id)  # a result pushed since this pass began
        result = self._result(job)
        ended = result.state if result is not None else None
        finished_ok = ray_job.status == "SUCCEEDED" and ended in (None, "succeeded")
        if job.stop_requested and not finished_ok:
            left = self._live_workers(job)
            waited = now - (job.stop_requested_at or now)
            if left and waited < self.settings.stop_grace_seconds:
                return  # the next pass looks again
            state = "cancelled" if job.stop_requested == "cancel" else "timed_out"
            reason = (job.reason or "").removeprefix("stopping: ") or state
            if left:
                reason += f" ({left} Ray Train workers still alive {waited:.0f} s after the stop)"
        elif finished_ok:
            state, reason = "succeeded", result.summary() if result is not None else "finished"
        elif ray_job.status == "STOPPED" or ended == "cancelled":
            state, reason = "cancelled", "stopped outside gradwatch (e.g. `ray job stop`)"
        elif ended == "timed_out":
            state, reason = "timed_out", (result.error if result else None) or "the driver's timeout ended it"
        else:
            state, reason = "failed", (result.error if result else None) or self._crash_reason(job, ray_job)
        self._finish(job, state, reason, result)

    def _crash_reason(self, job: Job, ray_job: RayJob) -> str:
        """No result.json: the driver died. Ray's first line (exit code) and the driver's last words."""
        head = (ray_job.message or "the driver failed without a message").strip().splitlines()[0].rstrip(":")
        tail = _last_lines(self._ray_logs(job))
        return f"{head}; last output: {tail}" if tail else head

    def _finish(self, job: Job, state: str, reason: str, result: RunResult | None = None) -> None:
        self._save_logs(job)
        fields: dict[str, Any] = {}
        status = self.store.jobs.get(job.id).last_status()
        if status is not None:  # an ended job has no live endpoints and waits for nothing
            fields["run_status"] = status.model_copy(update={"endpoints": [], "waiting": None}).model_dump(mode="json")
        if result is not None:
            fields["world_size"] = result.world_size
        self.store.jobs.transition(job.id, state, reason[:4000], expect={"running"}, **fields)
        self._log_cache.pop(job.id, None)
        self._placed_at.pop(job.id, None)
        self._stop_sent_at.pop(job.id, None)
        log.info("job %s %s: %s", job.id, state, reason)

    def _live_workers(self, job: Job) -> int:
        try:
            return self.cluster.live_workers(job.ray_submission_id or job.id)
        except ClusterUnavailable:
            return 0

    def _ray_logs(self, job: Job) -> str:
        try:
            return self.cluster.logs(job.ray_submission_id or job.id)
        except ClusterUnavailable:
            return ""

    def _save_logs(self, job: Job) -> None:
        text = self._ray_logs(job)
        if text:
            path = self.settings.jobs_dir / job.id / "driver.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)

    # -------------------------------------------------------------- starting
    def demand(self, job: Job) -> Resources:
        return Resources(job.cpus + self.settings.job_overhead_cpus, job.gpus)

    def _start_queued(self) -> None:
        queued = self.store.jobs.in_states("queued")
        if not queued:
            return
        try:
            free, total = self.cluster.resources()
        except ClusterUnavailable as exc:
            for job in queued:
                self._note(job, f"waiting for the Ray cluster: {exc}")
            return
        now = time.time()
        for job in self.store.jobs.in_states("running"):
            placed = self._placed_at.get(job.id)
            if placed is None or now - placed < PLACED_GRACE_S:
                free = free - self.demand(job)  # submitted, its workers not (visibly) placed yet
        blocked_by: Job | None = None
        running_of: dict[str | None, int] = {}
        for job in self.store.jobs.in_states("running"):
            running_of[job.owner] = running_of.get(job.owner, 0) + 1
        cap = self.settings.max_running_per_user
        for job in queued:
            need = self.demand(job)
            if self._queued_too_long(job, now):
                continue
            if running_of.get(job.owner, 0) >= cap:
                self._note(job, f"waiting: {job.owner} already runs {cap} jobs, the limit per user")
            elif not need.fits_in(total):
                self._note(
                    job,
                    f"waiting for {need}; the cluster has {total} "
                    "(lower scaling.num_workers or resources per worker, or add nodes)",
                )
            elif blocked_by is not None:
                self._note(
                    job,
                    f"queued behind {blocked_by.id} (priority {blocked_by.priority}, submitted "
                    "earlier or more important)",
                )
            elif not need.fits_in(free):
                self._note(
                    job,
                    f"waiting for {need}; {Resources(max(free.cpus, 0), max(free.gpus, 0))} free of {total}",
                )
                blocked_by = job
            else:
                if self._launch(job):
                    free = free - need
                    running_of[job.owner] = running_of.get(job.owner, 0) + 1

    def _queued_too_long(self, job: Job, now: float) -> bool:
        """Ends a job queued past its spec's max_queued (failed, with what it waited for); True if so."""
        limit = job.spec.get("max_queued", DEFAULT_MAX_QUEUED_S)
        if limit is None or now - job.created_at <= limit:
            return False
        waited = f"; it was {job.reason}" if job.reason else ""
        try:
            self.store.jobs.transition(
                job.id,
                "failed",
                f"queued for {format_duration(round(now - job.created_at))}, over its max_queued of "
                f"{format_duration(limit)}{waited}"[:4000],
                expect={"queued"},
            )
        except (JobNotFound, TransitionRefused):
            return False  # cancelled or started meanwhile: that state stands
        return True

    def unfit(self, spec: JobSpec) -> str | None:
        """Why a job of this spec can never start on the cluster as it is (its demand exceeds all the
        cluster's resources), or None: it fits, or Ray has not said what it holds."""
        cpus, gpus = demand_of(spec)
        need = Resources(cpus + self.settings.job_overhead_cpus, gpus)
        try:
            _, total = self.cluster.resources()
        except ClusterUnavailable:
            return None  # judged again by the scheduler, which waits with the reason
        if need.fits_in(total):
            return None
        return (
            f"scaling: the job needs {need} (its workers and its driver) but the whole Ray cluster has {total}: "
            "lower scaling.num_workers or the resources per worker, or add nodes and submit again"
        )

    def _note(self, job: Job, reason: str) -> None:
        if job.reason != reason:
            try:
                self.store.jobs.update(job.id, reason=reason)
            except JobNotFound:
                pass

    def entrypoint(self, job: Job, spec_file: Path) -> str:
        parts = [
            self.settings.python,
            "-m",
            self.settings.driver_module,
            "--spec-file",
            str(spec_file),
            "--job-id",
            job.id,
            "--storage-path",
            self.settings.driver_storage,
        ]
        return shlex.join(parts)

    def _admissible(self, job: Job) -> str | None:
        """Why the server, as configured now, would not take this stored spec (user code turned off,
        a data root removed, workers' memory lowered since it was queued); None when it would."""
        try:
            load_spec(
                job.spec,
                user_code="skip" if self.settings.allow_user_code else "deny",
                data_roots=[str(r) for r in self.settings.data_root_paths],
                worker_memory_bytes=self.settings.worker_memory_bytes,
            )
        except SpecError as exc:
            return "; ".join(exc.errors)
        return None

    def job_environment(self, job: Job) -> dict[str, str]:
        """The variables a job's driver (and every actor of the job: Ray Train's controller, the workers)
        get: where its own token is, Ray Train's settings, and the data roots the workers check
        `data.path` against when user code is off."""
        token_file = self.settings.jobs_dir / job.id / "job.token"
        token = self.store.users.issue_token(job.owner or "admin", ["job:progress"], job_id=job.id)
        write_atomic(token_file, token + "\n", mode=0o600)
        env = {JOB_TOKEN_FILE_ENV: str(token_file), **RAY_TRAIN_ENV}
        # The driver needs no view of the service's disk either: the spec comes with it, and it pushes
        # its progress to the API (service/scheduler/push.py) with the token, sent along for nodes without the file.
        env.update(
            {
                "GRADWATCH_SPEC_JSON": json.dumps(job.spec),
                "GRADWATCH_PUSH_URL": self.settings.driver_url,
                "GRADWATCH_PUSH_TOKEN": token,
            }
        )
        if not self.settings.allow_user_code:
            env[DATA_ROOTS_ENV] = os.pathsep.join(str(r) for r in self.settings.data_root_paths)
        return env

    def _launch(self, job: Job) -> bool:
        refused = self._admissible(job)
        if refused is not None:
            try:
                self.store.jobs.transition(
                    job.id,
                    "failed",
                    f"this server no longer runs the job's spec: {refused}"[:4000],
                    expect={"queued"},
                )
            except TransitionRefused:
                pass
            return False
        spec_file = self.settings.jobs_dir / job.id / "spec.json"
        spec_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.settings.runs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(spec_file, json.dumps(job.spec, indent=2))
        # Running first, then submit: a crash in between leaves a running job Ray does not know,
        # which the next start marks failed; the other order could run a job twice.
        try:
            job = self.store.jobs.transition(
                job.id, "running", "submitted to Ray", expect={"queued"}, ray_submission_id=job.id
            )
        except TransitionRefused:
            return False  # cancelled meanwhile
        metadata = {"gradwatch_job_id": job.id, "gradwatch_name": job.name}
        try:
            self.cluster.submit(job.id, self.entrypoint(job, spec_file), metadata, self.job_environment(job))
        except ClusterUnavailable as exc:
            if self.cluster_knows(job.id):
                return True  # the submit landed; only its answer was lost
            job = self.store.jobs.transition(job.id, "failed", f"Ray did not accept the job: {exc}", expect={"running"})
            # Should the lost submit land after all, it must not run unseen: stopped now and on
            # every pass while Ray may still take it.
            self._orphans[job.id] = time.time()
            self._stop_orphan(job.id)
            return False
        self._placed_at.pop(job.id, None)
        log.info("job %s submitted to Ray", job.id)
        return True

    def cluster_knows(self, submission_id: str) -> bool:
        try:
            return self.cluster.status(submission_id) is not None
        except ClusterUnavailable:
            return False


# ----------------------------------------------------------------- helpers
def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-2000:]


__all__ = [
    "Cluster",
    "ClusterUnavailable",
    "Launcher",
    "RayCluster",
    "RayJob",
    "Resources",
]
