"""An in-memory stand-in for Ray, for launcher and API tests that need no cluster.

It honours the driver contract the way `workers.driver` does, through the same
models (gradwatch.status): a submitted job waits until its workers fit, then each
`advance()` is one training step whose status the driver pushes to the service (into the store of the
data directory its spec file is in, what the push routes do with a driver's report) and writes to
`<storage>/<job id>/status.json`, its local artifact; at max_steps it pushes its result, writes
result.json and succeeds. A spec label `fake: fail` makes it fail at step 2 (with a result),
`fake: crash` kills the driver at step 2 (no result), `fake: nonfinite` succeeds on an inf loss, and
`fake: unreachable` runs a driver that cannot reach the service: nothing pushed, only the run folder's
files written.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwatch.names import JobState
from gradwatch.spec import ScalingSpec
from gradwatch.status import RESULT_FILE, STATUS_FILE, Endpoint, RunResult, RunStatus, write_record
from service.scheduler.launcher import ClusterUnavailable, RayJob, Resources
from service.settings import Settings
from service.store.errors import TransitionRefused
from service.store.store import Store


@dataclass
class FakeJob:
    sid: str
    job_id: str
    spec: dict[str, Any]
    storage: Path
    cpus: float
    gpus: float
    status: str = "PENDING"
    step: int = 0
    workers: int = 0
    log: list[str] = field(default_factory=list)
    message: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # the runtime_env variables it was given
    data_dir: Path | None = None  # the service's data directory (its spec file is in <data_dir>/jobs/<id>/)


class FakeCluster:
    def __init__(self, cpus: float = 4, gpus: float = 0):
        self.total = Resources(cpus, gpus)
        self.jobs: dict[str, FakeJob] = {}
        self.down = False
        self.submitted: list[str] = []
        self.envs: dict[str, dict[str, str]] = {}  # the runtime env each job was submitted with
        self.stopped: list[str] = []
        self.refuse_submits = False
        self.hosts = frozenset({"10.0.0.7"})  # the node address every fake worker runs on
        self._lock = threading.RLock()
        self._stores: dict[str, Store] = {}  # where the drivers' pushes land, per service data directory
        self.pushes: list[tuple[str, str]] = []  # (job id, "status" or "result") of each delivered push
        self.pushing = True  # False: the drivers push nothing (a test pushes for them, over HTTP)

    # ------------------------------------------------------------ Cluster API
    def _check(self) -> None:
        if self.down:
            raise ClusterUnavailable("cannot reach Ray at fake://cluster: connection refused")

    def _used(self) -> Resources:
        used = Resources()
        for job in self.jobs.values():
            if job.workers:
                used = used + Resources(job.cpus, job.gpus)
        return used

    def resources(self) -> tuple[Resources, Resources]:
        with self._lock:
            self._check()
            return self.total - self._used(), self.total

    def submit(self, submission_id: str, entrypoint: str, metadata: dict[str, str], env: dict[str, str]) -> None:
        with self._lock:
            self._check()
            if submission_id in self.jobs:
                raise ClusterUnavailable(f"job {submission_id} already exists")
            if self.refuse_submits:
                raise ClusterUnavailable("Ray submit_job failed: ReadTimeout")
            args = shlex.split(entrypoint)
            spec_file = Path(args[args.index("--spec-file") + 1])
            spec = json.loads(spec_file.read_text())
            demand = ScalingSpec.model_validate(spec["scaling"]).demand()  # what the driver asks Ray for
            self.jobs[submission_id] = FakeJob(
                sid=submission_id,
                job_id=args[args.index("--job-id") + 1],
                spec=spec,
                storage=Path(args[args.index("--storage-path") + 1]),
                cpus=demand["CPU"],
                gpus=demand.get("GPU", 0.0),
                log=[f"Running entrypoint for job {submission_id}: {entrypoint}"],
                env=dict(env),
                data_dir=spec_file.parents[2],
            )
            self.submitted.append(submission_id)
            self.envs[submission_id] = dict(env)

    def status(self, submission_id: str) -> RayJob | None:
        with self._lock:
            self._check()
            job = self.jobs.get(submission_id)
            return None if job is None else RayJob(job.status, job.message or f"fake {job.status.lower()}")

    def stop(self, submission_id: str) -> None:
        with self._lock:
            self._check()
            job = self.jobs.get(submission_id)
            self.stopped.append(submission_id)
            if job is not None and job.status in ("PENDING", "RUNNING"):
                job.status, job.workers = "STOPPED", 0
                job.log.append("stopped")
                self._write_status(job, "cancelled")

    def logs(self, submission_id: str) -> str:
        with self._lock:
            self._check()
            job = self.jobs.get(submission_id)
            return "" if job is None else "".join(line + "\n" for line in job.log)

    def live_workers(self, submission_id: str) -> int:
        with self._lock:
            self._check()
            job = self.jobs.get(submission_id)
            return 0 if job is None else job.workers

    def worker_hosts(self, submission_id: str) -> frozenset[str]:
        with self._lock:
            self._check()
            return self.hosts if submission_id in self.jobs else frozenset()

    # ---------------------------------------------------------- simulation
    def advance(self, steps: int = 1) -> None:
        """Place waiting jobs that fit (first come), then take one step in every running job."""
        with self._lock:
            for _ in range(steps):
                for job in self.jobs.values():
                    if job.status == "PENDING" and Resources(job.cpus, job.gpus).fits_in(self.total - self._used()):
                        job.status, job.workers = "RUNNING", job.spec["scaling"]["num_workers"]
                    elif job.status == "RUNNING" and job.workers:
                        self._step(job)

    def _step(self, job: FakeJob) -> None:
        job.step += 1
        job.log.append(f"[{job.job_id}] step {job.step}/{job.spec['max_steps']} loss {1.0 / job.step:.4f}")
        if job.spec.get("labels", {}).get("fake") == "crash" and job.step >= 2:  # killed: no result.json
            job.status, job.workers = "FAILED", 0
            job.log.append("Killed")
            job.message = "Job entrypoint command failed with exit code -9, last available logs:\n..."
        elif job.spec.get("labels", {}).get("fake") == "fail" and job.step >= 2:
            job.status, job.workers = "FAILED", 0
            job.log.append("RuntimeError: boom at step 2")
            self._write_status(job, "failed")
            self._write_result(job, "failed", "RuntimeError: boom at step 2")
        elif job.step >= job.spec["max_steps"]:
            job.status, job.workers = "SUCCEEDED", 0
            warning = "its final train loss is inf" if job.spec.get("labels", {}).get("fake") == "nonfinite" else None
            self._write_status(job, "succeeded", warning)
            self._write_result(job, "succeeded", None, warning)
        else:
            self._write_status(job, "running")

    def _write_status(self, job: FakeJob, state: JobState, warning: str | None = None) -> None:
        n = job.spec["scaling"]["num_workers"]
        endpoints = (
            [Endpoint(rank=r, host="10.0.0.7", port=40000 + r, node=f"node-{r % 2}") for r in range(n)]
            if state == "running"
            else []
        )
        status = RunStatus(
            job_id=job.job_id,
            state=state,
            step=job.step,
            max_steps=job.spec["max_steps"],
            world_size=n,
            train_loss=1.0 / max(job.step, 1),
            grad_norm=0.5,
            samples_per_second=100.0,
            phase="rapid_learning",
            endpoints=endpoints,
            warning=warning,
            nodes={str(r): f"node-{r % 2}" for r in range(n)},
            updated_at=time.time(),
        )
        write_record(job.storage / job.job_id / STATUS_FILE, status)
        self._push(job, status=status)

    def _write_result(self, job: FakeJob, state: JobState, error: str | None, warning: str | None = None) -> None:
        result = RunResult(
            job_id=job.job_id,
            state=state,
            steps=job.step,
            world_size=job.spec["scaling"]["num_workers"],
            train_loss=float("inf") if warning else 1.0 / job.step,
            wall_seconds=1.5,
            run_dir=str(job.storage / job.job_id),
            error=error,
            warning=warning,
        )
        write_record(job.storage / job.job_id / RESULT_FILE, result)
        self._push(job, result=result)

    def _push(self, job: FakeJob, status: RunStatus | None = None, result: RunResult | None = None) -> None:
        """What workers/push.py delivers: the status, or the result, into the service's store; a job
        that ended meanwhile refuses it (409 to a real driver), and an unreachable driver delivers nothing."""
        if not self.pushing or job.spec.get("labels", {}).get("fake") == "unreachable" or job.data_dir is None:
            return
        url = Settings(data_dir=job.data_dir).database_url
        assert url is not None
        store = self._stores.get(url)
        if store is None:
            store = self._stores[url] = Store(url)
        try:
            store.jobs.push_progress(job.job_id, status, [], result)
        except TransitionRefused:
            return
        self.pushes.append((job.job_id, "status" if status is not None else "result"))

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()


def spec(name: str = "job", *, workers: int = 1, steps: int = 3, priority: int = 0, **extra: Any) -> dict[str, Any]:
    """A small valid spec."""
    return {
        "name": name,
        "model": {"name": "mlp", "hidden": [16]},
        "data": {"name": "synthetic-classification", "n_samples": 512},
        "max_steps": steps,
        "priority": priority,
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        **extra,
    }
