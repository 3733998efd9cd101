"""The driver of one job: starts Ray Train's TorchTrainer and watches it.

Used by `gradwatch run` (foreground, live display) and by the service, which
submits `python -m workers.driver --spec-file F --job-id ID --storage-path DIR`
as a Ray job. While the job runs the driver rewrites `DIR/ID/status.json`
about every second; at the end it writes `DIR/ID/result.json`: the run's
artifacts. Under the service it pushes both over HTTP (workers/push.py), the
one way the service learns a running job's status.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from gradwatch.ids import new_job_id
from gradwatch.names import RAY_TRAIN_ENV, JobState
from gradwatch.spec import JobSpec, SpecError, load_spec, overran
from gradwatch.status import (
    RESULT_FILE,
    STATUS_FILE,
    Endpoint,
    RunResult,
    RunStatus,
    event_line,
    target_groups,
    write_atomic,
    write_record,
)
from workers.board import BoardClient, create_board_actor
from workers.heartbeat import HangWatch, process_group_timeout
from workers.placement import NodeWatch, PlacementImpossible, check_placement, strategy
from workers.push import Pusher
from workers.rank_output import OUTPUT_MARK_LINE, RANK_LINE, with_rank_output

log = logging.getLogger("gradwatch.driver")
STOP_WAIT_S = 30.0  # how long a job cut short waits for fit() to return: after the abort, again after Ray's shutdown
# Told each status as it is written and the job's events since the last one.
Listener = Callable[[RunStatus, list[dict[str, Any]]], None]


class ClusterTooSmall(RuntimeError):
    pass


def check_cluster(spec: JobSpec) -> None:
    """Fail at once when the cluster can never run the job (Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    for resource, amount in spec.scaling.demand().items():
        have = total.get(resource, 0.0)
        if have < amount:
            what = "GPUs" if resource == "GPU" else "CPUs"
            hint = (
                " (scaling.use_gpu: true needs one GPU per worker; set use_gpu: false to train on CPUs)"
                if resource == "GPU"
                else " (lower scaling.num_workers or scaling.cpus_per_worker)"
            )
            raise ClusterTooSmall(
                f"the job needs {amount:g} {what} ({spec.scaling.num_workers} workers) but the "
                f"Ray cluster has {have:g}{hint}"
            )
    try:
        check_placement(spec, ray.nodes())
    except PlacementImpossible as exc:
        raise ClusterTooSmall(str(exc)) from None


def init_ray(quiet: bool = True, log_dir: Path | None = None) -> None:
    """Connect to RAY_ADDRESS, else start a local Ray. The workers' output reaches this process
    (`log_to_driver`) and WorkerOutput shows their ranks' own lines; Ray's and gradwatch's other
    worker output only when not `quiet`."""
    import ray

    worker_output.verbose = not quiet
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A local Ray's processes inherit them; the service's jobs get them in their runtime environment.
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR if quiet else logging.INFO, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        kwargs.update(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    # No RAY_ADDRESS: a fresh local Ray, never whatever cluster happens to run on this machine.
    ray.init(address=address or "local", **kwargs)
    worker_output.install()


class WorkerOutput:
    """Takes the place of Ray's printer of the workers' output (its handler "ray_print_logs"): a rank's
    own lines (`[rank N] line`, workers/rank_output.rank_output) are printed as they are, to stdout or
    stderr as the rank wrote them (or all to `sink`); the rest (Ray's worker start lines, Ray Train's
    banners and warnings, gradwatch's worker logs) goes to Ray's printer only when `verbose`."""

    HANDLER = "gradwatch_worker_output"

    def __init__(self) -> None:
        self.verbose = False
        self.sink: TextIO | None = None
        self.ray_printer: Callable[[dict[str, Any]], None] | None = None
        # job id -> "begin"/"end" -> (rank, is_err) of the marks seen (workers/rank_output.OUTPUT_MARK)
        self.marks: dict[str, dict[str, set[tuple[int, bool]]]] = {}
        self.lock = threading.Condition()

    def install(self) -> bool:
        """Replace Ray's printer with this one; False when this process gets no worker output (Ray was
        started without `log_to_driver`)."""
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        thread = getattr(ray_worker.global_worker, "logger_thread", None)
        if thread is None or not thread.is_alive():
            return False
        with dispatcher._lock:
            handlers = dict(dispatcher.handlers)
        if "ray_print_logs" in handlers:  # each ray.init adds it again
            self.ray_printer = handlers["ray_print_logs"]
            dispatcher.remove_handler("ray_print_logs")
        if self.HANDLER not in handlers:
            dispatcher.add_handler(self.HANDLER, self)
        return True

    def __call__(self, data: dict[str, Any]) -> None:
        others = []
        for line in data.get("lines", []):
            if RANK_LINE.match(line):
                sink = self.sink or (sys.stderr if data.get("is_err") else sys.stdout)
                print(line, file=sink, flush=True)
            elif (mark := OUTPUT_MARK_LINE.fullmatch(line)) is not None:
                with self.lock:
                    marks = self.marks.setdefault(mark["job"], {"begin": set(), "end": set()})
                    marks[mark["what"]].add((int(mark["rank"]), bool(data.get("is_err"))))
                    self.lock.notify_all()
            elif self.verbose:
                others.append(line)
        if others and self.ray_printer is not None:
            self.ray_printer({**data, "lines": others})

    def wait(self, job_id: str, world_size: int | None, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until the output of every rank of the job that began has
        arrived, and with `world_size` until all of its ranks began: Ray forwards a line a moment after
        the rank wrote it, and a Ray shut down before then loses it."""

        def complete() -> bool:
            marks = self.marks.get(job_id, {"begin": set(), "end": set()})
            began = {rank for rank, _ in marks["begin"]}
            if world_size is not None and len(began) < world_size:
                return False
            return all((rank, is_err) in marks["end"] for rank in began for is_err in (False, True))

        with self.lock:
            done = self.lock.wait_for(complete, timeout)
            self.marks.pop(job_id, None)
        return done


OUTPUT_WAIT_S = 5.0  # how long a finished job waits for its ranks' last output lines
worker_output = WorkerOutput()


class JobWatch:
    """Polls the job board, keeps status.json and the Prometheus file_sd up to date, and tells listeners."""

    def __init__(
        self,
        job_id: str,
        run_dir: Path,
        board,
        sd_file: Path | None,
        listeners: list[Listener],
        nodes: NodeWatch | None = None,
    ):
        self.job_id, self.run_dir, self.board = job_id, run_dir, board
        self.sd_file, self.listeners = sd_file, listeners
        self.nodes = nodes
        self.n_events = 0
        self.snapshot: dict[str, Any] = {}

    def poll(self, state: JobState = "running", notify: bool = True) -> dict[str, Any]:
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(self.n_events), timeout=10)
        except Exception:  # a slow board must not stop the driver; try again next tick
            return self.snapshot
        self.n_events = snap["n_events"]
        self.snapshot = snap
        if self.nodes:
            self.nodes.update(snap.get("nodes", {}), snap.get("progress", {}).get("step"), snap.get("restarts", 0))
        if notify:
            self.publish(run_status(self.job_id, state, snap, self.node_fields()), snap["events"])
        return snap

    def node_fields(self) -> dict[str, Any]:
        return self.nodes.status() if self.nodes else {}

    def publish(self, status: RunStatus, events: list[dict[str, Any]]) -> None:
        write_record(self.run_dir / STATUS_FILE, status)
        if self.sd_file:
            write_sd_file(self.sd_file, self.job_id, status.endpoints)
        for listener in self.listeners:
            listener(status, events)


def run_status(job_id: str, state: JobState, snap: dict[str, Any], nodes: dict[str, Any] | None = None) -> RunStatus:
    """status.json from a board snapshot: rank 0's progress, the restarts, the live endpoints and the nodes."""
    return RunStatus.model_validate(
        {
            **snap.get("progress", {}),
            **(nodes or {}),
            "job_id": job_id,
            "state": state,
            "restarts": snap.get("restarts", 0),
            "rollbacks": snap.get("rollbacks", 0),
            "endpoints": snap["endpoints"] if state == "running" else [],
            "updated_at": time.time(),
        }
    )


def write_sd_file(path: Path, job_id: str, endpoints: list[Endpoint]) -> None:
    """Prometheus file_sd: this job's live endpoints, keeping other jobs' entries in the same file."""
    try:
        groups = [g for g in json.loads(path.read_text()) if g.get("labels", {}).get("job_id") != job_id]
    except (OSError, ValueError):
        groups = []
    groups += target_groups(job_id, endpoints)
    write_atomic(path, json.dumps(groups, indent=1))


def failure_reason(exc: BaseException) -> str:
    """The user's cause, not Ray's wrapping: the last lines of the innermost traceback."""
    text = str(exc)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):  # the loop's own verdict needs no traceback around it
        if "DivergenceStop: " in line:
            return line.split("DivergenceStop: ", 1)[1].strip()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            tail = lines[i:]
            return "\n".join(tail[-4:])
    return "\n".join(lines[-4:]) if lines else type(exc).__name__


def run_job(
    spec: JobSpec,
    *,
    job_id: str | None = None,
    storage_path: Path,
    sd_file: Path | None = None,
    listeners: list[Listener] | None = None,
    poll_seconds: float = 0.5,
    own_timeout: bool = True,
    verbose: bool = False,
    output: TextIO | None = None,
) -> RunResult:
    """Run one job to the end on the connected (or a new local) Ray; returns its result (result.json).

    `own_timeout`: this driver ends the job at the spec's timeout (False under the service, whose
    launcher times jobs out on its own clock). A job cut short (timeout, Ctrl-C) leaves no worker
    behind: Ray is shut down before the result is written, the trainer's actors with it.
    The ranks' own stdout and stderr lines are printed here as `[rank N] line` as they come: on
    stdout and stderr as the ranks wrote them, or all on `output`; `verbose`: Ray's worker output too.
    """
    job_id = job_id or new_job_id()
    storage_path = Path(storage_path).resolve()
    run_dir = storage_path / job_id
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "spec.json", spec.model_dump_json(indent=1))
    started = time.time()
    init_ray(quiet=not verbose)
    worker_output.sink = output
    forwarded = worker_output.install()
    watch = JobWatch(job_id, run_dir, create_board_actor(job_id), sd_file, listeners or [], NodeWatch(spec))
    fit = Fit(spec, job_id, run_dir, storage_path, watch.board)
    fit.start()
    state, error = follow(fit, watch, spec.timeout if own_timeout else None, started, poll_seconds)
    snap = watch.poll(notify=False)
    if fit.is_alive():  # cut short: the trainer's workers must not train on unseen
        if abort_trainer(watch.board):  # as Ray Train aborts on Ctrl-C: its workers stopped, fit() returns
            fit.join(STOP_WAIT_S)
        # Else (no controller on the board yet, or no answer) only the shutdown is left: a fit() blocked in
        # Ray's get on the controller can stay blocked through it; the join gives up after STOP_WAIT_S, and
        # no Ray is left to train.
        stop_ray()
        fit.join(STOP_WAIT_S)
    else:
        state, error = ("failed", explain_failure(fit.error, watch, snap)) if fit.error else ("succeeded", None)
        if forwarded:  # the ranks' last lines may still be on their way; a job that failed waits for those that began
            worker_output.wait(job_id, None if fit.error else spec.scaling.num_workers, OUTPUT_WAIT_S)
    node_fields = watch.node_fields()
    result = run_result(job_id, spec, run_dir, snap, state, error, time.time() - started, node_fields)
    if state == "succeeded":
        result.warning = unhealthy_ending(snap)
    watch.publish(
        run_status(job_id, state, snap, {**node_fields, "waiting": None, "warning": result.warning}),
        snap.get("events", []),
    )
    write_record(run_dir / RESULT_FILE, result)
    return result


def explain_failure(error: BaseException, watch: JobWatch, snap: dict[str, Any]) -> str:
    """The cause, and when a worker's node went away, which node and where the run stood."""
    if watch.nodes and lost_a_worker(error):
        watch.nodes.confirm_loss(snap.get("progress", {}).get("step"), snap.get("restarts", 0))
    reason = failure_reason(error)
    return watch.nodes.explain(reason) if watch.nodes else reason


def unhealthy_ending(snap: dict[str, Any]) -> str | None:
    """Why a run that reached its last step is still no plain success, or None when it is one."""
    final, progress = snap.get("final", {}), snap.get("progress", {})
    problems = []
    loss = final.get("train_loss", progress.get("train_loss"))  # raw: the result's own holds no NaN
    if isinstance(loss, float) and not math.isfinite(loss):
        problems.append(f"its final train loss is {loss}")
    held = progress.get("anomalies") or {}
    if held.get("divergence"):
        problems.append("it was still diverging at the end")
    # a run that stopped learning for good (dead layers, a dead run, a schedule at 0) is no plain success
    broken = [
        kind for kind in ("dead_run", "lr_schedule", "vanishing_gradients", "exploding_gradients") if held.get(kind)
    ]
    if broken:
        problems.append(f"it ended with {', '.join(broken)} held")
    elif progress.get("phase") == "stalled":
        problems.append("it ended stalled (the loss flat without learning)")
    return " and ".join(problems) or None


def lost_a_worker(exc: BaseException) -> bool:
    """Whether a failure looks like a worker process or its node going away (not a bug in the loop)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(
        word in text
        for word in (
            "ActorDiedError",
            "ActorUnavailableError",
            "node",
            "Connection reset",
            "Connection closed by peer",
            "died",
        )
    )


def abort_trainer(board: Any) -> bool:
    """Abort the job's Ray Train controller (its own abort: the worker group stopped, then the controller's
    process ends, so `fit()` returns); False when it has not started yet or does not answer."""
    import ray

    try:
        controller = ray.get(board.get_trainer.remote(), timeout=10)
        if controller is None:
            return False
        ray.get(controller.abort.remote(), timeout=STOP_WAIT_S)
    except ray.exceptions.RayActorError:  # the abort ends the controller's process: its answer never comes
        return True
    except Exception as exc:  # noqa: BLE001 - the caller shuts Ray down anyway
        log.warning("could not abort the trainer (%s); shutting Ray down", exc)
        return False
    return True


def trainer_on_board(board: Any) -> Any:
    """A Ray Train controller callback that posts the controller's actor to the job's board when it starts,
    so the driver can abort a job cut short the way Ray Train does on Ctrl-C (only the main thread gets
    that handler; fit() runs in Fit). Made here: Ray Train's modules take a second to import."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class TrainerOnBoard(ControllerCallback):
        def __init__(self, board: Any):
            self.board = board

        def after_controller_start(self, train_run_context: Any) -> None:
            import ray

            self.board.set_trainer.remote(ray.get_runtime_context().current_actor)

    return TrainerOnBoard(board)


class Fit(threading.Thread):
    """Ray Train's `fit()` of the job, in a thread of its own so the driver can watch it."""

    def __init__(self, spec: JobSpec, job_id: str, run_dir: Path, storage_path: Path, board: Any):
        super().__init__(name=f"fit-{job_id}", daemon=True)
        self.spec, self.job_id, self.run_dir, self.storage_path = spec, job_id, run_dir, storage_path
        self.board = board
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            check_cluster(self.spec)
            self.trainer().fit()
        except BaseException as exc:  # reported by run_job, with its cause
            self.error = exc

    def trainer(self) -> Any:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from gradwatch.spec import EntrypointTrain
        from workers.entrypoint import train_function_per_worker
        from workers.loop import train_loop_per_worker

        spec = self.spec
        per_worker = train_function_per_worker if isinstance(spec.train, EntrypointTrain) else train_loop_per_worker
        return TorchTrainer(
            with_rank_output(per_worker),
            train_loop_config={
                "spec": spec.model_dump(mode="json"),
                "job_id": self.job_id,
                "run_dir": str(self.run_dir),
                "serve_metrics": spec.telemetry.enabled,
            },
            # explicit, and long after a hang is reported (workers/heartbeat.py): gloo/NCCL errors come second
            torch_config=TorchConfig(
                backend="nccl" if spec.scaling.use_gpu else "gloo",
                timeout_s=int(process_group_timeout(spec.telemetry.hang_after)),
            ),
            scaling_config=ScalingConfig(
                num_workers=spec.scaling.num_workers,
                use_gpu=spec.scaling.use_gpu,
                placement_strategy=strategy(spec),
                resources_per_worker=spec.scaling.per_worker(),
            ),
            run_config=RunConfig(
                name=self.job_id,
                storage_path=str(self.storage_path),
                failure_config=FailureConfig(max_failures=worker_group_restarts(spec)),
                checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
                callbacks=[trainer_on_board(self.board)],
            ),
        )


def worker_group_restarts(spec: JobSpec) -> int:
    """Ray Train's failure budget: the spec's max_failures, and with on_hang: restart its hang restarts too."""
    if spec.max_failures == -1 or spec.on_hang != "restart":
        return spec.max_failures
    return spec.max_failures + spec.max_hang_restarts


def follow(
    fit: Fit, watch: JobWatch, timeout: float | None, started: float, poll_seconds: float
) -> tuple[JobState, str | None]:
    """Watch the job until `fit` ends, `timeout` passes, a hang fails it (on_hang) or Ctrl-C; the state
    so far (the caller settles it once fit has ended)."""
    spec = fit.spec
    hangs = HangWatch(watch.job_id, spec.on_hang, spec.max_hang_restarts, watch.run_dir)
    try:
        while fit.is_alive():
            fit.join(poll_seconds)
            snap = watch.poll()
            if snap and hangs.check(snap, watch.board, snap.get("nodes")) and hangs.failure:
                watch.poll()  # the hang event reaches status.json and the listeners before the job ends
                return "failed", hangs.failure
            reason = overran(timeout, time.time() - started)
            if reason is not None:
                return "timed_out", reason
    except KeyboardInterrupt:
        return "cancelled", "interrupted (Ctrl-C): workers stopped"
    return "failed", None


def run_result(
    job_id: str,
    spec: JobSpec,
    run_dir: Path,
    snap: dict[str, Any],
    state: JobState,
    error: str | None,
    seconds: float,
    node_fields: dict[str, Any] | None = None,
) -> RunResult:
    """result.json from the board's last snapshot: rank 0's final report, else its last progress."""
    final, progress, nodes = snap.get("final", {}), snap.get("progress", {}), node_fields or {}
    extra = final.get("extra", {})
    ranks = snap.get("ranks", {})
    return RunResult(
        job_id=job_id,
        state=state,
        error=error,
        world_size=spec.scaling.num_workers,
        run_dir=str(run_dir),
        steps=final.get("steps", progress.get("step", 0)) or 0,
        train_loss=final.get("train_loss", progress.get("train_loss")),
        val_loss=final.get("val_loss"),
        val_accuracy=final.get("val_accuracy"),
        first_val_loss=final.get("first_val_loss"),
        restarts=snap.get("restarts", 0),
        rollbacks=snap.get("rollbacks", 0),
        phases=extra.get("phases", []),
        anomalies=extra.get("anomalies", []),
        wall_seconds=round(seconds, 3),
        ranks=[ranks[rank] for rank in sorted(ranks)],
        nodes=nodes.get("nodes", {}),
        lost_nodes=nodes.get("lost_nodes", []),
        workers=[
            {
                "rank": int(r),
                "node": (snap.get("nodes") or {}).get(r),
                "steps": rep.get("steps"),
                "param_hash": rep.get("param_hash"),
            }
            for r, rep in sorted(ranks.items())
        ],
    )


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


_printed_step: dict[str, int] = {}  # job id -> the step of its last progress line


def _print_listener(status: RunStatus, events: list[dict[str, Any]]) -> None:
    for event in events:
        print(f"[{status.job_id}] {event_line(event)}", flush=True)
    if status.step and status.step != _printed_step.get(status.job_id):
        _printed_step[status.job_id] = status.step
        loss = "None" if status.train_loss is None else f"{status.train_loss:.4f}"
        print(f"[{status.job_id}] step {status.step}/{status.max_steps} loss {loss} phase {status.phase}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.driver", description=__doc__.split("\n")[0])
    parser.add_argument("--spec-file", required=True, type=Path)
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--storage-path", required=True, type=Path)
    parser.add_argument("--prometheus-sd-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # A Ray job stop sends SIGTERM: leave through the normal path so the workers are stopped with us.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        # The service sends the spec along (GRADWATCH_SPEC_JSON): its own disk may be out of reach.
        inline = os.environ.get("GRADWATCH_SPEC_JSON")
        spec = load_spec(json.loads(inline) if inline else args.spec_file, user_code="skip")
    except SpecError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 2
    pusher = Pusher.from_env(args.job_id)  # progress and result to the service over HTTP
    result = run_job(
        spec,
        job_id=args.job_id,
        storage_path=args.storage_path,
        sd_file=args.prometheus_sd_file,
        listeners=[_print_listener, *([pusher.listener] if pusher else [])],
        own_timeout=False,  # the service's launcher times its jobs out
    )
    if pusher and not pusher.finish(result):
        print(
            f"job {args.job_id}: could not report the result to the service; it is in {result.run_dir}/result.json",
            file=sys.stderr,
            flush=True,
        )
    print(result.model_dump_json(), flush=True)
    if result.state != "succeeded":
        print(f"job {args.job_id} {result.state}: {result.error}", file=sys.stderr, flush=True)
        stop_ray()
        return 1
    if result.warning:
        print(f"job {args.job_id} reached its last step, but {result.warning}", file=sys.stderr, flush=True)
    stop_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["run_job", "check_cluster", "ClusterTooSmall", "BoardClient"]
