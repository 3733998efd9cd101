"""Heartbeats and the hang judge, without Ray: who is stuck, where, what it is told, and the stack taken."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.spec import SpecError, load_spec
from tests.promstack import wait_for
from workers.heartbeat import (
    COLLECTIVE,
    DATA,
    FORWARD,
    HANG_STEP_MULTIPLE,
    PHASES,
    SERIES_PER_RANK,
    HangWatch,
    Heartbeat,
    HeartbeatCollector,
    dump_stack,
    judge,
    process_group_timeout,
)


def beat(rank, phase, step, entered, *, hang_after=10.0, pid=None, now=1000.0, **extra) -> dict:
    return {
        "rank": rank,
        "phase": phase,
        "step": step,
        "entered": entered,
        "hang_after": hang_after,
        "pid": pid or 100 + rank,
        "host": f"10.0.0.{rank}",
        "node": None,
        "posted_at": now,
        **extra,
    }


def test_the_rank_outside_the_all_reduce_is_the_stuck_one():
    beats = {
        0: beat(0, "collective", 1234, 930.0),
        1: beat(1, "data", 1234, 925.0),
        2: beat(2, "collective", 1234, 931),
    }
    hang = judge(beats, now=1000.0)
    assert hang is not None and (hang.rank, hang.step, hang.phase, hang.node) == (1, 1234, "data", "10.0.0.1")
    assert hang.message == (
        "rank 1 on node 10.0.0.1 stuck in data loading of step 1234 for 75 s; "
        "rank 0 waits in the gradient all-reduce of step 1234; rank 2 waits in the gradient all-reduce of step 1234"
    )


def test_when_every_rank_waits_in_the_all_reduce_the_first_to_enter_it_is_named():
    beats = {0: beat(0, "collective", 7, 980.0), 1: beat(1, "collective", 7, 970.0)}
    hang = judge(beats, now=1000.0)
    assert hang is not None and hang.rank == 1 and hang.message.startswith("rank 1 on node 10.0.0.1 stuck in the ")


def test_no_hang_below_the_threshold_nor_from_a_done_gone_or_restarted_rank():
    assert judge({0: beat(0, "forward", 3, 991.0)}, now=1000.0) is None  # 9 s < 10 s
    assert judge({0: beat(0, "forward", 3, 900.0, done=True)}, now=1000.0) is None
    assert judge({0: beat(0, "forward", 3, 900.0, now=980.0)}, now=1000.0) is None  # not posted for 20 s
    assert judge({0: beat(0, "forward", 3, 900.0, pid=7)}, now=1000.0, ignore_pids={7}) is None
    assert judge({0: beat(0, "forward", 3, 900.0, hang_after=120.0)}, now=1000.0) is None


def test_the_threshold_is_hang_after_or_a_multiple_of_the_median_step_whichever_is_longer():
    hb = Heartbeat("job", 0, hang_after=10.0)
    assert hb.threshold() == 10.0  # no step yet
    for step in range(1, 4):  # three steps, each a few ms: 10 medians stay below hang_after
        time.sleep(0.005)
        hb.enter(DATA, step)
    assert hb._n_durations == 2 and 0.004 < hb.median_step_seconds() < 1.0 and hb.threshold() == 10.0
    hb._durations[:3] = [3.0, 2.0, 40.0]
    hb._n_durations = 3
    assert hb.median_step_seconds() == 3.0 and hb.threshold() == HANG_STEP_MULTIPLE * 3.0
    hb._durations[:3] = [0.1, 0.2, 0.3]
    assert hb.threshold() == 10.0


def test_entering_phases_adds_up_the_time_spent_in_each():
    hb = Heartbeat("job", 1, hang_after=10.0)
    hb.enter(FORWARD, 1)
    time.sleep(0.02)
    hb.enter(COLLECTIVE)
    snap = hb.snapshot()
    assert snap["step"] == 1 and snap["phase"] == "collective"
    assert snap["seconds"]["forward"] >= 0.02 and set(snap["seconds"]) == set(PHASES)


def test_the_collector_exports_bounded_series_read_at_scrape_time():
    hb = Heartbeat("gw-x", 1, hang_after=30.0)
    hb.enter(FORWARD, 12)
    registry = CollectorRegistry()
    registry.register(HeartbeatCollector(hb))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    count = sum(len(f.samples) for f in families.values())
    assert count == SERIES_PER_RANK
    assert families["gradwatch_rank_step"].samples[0].value == 12
    phase = {s.labels["step_phase"]: s.value for s in families["gradwatch_rank_step_phase"].samples}
    assert phase == {p: (1.0 if p == "forward" else 0.0) for p in PHASES}
    assert families["gradwatch_rank_hang_after_seconds"].samples[0].value == 30.0
    assert {s.labels["rank"] for f in families.values() for s in f.samples} == {"1"}
    hb.stop()  # done: no longer stuck anywhere
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert families["gradwatch_rank_stuck_seconds"].samples[0].value == 0.0
    assert sum(s.value for s in families["gradwatch_rank_step_phase"].samples) == 0.0


def test_the_heartbeat_is_posted_from_its_own_thread_while_the_training_thread_waits():
    posted: list[dict] = []
    board = SimpleNamespace(post_heartbeat=lambda rank, hb: posted.append(hb))
    hb = Heartbeat("job", 0, hang_after=10.0)
    hb.enter(COLLECTIVE, 5)
    hb.start(board, node="n1", host="10.0.0.9")
    wait_for(lambda: len(posted) >= 2, timeout=10, what="two heartbeats")
    hb.stop()
    assert posted[0]["phase"] == "collective" and posted[0]["pid"] and posted[0]["host"] == "10.0.0.9"
    assert posted[-1]["done"] is True


class Board:
    def __init__(self):
        self.events: list[dict] = []
        self.post_event = SimpleNamespace(remote=self.events.append)


@pytest.fixture
def sleeper():
    code = "import threading; print('ready', flush=True); threading.Event().wait()"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline() == "ready\n"  # blocked from here on
    yield child
    child.kill()
    child.wait()


def test_the_watch_reports_a_hang_once_with_the_stuck_process_stack(sleeper, tmp_path):
    now = time.time()
    beats = {
        0: beat(0, "collective", 9, now - 20, pid=sleeper.pid, now=now),
        1: beat(1, "data", 9, now - 25, pid=sleeper.pid, now=now),
    }
    watch, board = HangWatch("gw-x", "alert", 2, tmp_path), Board()
    hang = watch.check({"heartbeats": beats}, board)
    assert hang is not None and watch.failure is None
    assert len(board.events) == 1 and board.events[0]["name"] == "hang" and board.events[0]["on_hang"] == "alert"
    assert "Event.wait" in board.events[0]["stack"], board.events[0]["stack"]  # py-spy's dump of the process
    assert (tmp_path / "hang-step9-rank1.txt").read_text().startswith(hang.message)
    assert watch.check({"heartbeats": beats}, board) is None and len(board.events) == 1  # once


def test_on_hang_fail_and_bounded_restarts_say_why_the_job_ends(tmp_path):
    now = time.time()
    beats = {1: beat(1, "data", 9, now - 25, pid=999_999_999, now=now)}
    fail = HangWatch("gw-x", "fail", 2)
    fail.check({"heartbeats": beats}, Board())
    assert fail.failure and fail.failure.startswith("hung: rank 1 on node 10.0.0.1 stuck in data loading of step 9")
    restart = HangWatch("gw-x", "restart", 1)
    board = Board()
    restart.check({"heartbeats": beats}, board)
    assert restart.failure is None and restart.restarts == 1 and board.events[0]["on_hang"] == "restart"
    again = {1: beat(1, "data", 9, now - 20, pid=999_999_998, now=now)}  # the restarted group hangs again
    restart.check({"heartbeats": again}, board)
    assert restart.failure and restart.failure.startswith("hung again after 1 restarts (max_hang_restarts)")


def test_a_stack_of_a_process_that_is_not_there_says_so():
    assert dump_stack(999_999_999).startswith("no stack: py-spy dump --pid 999999999 exited")


def test_the_spec_bounds_hang_after_and_on_hang():
    base = {"name": "x", "model": {"name": "mlp"}, "data": {"name": "digits"}, "max_steps": 10}
    with pytest.raises(SpecError) as error:
        load_spec({**base, "telemetry": {"hang_after": 5}})
    assert any(e.startswith("telemetry.hang_after:") for e in error.value.errors), error.value.errors
    with pytest.raises(SpecError) as error:
        load_spec({**base, "on_hang": "reboot"})
    assert any(e.startswith("on_hang:") for e in error.value.errors), error.value.errors
    assert load_spec({**base, "telemetry": {"hang_after": 10}}).telemetry.hang_after == 10.0
    assert process_group_timeout(10.0) == 300.0 and process_group_timeout(600.0) == 3000.0
