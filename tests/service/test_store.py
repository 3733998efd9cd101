"""The job store: transitions are recorded, terminal states are final, threads lose nothing."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from gradwatch.spec import SpecError, load_spec
from gradwatch.status import RunStatus
from service.store.alerts import AlertUpdate, Ingested
from service.store.errors import BadCursor, JobNotFound, StoreError, TransitionRefused
from service.store.store import Store
from tests.service.fakes import spec


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """The same tests on SQLite (the default) and on a real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres").new_database()
    s = Store(url)
    yield s
    s.close()


def new_job(store, name="job", **kw):
    return store.jobs.create(load_spec(spec(name, **kw)))


def test_a_new_job_is_queued_with_its_demand_and_first_transition(store):
    job = new_job(store, "digits", workers=3, labels={"team": "vision"})
    assert job.id.startswith("gw-") and len(job.id) == 15
    assert (job.state, job.cpus, job.gpus, job.world_size) == ("queued", 3.0, 0.0, 3)
    assert job.labels == {"team": "vision"}
    [t] = store.jobs.transitions(job.id)
    assert (t.from_state, t.to_state, t.reason) == (None, "queued", "submitted")


def test_every_transition_is_stored_with_time_and_reason(store):
    job = new_job(store)
    store.jobs.transition(job.id, "running", "submitted to Ray", now=100.0)
    job = store.jobs.transition(job.id, "succeeded", "finished 3 steps", now=130.0)
    assert (job.started_at, job.ended_at, job.reason) == (100.0, 130.0, "finished 3 steps")
    history = [(t.from_state, t.to_state, t.at, t.reason) for t in store.jobs.transitions(job.id)]
    assert history[1:] == [
        ("queued", "running", 100.0, "submitted to Ray"),
        ("running", "succeeded", 130.0, "finished 3 steps"),
    ]


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled", "timed_out"])
def test_terminal_states_are_final(store, final):
    job = new_job(store)
    store.jobs.transition(job.id, "running", "go")
    store.jobs.transition(job.id, final, "the end")
    for to in ("queued", "running", "succeeded", "failed", "cancelled", "timed_out"):
        with pytest.raises(TransitionRefused, match=f"already ended {final}"):
            store.jobs.transition(job.id, to, "again")
    with pytest.raises(TransitionRefused):
        store.jobs.request_stop(job.id, "cancel", "too late")
    assert store.jobs.get(job.id).state == final
    assert len(store.jobs.transitions(job.id)) == 3


def test_transitions_not_in_the_state_machine_are_refused(store):
    job = new_job(store)
    with pytest.raises(TransitionRefused, match="cannot go from queued to succeeded"):
        store.jobs.transition(job.id, "succeeded", "skipping running")
    with pytest.raises(TransitionRefused, match="is queued, not running"):
        store.jobs.transition(job.id, "failed", "x", expect={"running"})
    with pytest.raises(JobNotFound):
        store.jobs.transition("gw-000000000000", "running", "x")


def test_cancel_ends_a_queued_job_and_marks_a_running_one(store):
    queued, running = new_job(store, "a"), new_job(store, "b")
    store.jobs.transition(running.id, "running", "go")
    job, needs_stop = store.jobs.request_stop(queued.id, "cancel", "cancelled on request")
    assert (job.state, needs_stop) == ("cancelled", False)
    job, needs_stop = store.jobs.request_stop(running.id, "cancel", "cancelled on request")
    assert (job.state, job.stop_requested, needs_stop) == ("running", "cancel", True)
    assert job.reason == "stopping: cancelled on request"
    # asking twice keeps the first request
    job, _ = store.jobs.request_stop(running.id, "timeout", "late")
    assert job.stop_requested == "cancel"


def test_list_filters_and_pages_newest_first(store):
    ids = []
    for i in range(25):
        job = store.jobs.create(
            load_spec(spec(f"job-{i % 3}", labels={"team": "vision" if i % 2 else "nlp"})), now=1000.0 + i
        )
        ids.append(job.id)
    page, cursor = store.jobs.listing(limit=10)
    assert [j.id for j in page] == ids[::-1][:10]
    seen = [j.id for j in page]
    while cursor:
        page, cursor = store.jobs.listing(limit=10, cursor=cursor)
        seen += [j.id for j in page]
    assert seen == ids[::-1]
    assert [j.id for j in store.jobs.listing(limit=5, offset=5)[0]] == ids[::-1][5:10]
    vision = store.jobs.listing(labels={"team": "vision"}, limit=100)[0]
    assert len(vision) == 12 and all(j.labels["team"] == "vision" for j in vision)
    named = store.jobs.listing(name="job-1", labels={"team": "vision"}, limit=100)[0]
    assert {j.name for j in named} == {"job-1"} and all(j.labels["team"] == "vision" for j in named)
    store.jobs.transition(ids[0], "running", "go")
    assert [j.id for j in store.jobs.listing(state="running")[0]] == [ids[0]]
    assert len(store.jobs.listing(state=["running", "queued"], limit=100)[0]) == 25
    with pytest.raises(BadCursor):
        store.jobs.listing(cursor="not-a-cursor")


def test_scheduling_order_is_priority_then_first_come(store):
    low = store.jobs.create(load_spec(spec("low", priority=-5)), now=1.0)
    first = store.jobs.create(load_spec(spec("first")), now=2.0)
    urgent = store.jobs.create(load_spec(spec("urgent", priority=10)), now=3.0)
    second = store.jobs.create(load_spec(spec("second")), now=4.0)
    assert [j.id for j in store.jobs.in_states("queued")] == [urgent.id, first.id, second.id, low.id]


def test_threads_submitting_and_cancelling_lose_and_duplicate_nothing(store):
    threads, per_thread = 8, 15
    made: list[str] = []
    cancelled: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                job = store.jobs.create(load_spec(spec(f"t{n}-{i}")))
                with lock:
                    made.append(job.id)
                if i % 3 == 0:
                    # everyone races to cancel the same recent jobs: exactly one wins each
                    with lock:
                        target = made[-1]
                    try:
                        job, _ = store.jobs.request_stop(target, "cancel", f"thread {n}")
                        if job.state == "cancelled":
                            with lock:
                                cancelled.append(target)
                    except TransitionRefused:
                        pass
                if i % 5 == 0:
                    with lock:
                        target = made[len(made) // 2]
                    try:
                        store.jobs.transition(target, "running", f"thread {n}", expect={"queued"})
                    except TransitionRefused:
                        pass
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures, failures
    jobs, _ = store.jobs.listing(limit=1000)
    assert len(made) == len(set(made)) == threads * per_thread
    assert sorted(j.id for j in jobs) == sorted(made)
    assert sum(store.jobs.count_by_state().values()) == threads * per_thread
    # a job was cancelled once at most, and every recorded history is a legal, gap-free chain
    assert cancelled and all(n == 1 for n in Counter(cancelled).values())
    for job in jobs:
        history = store.jobs.transitions(job.id)
        assert history[0].from_state is None
        assert all(a.to_state == b.from_state for a, b in zip(history, history[1:], strict=False))
        assert history[-1].to_state == job.state


def test_alerts_are_deduplicated_by_fingerprint_and_start(store):
    firing = AlertUpdate(
        fingerprint="abc",
        status="firing",
        starts_at=100.0,
        ends_at=None,
        labels={"alertname": "TrainingLossSpike", "job_id": "gw-1", "severity": "warning"},
        annotations={"summary": "loss spiked", "description": "z=9"},
    )
    assert store.alerts.ingest([firing, firing]) == (1, 0, 0)
    assert store.alerts.ingest([firing]) == (0, 0, 0)
    resolved = AlertUpdate(**{**firing.__dict__, "status": "resolved", "ends_at": 160.0})
    assert store.alerts.ingest([resolved]) == (0, 1, 0)
    again = AlertUpdate(**{**firing.__dict__, "starts_at": 300.0})
    assert store.alerts.ingest([again]) == (1, 0, 0)
    rows = store.alerts.listing(job_id="gw-1")
    assert [(a.status, a.starts_at, a.ends_at) for a in rows] == [
        ("firing", 300.0, None),
        ("resolved", 100.0, 160.0),
    ]
    assert rows[1].alertname == "TrainingLossSpike" and rows[1].summary == "loss spiked"
    assert [a.status for a in store.alerts.listing(status="firing")] == ["firing"]
    assert store.alerts.listing(since_id=rows[0].id) == []


def test_current_states_keep_ended_jobs_for_a_while(store):
    old, recent, live = new_job(store, "old"), new_job(store, "recent"), new_job(store, "live")
    for job, at in ((old, 100.0), (recent, 1000.0)):
        store.jobs.transition(job.id, "running", "go", now=at - 10)
        store.jobs.transition(job.id, "failed", "boom", now=at)
    states = dict(store.jobs.current_states(ended_since=500.0))
    assert states == {recent.id: "failed", live.id: "queued"}


def test_concurrent_notifications_of_one_new_alert_store_it_once(store):
    """Alertmanager retries and HA pairs deliver the same alert at once; one row, no error."""
    threads = 8
    start = threading.Barrier(threads)
    results: list[Ingested] = []
    failures: list[BaseException] = []

    def deliver(n: int) -> None:
        update = AlertUpdate(
            fingerprint=f"fp-{n % 2}",
            status="firing",
            starts_at=100.0,
            ends_at=None,
            labels={"alertname": "TrainingStalled", "job_id": "gw-race", "severity": "warning"},
            annotations={"summary": f"from sender {n}"},
        )
        try:
            start.wait()
            results.append(store.alerts.ingest([update]))
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    workers = [threading.Thread(target=deliver, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures, failures
    assert sum(done.new for done in results) == 2
    assert sorted(a.fingerprint for a in store.alerts.listing(job_id="gw-race")) == ["fp-0", "fp-1"]


def test_alert_fields_beyond_the_columns_are_clipped_not_refused(store):
    """Labels come from any rule author: an overlong name or a NUL byte must not lose the alert."""
    long = "x" * 5000
    update = AlertUpdate(
        fingerprint="f" * 64,
        status="firing",
        starts_at=5.0,
        ends_at=None,
        labels={"alertname": long, "job_id": "gw-" + long, "severity": "warn\x00ing" + long},
        annotations={"summary": "a\x00b", "description": long},
        generator_url="http://prometheus/graph?" + long,
    )
    assert store.alerts.ingest([update]) == (1, 0, 0)
    [row] = store.alerts.listing(status="firing")
    assert row.alertname == "x" * 200 and row.job_id == ("gw-" + long)[:64]
    assert row.severity == ("warn\ufffding" + long)[:32] and row.summary == "a\ufffdb"
    assert row.description == long and row.labels["alertname"] == long
    assert store.alerts.ingest([update]) == (0, 0, 0)


def test_a_nul_byte_is_refused_in_specs_and_matches_nothing_in_filters(store):
    """PostgreSQL text holds no NUL: the spec says so up front, and lookups with one find nothing."""
    with pytest.raises(SpecError, match="control characters are not allowed in a spec"):
        load_spec(spec("x", labels={"team": "a\x00b"}))
    job = new_job(store, "x", labels={"team": "a"})
    assert store.jobs.listing(name="x\x00")[0] == []
    assert store.jobs.listing(labels={"team": "a\x00"})[0] == []
    assert [j.id for j in store.jobs.listing(labels={"team": "a"})[0]] == [job.id]
    assert store.alerts.listing(job_id="gw-\x00") == []


def test_a_non_finite_loss_in_a_drivers_report_is_stored_on_every_backend(store):
    job = new_job(store)
    store.jobs.transition(job.id, "running", "go")
    status = RunStatus(
        job_id=job.id, state="running", step=3, train_loss=float("nan"), grad_norm=float("inf"), updated_at=1.0
    )
    store.jobs.push_progress(job.id, status, [{"kind": "anomaly", "loss": float("-inf")}])
    stored = store.jobs.get(job.id)
    # the status travels as JSON, which has no NaN: a non-finite number is null there
    assert stored.last_status() == status
    assert (stored.last_status().step, stored.last_status().train_loss, stored.last_status().grad_norm) == (
        3,
        None,
        None,
    )
    # events keep theirs: SQLite keeps the float; PostgreSQL's JSON has no NaN, so it keeps the name
    assert str(stored.events[0]["loss"]).lower() in ("-inf", "-infinity")


def test_a_store_an_older_version_made_is_refused_naming_what_it_lacks(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # a jobs table from before the driver's report had columns of its own
        db.execute("CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, name VARCHAR(63), progress JSON)")
    with pytest.raises(StoreError) as info:
        Store(f"sqlite:///{path}")
    message = str(info.value)
    assert "its jobs table lacks" in message and "run_status" in message and "GRADWATCH_DATABASE_URL" in message
