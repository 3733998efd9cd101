"""Heartbeats per rank and hang detection: where each rank is in its step, and who is stuck.

Each rank's `Heartbeat` holds the step it is in, the phase of that step (data, forward, backward,
collective, optimizer, checkpoint) and the time it entered the phase. Entering a phase is one clock
read and a few attribute writes on the training thread: no collective, no tensor, no host sync.
A daemon thread posts the heartbeat to the job board once a second (it runs while the training
thread is blocked in a collective or a data loader), and a Prometheus collector exports it at
scrape time with bounded labels (`step_phase`, six values).

The driver's `HangWatch` reads the board's heartbeats: a rank that stayed in one phase longer than
its hang threshold (`telemetry.hang_after`, or HANG_STEP_MULTIPLE times its median step time when
that is longer) is stuck. It names the rank, its node, the step and the phase, and where the other
ranks wait, captures the stuck ranks' Python stacks with py-spy on their nodes, and says what to do
by the spec's `on_hang`.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("gradwatch.heartbeat")

# The phases of a step, in their order; exported as the `step_phase` label (`phase` is the training phase's).
PHASES: tuple[str, ...] = ("data", "forward", "backward", "collective", "optimizer", "checkpoint")
DATA, FORWARD, BACKWARD, COLLECTIVE, OPTIMIZER, CHECKPOINT = range(len(PHASES))
# Where a rank stopped, in a person's words.
WHERE: dict[str, str] = {
    "data": "data loading",
    "forward": "the forward pass",
    "backward": "the backward pass",
    "collective": "the gradient all-reduce",
    "optimizer": "the optimizer update",
    "checkpoint": "a checkpoint",
}
# What a straggler is slower in (TrainingStraggler's `cause`): the phases each cause covers.
CAUSES: dict[str, tuple[str, ...]] = {
    "data loading": ("data",),
    "compute": ("forward", "backward", "optimizer"),
    "communication": ("collective",),
}
HEARTBEAT_SECONDS = 1.0  # how often a rank posts its heartbeat to the board
HANG_STEP_MULTIPLE = 10.0  # a rank is stuck after this many median step times, when longer than hang_after
STEP_WINDOW = 64  # recent step times the median is taken over
# A heartbeat not posted for this long is from a process that is gone (Ray Train restarts or fails the
# group on its own): not a hang.
STALE_S = 10.0
STACK_TIMEOUT_S = 20.0  # py-spy's limit per stack
MAX_STACK_CHARS = 8000  # a stack kept in an event; the whole one goes to the run directory


class Heartbeat:
    """One rank's place in its step. `enter(phase, step)` is all the training thread does."""

    def __init__(self, job_id: str, rank: int, hang_after: float):
        self.job_id, self.rank, self.hang_after = job_id, rank, hang_after
        self.step = 0
        self.phase = DATA
        self.entered = time.time()
        self.seconds = [0.0] * len(PHASES)  # time spent in each phase so far
        self._step_started = self.entered
        self._durations = [0.0] * STEP_WINDOW  # the last step times, a ring
        self._n_durations = 0
        self.done = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def enter(self, phase: int, step: int | None = None) -> None:
        """This rank enters `phase` (of `step`, when a new step starts)."""
        now = time.time()
        self.seconds[self.phase] += now - self.entered
        self.phase, self.entered = phase, now
        if step is not None and step != self.step:
            if self.step:
                self._durations[self._n_durations % STEP_WINDOW] = now - self._step_started
                self._n_durations += 1
            self.step, self._step_started = step, now

    def median_step_seconds(self) -> float | None:
        n = min(self._n_durations, STEP_WINDOW)
        return statistics.median(self._durations[:n]) if n else None

    def threshold(self) -> float:
        """Seconds in one phase after which this rank counts as stuck."""
        median = self.median_step_seconds()
        return max(self.hang_after, HANG_STEP_MULTIPLE * median) if median else self.hang_after

    def stuck_seconds(self, now: float | None = None) -> float:
        return 0.0 if self.done else max(0.0, (now or time.time()) - self.entered)

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        seconds = list(self.seconds)
        if not self.done:
            seconds[self.phase] += now - self.entered
        return {
            "rank": self.rank,
            "step": self.step,
            "phase": PHASES[self.phase],
            "entered": self.entered,
            "hang_after": self.threshold(),
            "seconds": dict(zip(PHASES, seconds, strict=True)),
            "done": self.done,
            "posted_at": now,
        }

    # ------------------------------------------------------------- posting
    def start(self, board: Any, node: str | None, host: str) -> None:
        """Post the heartbeat to the job board every HEARTBEAT_SECONDS from a daemon thread."""
        if board is None or self._thread is not None:
            return
        where = {"pid": os.getpid(), "node": node, "host": host}

        def post() -> None:
            while True:
                try:
                    board.post_heartbeat(self.rank, {**self.snapshot(), **where})
                except Exception as exc:  # noqa: BLE001 - a board gone away ends the job anyway
                    log.debug("heartbeat not posted: %s", exc)
                if self.done:  # posted once more after stop(): the driver sees it is done
                    return
                self._stop.wait(HEARTBEAT_SECONDS)

        self._thread = threading.Thread(target=post, name=f"gradwatch-heartbeat-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The rank is done training: its heartbeat says so once more, then stops."""
        self.done = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class HeartbeatCollector:
    """The heartbeat as Prometheus series, read at scrape time (the training thread writes none)."""

    def __init__(self, heartbeat: Heartbeat):
        self.heartbeat = heartbeat

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        hb, labels = self.heartbeat, [self.heartbeat.job_id, str(self.heartbeat.rank)]
        snap = hb.snapshot()
        step = GaugeMetricFamily(
            "gradwatch_rank_step", "The step this rank is in (the last finished one plus 1).", labels=["job_id", "rank"]
        )
        step.add_metric(labels, snap["step"])
        yield step
        phase = GaugeMetricFamily(
            "gradwatch_rank_step_phase",
            "1 for the phase of the step this rank is in.",
            labels=["job_id", "rank", "step_phase"],
        )
        for name in PHASES:
            phase.add_metric([*labels, name], 1.0 if name == snap["phase"] and not hb.done else 0.0)
        yield phase
        stuck = GaugeMetricFamily(
            "gradwatch_rank_stuck_seconds",
            "Seconds this rank has been in its current phase (0 once it is done).",
            labels=["job_id", "rank"],
        )
        stuck.add_metric(labels, hb.stuck_seconds())
        yield stuck
        after = GaugeMetricFamily(
            "gradwatch_rank_hang_after_seconds",
            "Seconds in one phase after which this rank counts as hung (telemetry.hang_after or "
            f"{HANG_STEP_MULTIPLE:g} median step times).",
            labels=["job_id", "rank"],
        )
        after.add_metric(labels, snap["hang_after"])
        yield after
        spent = CounterMetricFamily(
            "gradwatch_step_phase_seconds",
            "Time this rank spent in each phase of its steps.",
            labels=["job_id", "rank", "step_phase"],
        )
        for name in PHASES:
            spent.add_metric([*labels, name], snap["seconds"][name])
        yield spent


SERIES_PER_RANK = 1 + len(PHASES) + 1 + 1 + len(PHASES)  # what HeartbeatCollector exports per rank


# ----------------------------------------------------------------- the driver's side
def process_group_timeout(hang_after: float) -> float:
    """The process group's timeout (gloo/NCCL): long after a hang is reported, so the report comes first."""
    return max(300.0, 5.0 * hang_after)


@dataclass
class Hang:
    """A stuck job: the rank that stopped and where, and where the others wait."""

    rank: int
    node: str | None
    step: int
    phase: str
    seconds: float
    pid: int | None
    message: str
    waiting: list[dict[str, Any]] = field(default_factory=list)
    stacks: dict[int, str] = field(default_factory=dict)

    def event(self, action: str) -> dict[str, Any]:
        stack = self.stacks.get(self.rank, "")
        return {
            "kind": "anomaly",
            "name": "hang",
            "step": self.step,
            "rank": self.rank,
            "node": self.node,
            "phase": self.phase,
            "stuck_seconds": round(self.seconds, 1),
            "on_hang": action,
            "detail": self.message,
            "stack": stack[:MAX_STACK_CHARS],
            "time": time.time(),
        }


def judge(heartbeats: dict[Any, dict[str, Any]], now: float, ignore_pids: set[int] | None = None) -> Hang | None:
    """The hang in these heartbeats, if a rank stayed in one phase past its threshold; else None.

    The stuck rank is the one not waiting in the collective (the others wait for it there); when every
    stuck rank waits in it, the one that entered it first.
    """
    live = {
        int(r): hb
        for r, hb in heartbeats.items()
        if not hb.get("done") and hb.get("pid") not in (ignore_pids or set()) and now - hb["posted_at"] <= STALE_S
    }
    stuck = {r: now - hb["entered"] for r, hb in live.items() if now - hb["entered"] > hb["hang_after"]}
    if not stuck:
        return None
    culprits = [r for r in stuck if live[r]["phase"] != "collective"] or list(stuck)
    rank = min(culprits, key=lambda r: live[r]["entered"])
    hb = live[rank]
    node = hb.get("host") or hb.get("node")
    message = f"rank {rank} on node {node} stuck in {WHERE[hb['phase']]} of step {hb['step']} for {stuck[rank]:.0f} s"
    waiting = []
    for other in sorted(live):
        if other == rank:
            continue
        o = live[other]
        waiting.append({"rank": other, "phase": o["phase"], "step": o["step"], "seconds": now - o["entered"]})
        verb = "waits in" if o["phase"] == "collective" else "is in"
        message += f"; rank {other} {verb} {WHERE[o['phase']]} of step {o['step']}"
    return Hang(rank, node, hb["step"], hb["phase"], stuck[rank], hb.get("pid"), message, waiting)


def _py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def dump_stack(pid: int) -> str:
    """The Python stack of every thread of process `pid` on this machine (py-spy), or why there is none."""
    tool = _py_spy()
    if tool is None:
        return "no stack: py-spy is not installed on this node (pip install py-spy)"
    try:
        out = subprocess.run([tool, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=STACK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"no stack: py-spy dump --pid {pid} took over {STACK_TIMEOUT_S:g} s"
    if out.returncode != 0:
        return f"no stack: py-spy dump --pid {pid} exited {out.returncode}: {(out.stderr or out.stdout).strip()}"
    return out.stdout


def kill_process(pid: int) -> str:
    """SIGKILL process `pid` on this machine; what happened, in words."""
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"process {pid} was already gone"
    return f"killed process {pid}"


def on_node(node: str | None, fn: Any, *args: Any, timeout: float = STACK_TIMEOUT_S + 10) -> Any:
    """Run `fn(*args)` on Ray node `node` (the stuck worker's), or here without one; None if it could not run."""
    if node is None:
        return fn(*args)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(fn).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    try:
        return ray.get(task.remote(*args), timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - the hang is reported without it
        return f"could not run on node {node}: {exc}"


class HangWatch:
    """The driver's watch on the board's heartbeats: reports each hang once and says what to do about it."""

    def __init__(self, job_id: str, on_hang: str, max_restarts: int, run_dir: Path | None = None):
        self.job_id, self.on_hang, self.max_restarts, self.run_dir = job_id, on_hang, max_restarts, run_dir
        self.restarts = 0
        self.reported: set[tuple[int | None, float]] = set()  # (pid, entered) of each hang reported
        self.acted: set[int] = set()  # pids killed for a restart: their last heartbeats are stale
        self.failure: str | None = None  # why the job must end failed (on_hang: fail, or restarts used up)

    def check(self, snap: dict[str, Any], board: Any, nodes: dict[Any, str] | None = None) -> Hang | None:
        """Look at the snapshot's heartbeats; a new hang is reported (event, log, stacks) and acted on."""
        heartbeats = snap.get("heartbeats") or {}
        hang = judge(heartbeats, time.time(), self.acted)
        if hang is None:
            return None
        key = (hang.pid, heartbeats.get(hang.rank, heartbeats.get(str(hang.rank), {})).get("entered", 0.0))
        if key in self.reported:
            return None
        self.reported.add(key)
        ray_nodes = {int(r): n for r, n in (nodes or {}).items()}
        stuck = [hang.rank] + [w["rank"] for w in hang.waiting if w["seconds"] > heartbeats_threshold(heartbeats, w)]
        for rank in stuck[:4]:
            hb = heartbeats.get(rank) or heartbeats.get(str(rank)) or {}
            if hb.get("pid"):
                hang.stacks[rank] = on_node(hb.get("node") or ray_nodes.get(rank), dump_stack, hb["pid"])
        action = self._decide(hang)
        event = hang.event(action)
        self._keep(hang)
        log.error("job %s: %s (on_hang: %s)", self.job_id, hang.message, action)
        print(f"[{self.job_id}] HANG {hang.message}; on_hang: {action}", flush=True)
        for rank, stack in hang.stacks.items():
            print(f"[{self.job_id}] stack of rank {rank}:\n{stack}", flush=True)
        board.post_event.remote(event)
        if action == "restart" and hang.pid is not None:
            hb = heartbeats.get(hang.rank) or heartbeats.get(str(hang.rank)) or {}
            print(f"[{self.job_id}] {on_node(hb.get('node'), kill_process, hang.pid)} (rank {hang.rank})", flush=True)
            for other in heartbeats.values():  # the whole group restarts: none of these heartbeats counts again
                if other.get("pid") is not None:
                    self.acted.add(other["pid"])
        return hang

    def _decide(self, hang: Hang) -> str:
        if self.on_hang == "fail":
            self.failure = f"hung: {hang.message} (on_hang: fail)"
            return "fail"
        if self.on_hang == "restart":
            if self.restarts >= self.max_restarts:
                self.failure = f"hung again after {self.restarts} restarts (max_hang_restarts): {hang.message}"
                return "fail"
            self.restarts += 1
            return "restart"
        return "alert"

    def _keep(self, hang: Hang) -> None:
        """The stacks, whole, in the run directory beside the job's other files."""
        if self.run_dir is None:
            return
        for rank, stack in hang.stacks.items():
            path = self.run_dir / f"hang-step{hang.step}-rank{rank}.txt"
            try:
                path.write_text(f"{hang.message}\n\n{stack}")
            except OSError as exc:
                log.warning("could not write %s: %s", path, exc)


def heartbeats_threshold(heartbeats: dict[Any, dict[str, Any]], waiting: dict[str, Any]) -> float:
    hb = heartbeats.get(waiting["rank"]) or heartbeats.get(str(waiting["rank"])) or {}
    return float(hb.get("hang_after", 0.0))
