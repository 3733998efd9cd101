"""The scheduler against an in-memory Ray: ordering, fitting, following, stopping, reconciling."""

from __future__ import annotations

import json

import pytest

from gradwatch.spec import load_spec
from gradwatch.status import STATUS_FILE, write_record
from service.scheduler.launcher import ClusterUnavailable, Launcher
from service.settings import Settings
from service.store.store import Store
from tests.promstack import wait_for
from tests.service.fakes import FakeCluster, spec


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, token="t", poll_interval=0.05, stop_grace_seconds=30)


@pytest.fixture
def store(settings):
    s = Store(settings.database_url)
    yield s
    s.close()


def submit(store, name, **kw):
    return store.jobs.create(load_spec(spec(name, **kw)))


def state(store, job):
    return store.jobs.get(job.id).state


def test_a_job_runs_to_success_with_its_progress_logs_and_spec_file(settings, store):
    cluster = FakeCluster(cpus=4)
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "ok", workers=2, steps=3)
    launcher.tick()
    assert state(store, job) == "running"
    args = cluster.jobs[job.id].log[0]
    assert (
        f"-m workers.driver --spec-file {settings.jobs_dir / job.id / 'spec.json'} --job-id {job.id} "
        f"--storage-path {settings.runs_dir}" in args
    )
    assert json.loads((settings.jobs_dir / job.id / "spec.json").read_text())["name"] == "ok"
    cluster.advance(2)  # placed, step 1
    launcher.tick()
    running = store.jobs.get(job.id)
    assert running.last_status().step == 1 and len(running.last_status().endpoints) == 2
    cluster.advance(3)
    launcher.tick()
    done = store.jobs.get(job.id)
    assert done.state == "succeeded" and done.reason.startswith("finished 3 steps")
    assert done.last_status().endpoints == [] and done.last_status().state == "succeeded"
    assert "step 3/3" in launcher.logs(done)
    assert (settings.jobs_dir / job.id / "driver.log").exists()


def test_a_failing_job_ends_failed_with_the_drivers_error(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "bad", steps=10, labels={"fake": "fail"})
    launcher.tick()
    cluster.advance(3)
    launcher.tick()
    failed = store.jobs.get(job.id)
    assert (failed.state, failed.reason) == ("failed", "RuntimeError: boom at step 2")


def test_a_driver_that_dies_without_a_result_fails_with_rays_exit_line_and_its_last_output(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "killed", steps=10, labels={"fake": "crash"})
    launcher.tick()
    cluster.advance(3)
    launcher.tick()
    failed = store.jobs.get(job.id)
    assert failed.state == "failed"
    assert failed.reason == (
        "Job entrypoint command failed with exit code -9, last available logs; "
        f"last output: [{job.id}] step 1/10 loss 1.0000 | [{job.id}] step 2/10 loss 0.5000 | Killed"
    )


def test_a_submit_ray_refuses_fails_the_job_and_stops_whatever_landed(settings, store):
    cluster = FakeCluster()
    cluster.refuse_submits = True
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "refused")
    launcher.tick()
    failed = store.jobs.get(job.id)
    assert (failed.state, failed.reason) == (
        "failed",
        "Ray did not accept the job: Ray submit_job failed: ReadTimeout",
    )
    assert cluster.stopped == [job.id]


def test_priority_then_first_come_and_no_overtaking(settings, store):
    cluster = FakeCluster(cpus=2)
    launcher = Launcher(store, settings, cluster)
    first = submit(store, "first", workers=1)
    big = submit(store, "big", workers=2, priority=5)
    later = submit(store, "later", workers=1)
    launcher.tick()
    assert state(store, big) == "running"
    assert [state(store, first), state(store, later)] == ["queued", "queued"]
    assert store.jobs.get(first.id).reason == "waiting for 1 CPU; 0 CPUs free of 2 CPUs"
    assert store.jobs.get(later.id).reason.startswith(f"queued behind {first.id}")
    cluster.advance(10)
    launcher.tick()
    assert state(store, big) == "succeeded"
    assert [state(store, first), state(store, later)] == ["running", "running"]


def test_submitted_but_unplaced_jobs_hold_their_resources(settings, store):
    cluster = FakeCluster(cpus=2)
    launcher = Launcher(store, settings, cluster)
    a, b = submit(store, "a", workers=2), submit(store, "b", workers=2)
    launcher.tick()
    # Ray still reports 2 free CPUs (a's workers are not placed yet), but they are a's
    assert cluster.resources()[0].cpus == 2
    launcher.tick()
    assert [state(store, a), state(store, b)] == ["running", "queued"]
    assert cluster.submitted == [a.id]


def test_a_job_bigger_than_the_cluster_waits_with_a_reason_and_blocks_nobody(settings, store):
    cluster = FakeCluster(cpus=2)
    launcher = Launcher(store, settings, cluster)
    huge = submit(store, "huge", workers=8, priority=100)
    small = submit(store, "small", workers=1)
    launcher.tick()
    assert state(store, huge) == "queued"
    assert store.jobs.get(huge.id).reason.startswith("waiting for 8 CPUs; the cluster has 2 CPUs")
    assert state(store, small) == "running"


def test_cancel_queued_ends_at_once_and_running_after_ray_stopped_it(settings, store):
    cluster = FakeCluster(cpus=1)
    launcher = Launcher(store, settings, cluster)
    running, queued = submit(store, "r", steps=100), submit(store, "q")
    launcher.tick()
    cluster.advance(2)
    assert launcher.cancel(queued.id).state == "cancelled"
    job = launcher.cancel(running.id)
    assert (job.state, job.stop_requested) == ("running", "cancel")
    assert cluster.stopped == [running.id] and cluster.live_workers(running.id) == 0
    launcher.tick()
    ended = store.jobs.get(running.id)
    assert (ended.state, ended.reason) == ("cancelled", "cancelled on request")
    assert [t.to_state for t in store.jobs.transitions(running.id)] == ["queued", "running", "cancelled"]


def test_cancel_waits_for_workers_to_go(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "slow-to-die", steps=100)
    launcher.tick()
    cluster.advance(2)
    launcher.cancel(job.id)
    cluster.jobs[job.id].workers = 1  # Ray says STOPPED but a worker lingers
    launcher.tick()
    assert state(store, job) == "running"
    cluster.jobs[job.id].workers = 0
    launcher.tick()
    assert state(store, job) == "cancelled"


def test_timeout_stops_the_job_and_ends_it_timed_out(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "slow", steps=1000, timeout="30s")
    launcher.tick()
    cluster.advance(2)
    store.jobs.update(job.id, started_at=store.jobs.get(job.id).started_at - 31)
    launcher.tick()
    assert cluster.stopped == [job.id]
    launcher.tick()
    ended = store.jobs.get(job.id)
    assert (ended.state, ended.reason) == ("timed_out", "ran longer than its timeout of 30s")


def test_a_restarted_service_tracks_running_jobs_and_fails_vanished_ones(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    alive, vanished = submit(store, "alive", steps=5), submit(store, "vanished", steps=5)
    launcher.tick()
    cluster.advance(2)
    del cluster.jobs[vanished.id]  # e.g. the Ray cluster was restarted under it
    # a new service process: a new launcher over the same store
    restarted = Launcher(Store(settings.database_url), settings, cluster)
    restarted.tick()
    gone = store.jobs.get(vanished.id)
    assert gone.state == "failed" and gone.reason.startswith(f"Ray has no job {vanished.id}")
    assert state(store, alive) == "running"
    cluster.advance(10)
    restarted.tick()
    assert state(store, alive) == "succeeded"


def test_an_unreachable_cluster_keeps_jobs_as_they_are(settings, store):
    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    running = submit(store, "running", steps=5)
    launcher.tick()
    queued = submit(store, "queued")
    cluster.down = True
    launcher.tick()
    assert state(store, running) == "running"
    assert store.jobs.get(queued.id).reason.startswith("waiting for the Ray cluster: cannot reach Ray")
    cluster.down = False
    launcher.tick()
    assert state(store, queued) == "running"


def test_the_scheduler_thread_runs_jobs_by_itself(settings, store):
    from tests.promstack import wait_for

    cluster = FakeCluster()
    launcher = Launcher(store, settings, cluster)
    launcher.start()
    try:
        job = submit(store, "threaded", steps=2)
        launcher.wake()

        def succeeded() -> bool:
            cluster.advance()  # the fake Ray's clock: one step each time the condition is polled
            return state(store, job) == "succeeded"

        wait_for(succeeded, timeout=10, interval=0.05, what="the threaded job to succeed")
    finally:
        launcher.shutdown()
    assert not launcher.running


class ConnectingCluster(FakeCluster):
    """A cluster whose Jobs client is built by `connect()` (RayCluster's imports Ray), which may fail."""

    def __init__(self, fail: bool):
        super().__init__()
        self.fail = fail
        self.connected_before: list[list[str]] = []  # the jobs already submitted at each connect()

    def connect(self) -> None:
        self.connected_before.append(list(self.submitted))
        if self.fail:
            raise ClusterUnavailable("cannot reach Ray at fake://cluster: connection refused")


@pytest.mark.parametrize("fail", [False, True], ids=["reachable", "unreachable"])
def test_the_scheduler_connects_to_rays_job_api_when_it_starts_not_at_the_first_job(settings, store, fail):
    cluster = ConnectingCluster(fail)
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "first", steps=1)
    launcher.start()
    try:
        # the store says running before Ray is asked (service/scheduler/launcher.py): wait for the submit itself
        wait_for(lambda: cluster.submitted == [job.id], timeout=10, interval=0.05, what="the job submitted to Ray")
        assert state(store, job) == "running"  # a failed connect does not hold the scheduler up
        assert cluster.connected_before == [[]]
    finally:
        launcher.shutdown()


def test_the_pushed_status_is_the_one_the_launcher_reads_never_status_json(settings, store):
    cluster = FakeCluster(cpus=4)
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "pushed", workers=1, steps=5)
    launcher.tick()
    cluster.advance(3)  # placed, steps 1 and 2, each pushed
    assert cluster.pushes == [(job.id, "status"), (job.id, "status")]
    assert "--prometheus-sd-file" not in cluster.jobs[job.id].log[0]  # discovery: /v1/targets alone
    # a status.json newer than the push, in the shared run folder, says something else: not read
    newer = store.jobs.get(job.id).last_status().model_copy(update={"step": 4, "updated_at": 4e9})
    write_record(settings.runs_dir / job.id / STATUS_FILE, newer)
    launcher.tick()
    assert store.jobs.get(job.id).last_status().step == 2
    cluster.advance(3)
    launcher.tick()
    done = store.jobs.get(job.id)
    assert done.state == "succeeded" and done.last_status().step == 5
    assert done.final_result() is not None and done.final_result().steps == 5


def test_a_driver_that_could_not_push_ends_by_its_result_json_and_shows_no_status(settings, store):
    """The result.json fallback: the service was out of the driver's reach (workers/push.py gave up on
    the result); where the run folder is shared its result.json still ends the job as it ended."""
    cluster = FakeCluster(cpus=4)
    launcher = Launcher(store, settings, cluster)
    job = submit(store, "unreachable", workers=1, steps=3, labels={"fake": "unreachable"})
    launcher.tick()
    cluster.advance(3)
    launcher.tick()
    running = store.jobs.get(job.id)
    assert running.state == "running" and (settings.runs_dir / job.id / STATUS_FILE).exists()
    assert running.last_status() is None and cluster.pushes == []  # status.json is the run's artifact only
    cluster.advance(2)
    launcher.tick()
    done = store.jobs.get(job.id)
    assert done.state == "succeeded" and done.reason.startswith("finished 3 steps")
    assert done.world_size == 1 and done.last_status() is None
