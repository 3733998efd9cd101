"""The training API: gradwatch's telemetry, guards and checkpoints for any PyTorch training loop.

One object per rank, a `Run`, made by `gradwatch.start()`:

    run = gradwatch.start()                            # in a gradwatch job: its id, rank and spec
    optimizer = run.watch(model, optimizer)            # per-layer norms, update ratios, noise scale
    state = run.restore()                              # after a restart: the last checkpoint's state
    while run.step < run.max_steps:
        loss = ...
        optimizer.zero_grad()
        run.backward(loss, losses={"recon": r, "reg": g}, samples=len(x))  # True when the update is safe
        optimizer.step()                               # skips an unsafe update by itself
        if run.step % 100 == 0:
            run.save_checkpoint({"epoch": epoch})
    run.finish()

Whether an update is safe is decided on values that are identical on every rank (the all-reduced
loss and gradient norm), so all ranks skip together and the replicas stay equal. The built-in
loop (workers/loop.py) runs on this same API.

`Run` is the facade; its parts, each with a narrow interface of its own, are in workers/run/: the update
guard (guard.py), the recording (recording.py), checkpoints with rollback and rewind (checkpoints.py), and
progress and the end (progress.py).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from gradwatch.ids import new_job_id
from gradwatch.spec import EntrypointTrain, JobSpec, RollbackSpec
from gradwatch.spec_telemetry import TelemetrySpec
from workers.board import BoardClient
from workers.heartbeat import BACKWARD, CHECKPOINT, DATA, OPTIMIZER, Heartbeat, HeartbeatCollector
from workers.rewind import BatchLog, replay_batches, replayable
from workers.run.checkpoints import STATE_FILE as STATE_FILE
from workers.run.checkpoints import Checkpoints
from workers.run.guard import RECOVERY_STEPS as RECOVERY_STEPS
from workers.run.guard import GuardedOptimizer, UpdateGuard
from workers.run.progress import Progress, rank_report
from workers.run.progress import reports_for_tests as reports_for_tests
from workers.run.recording import MAX_NAMED_SERIES as MAX_NAMED_SERIES
from workers.run.recording import Pending, Recorder
from workers.rundir import LocalRunDir, default_run_dir, write_optimizer
from workers.session import LocalSession, RayTrainSession, Session
from workers.system import SystemSampler
from workers.telemetry import Telemetry

log = logging.getLogger("gradwatch.training")


# A rewind's event lists at most this many skipped batches (the run's history lists them all).
MAX_LISTED_BATCHES = 64


class DivergenceStop(RuntimeError):
    """on_divergence: stop, and the run diverged."""


@dataclass
class JobContext:
    """What a gradwatch job hands the training function's ranks (set by the job's worker entry)."""

    spec: JobSpec
    job_id: str
    run_dir: Path | None
    board: BoardClient | None
    serve_metrics: bool


_job: JobContext | None = None
_run: Run | None = None


def enter_job(context: JobContext | None) -> None:
    """Set (or clear, with None) the job this process's ranks belong to; `start()` picks it up."""
    global _job, _run
    _job, _run = context, None


def current() -> Run | None:
    """The run `start()` made in this process, if any."""
    return _run


def in_job() -> bool:
    """Whether this process runs a rank of a gradwatch job (whose worker entry ends the run)."""
    return _job is not None


def start(
    *,
    job_id: str | None = None,
    max_steps: int | None = None,
    name: str = "train",
    telemetry: TelemetrySpec | dict[str, Any] | None = None,
    on_divergence: str = "alert",
    on_spike: str = "alert",
    serve_metrics: bool = True,
    sd_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    session: Session | None = None,
) -> Run:
    """Attach this rank to gradwatch; returns its `Run` (the same one if called again).

    Inside a gradwatch job every argument comes from the job (its id, spec and endpoints registry)
    and the ones given here are ignored. Elsewhere - a plain Ray Train `train_func` or a single
    process - the run uses them: `job_id` (default: a new `gw-` id; give every rank the same one),
    `max_steps` (where `run.max_steps` stops), `telemetry` (the spec's `telemetry` section),
    `on_divergence` (`alert`, `stop` or `rollback`). Each rank serves `/metrics` on a free port
    unless `serve_metrics` is false; with `sd_dir`, each rank writes its endpoint there as a
    Prometheus file_sd file (`<job_id>-<rank>.json`).

    Outside a job the run directory is `run_dir`, else `$GRADWATCH_STORAGE_PATH/<job_id>` when that
    variable is set, else `./runs/<job_id>`: rank 0 writes spec.json, status.json, result.json and the
    history there, every rank its steps-rankN.jsonl (workers/rundir.py), as a job's driver would.
    """
    global _run
    if _run is not None:
        return _run
    session = session or _default_session()
    if _job is not None:
        spec = _job.spec
        _run = Run(
            session,
            spec,
            job_id=_job.job_id,
            run_dir=_job.run_dir,
            board=_job.board,
            serve_metrics=_job.serve_metrics and spec.telemetry.enabled,
        )
        return _run
    if job_id is None and session.world_size > 1:
        raise ValueError(
            "gradwatch.start(): give every rank the same job_id (e.g. from the train_func's config); "
            "each rank would make up its own otherwise"
        )
    # The same settings a job spec would give: a training function's spec, checked by the same rules.
    settings = {
        "name": name,
        "train": {"entrypoint": "__main__:train"},
        "max_steps": max_steps or 100_000_000,
        "scaling": {"num_workers": session.world_size},
        "on_divergence": on_divergence,
        "on_spike": on_spike,
        "telemetry": telemetry.model_dump() if isinstance(telemetry, TelemetrySpec) else telemetry or {},
    }
    spec = JobSpec.model_validate(settings, context={"user_code": "skip"})
    job_id = job_id or new_job_id()
    directory = Path(run_dir).absolute() if run_dir else default_run_dir(job_id)
    local = LocalRunDir(directory, job_id, spec) if session.rank == 0 else None
    if local is None:
        directory.mkdir(parents=True, exist_ok=True)  # this rank's steps-rankN.jsonl
    _run = Run(
        session,
        spec,
        job_id=job_id,
        run_dir=directory,
        board=local.client() if local else None,
        serve_metrics=serve_metrics and spec.telemetry.enabled,
        sd_dir=Path(sd_dir) if sd_dir else None,
    )
    _run.local_dir, _run.own_run_dir = local, True
    _run.max_steps = max_steps
    return _run


def _default_session() -> Session:
    try:
        import ray.train

        ray.train.get_context()
    except (ImportError, RuntimeError):  # not inside a Ray Train worker: this process alone
        return LocalSession()
    return RayTrainSession()


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under the wrappers around it: gradwatch's `GuardedOptimizer`, accelerate's
    `AcceleratedOptimizer` (itself a torch Optimizer subclass with none of the step hooks' state) and
    Lightning's `LightningOptimizer`. Its step hooks fire when the update is really made."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"gradwatch needs a torch.optim.Optimizer (or a wrapper around one), got {type(optimizer).__name__}"
        )
    return optimizer


class Run:
    """One rank's view of a training run: what it measured, what it decided, where it stands."""

    def __init__(
        self,
        session: Session,
        spec: JobSpec,
        *,
        job_id: str,
        run_dir: Path | None = None,
        board: BoardClient | None = None,
        serve_metrics: bool = True,
        sd_dir: Path | None = None,
    ):
        self.session, self.spec, self.job_id = session, spec, job_id
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        self.run_dir, self.board, self.sd_dir = run_dir, board, sd_dir
        self.serve_metrics = serve_metrics
        self.max_steps: int | None = spec.max_steps
        self.step = 0
        self.epoch = 0
        self.last_loss = float("nan")  # this rank's loss at the last reported step
        self._stop_reason: str | None = None
        self.telemetry: Telemetry | None = None
        self.on_rollback: Callable[[dict[str, Any]], None] | None = None
        # the model, optimizer and scheduler with their checkpoints, rollbacks and rewinds (workers/run/checkpoints.py)
        self.checkpoints = Checkpoints(session, self.rank, self.device)
        # rewind-and-skip (workers/rewind.py): the rewind to make
        self._rewind_due: tuple[str, int] | None = None  # (the anomaly, the step it was seen at)
        # between a step's first gradwatch call and its decision: a rewind waits for the decision (loading the
        # weights before the backward would change tensors that the backward still needs)
        self._in_step = False
        self._batch_in_epoch = 0  # run.batches(): batches taken from the current epoch
        self.system: SystemSampler | None = None  # the system metrics' background thread (workers/system.py)
        self._pending: Pending | None = None
        # the steps' recording, the validation results and the named series (workers/run/recording.py)
        self.recorder = Recorder(self._telemetry, self.world_size, self.device)
        self._guard_due = False
        self._begun = False
        self._resumed_step: int | None = None
        self._sd_file: Path | None = None
        # progress and the end, for the driver or rank 0's own run directory (workers/run/progress.py)
        self.progress = Progress(self.rank, self.world_size, board)
        self.metrics_url: str | None = None
        # where this rank is in its step, for the hang watch (workers/heartbeat.py)
        self.heartbeat = Heartbeat(job_id, self.rank, spec.telemetry.hang_after)
        # whether each update is safe, and when skipped ones mean the run diverged (workers/run/guard.py)
        self.guard = UpdateGuard(self.world_size, self.device, self.heartbeat, spec.max_skipped_steps)

    @property
    def own_run_dir(self) -> bool:
        """start() outside a job: the ranks write the run directory themselves (rank 0's local_dir), no driver."""
        return self.progress.own_run_dir

    @own_run_dir.setter
    def own_run_dir(self, value: bool) -> None:
        self.progress.own_run_dir = value

    @property
    def local_dir(self) -> LocalRunDir | None:
        """Rank 0's run directory when the ranks write it themselves (start() outside a job)."""
        return self.progress.local_dir

    @local_dir.setter
    def local_dir(self, value: LocalRunDir | None) -> None:
        self.progress.local_dir = value

    @property
    def grad_clip(self) -> float | None:
        """The global gradient norm safe updates are clipped to (None: not clipped)."""
        return self.guard.grad_clip

    @grad_clip.setter
    def grad_clip(self, value: float | None) -> None:
        self.guard.grad_clip = value

    @property
    def model(self) -> torch.nn.Module | None:
        """The watched model (as given to `watch()`: a DDP model stays one)."""
        return self.checkpoints.model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The watched torch optimizer (under any wrappers it came in)."""
        return self.checkpoints.optimizer

    @property
    def scheduler(self) -> Any:
        """The watched learning-rate scheduler, if any."""
        return self.checkpoints.scheduler

    @property
    def rollbacks(self) -> int:
        """Rollbacks so far (kept across checkpoints)."""
        return self.checkpoints.rollbacks

    @property
    def lr_scale(self) -> float:
        """What the rollbacks scaled the learning rate by."""
        return self.checkpoints.lr_scale

    @property
    def rewinds(self) -> int:
        """Rewinds so far (kept across checkpoints)."""
        return self.checkpoints.rewinds

    @property
    def batch_log(self) -> BatchLog:
        """The batches fed per step and those a rewind left out (workers/rewind.py)."""
        return self.checkpoints.batch_log

    @property
    def first_val_loss(self) -> float | None:
        """The run's first validation loss (kept across checkpoints)."""
        return self.recorder.first_val_loss

    @first_val_loss.setter
    def first_val_loss(self, value: float | None) -> None:
        self.recorder.first_val_loss = value

    @property
    def last_val(self) -> tuple[float, float | None] | None:
        """The last validation result: (loss, accuracy or None)."""
        return self.recorder.last_val

    @property
    def safe(self) -> bool:
        """Whether the last reported step's update is applied (the same answer on every rank)."""
        return self.guard.safe

    @safe.setter
    def safe(self, value: bool) -> None:
        self.guard.safe = value

    @property
    def skipped_steps(self) -> int:
        """Updates skipped so far (non-finite, or in a rollback's skip window)."""
        return self.guard.skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.guard.skipped_steps = value

    @property
    def skip_until_step(self) -> int:
        """A rollback skips the updates of the steps before this one."""
        return self.guard.skip_until_step

    @skip_until_step.setter
    def skip_until_step(self, value: int) -> None:
        self.guard.skip_until_step = value

    # --------------------------------------------------------------- setup
    def watch(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        grad_clip: float | None = None,
        batch_size: int | None = None,
    ) -> GuardedOptimizer:
        """Measure `model` and guard `optimizer` (and `scheduler`, restored with them on a rollback).

        With a DDP model, the loss and the local gradient norms ride on DDP's own all-reduce (no extra
        collective) when the step uses `run.backward(loss)`. `grad_clip` clips the global gradient norm
        of safe updates. Returns the optimizer wrapped so that `step()` skips unsafe updates.
        """
        if self.telemetry is not None:
            raise RuntimeError("run.watch() was called twice: gradwatch watches one model and optimizer per run")
        inner = model.module if hasattr(model, "module") else model
        optimizer = inner_optimizer(optimizer)  # the hooks go on the optimizer that makes the update
        peak_lr = max(g.get("initial_lr", g["lr"]) for g in optimizer.param_groups)
        view = SimpleNamespace(
            telemetry=self.spec.telemetry,
            batch_size=batch_size or self.spec.batch_size,
            max_steps=self.max_steps,
            optimizer=SimpleNamespace(lr=peak_lr),
            schedule=self.spec.schedule,
            name=self.spec.name,
            owner=self.spec.owner,
            labels=self.spec.labels,
            model_name=(type(inner).__name__ if isinstance(self.spec.train, EntrypointTrain) else self.spec.model_name),
        )
        history = self.run_dir / "history.jsonl" if self.run_dir else None
        self.telemetry = Telemetry(
            view, self.job_id, self.rank, self.world_size, model, self.device, board=self.board, history_path=history
        )
        if "rewind" in (self.spec.on_spike, self.spec.on_divergence):
            self.telemetry.metrics.rewinds  # noqa: B018 - the series exists before the first rewind
        self.checkpoints.attach(model, optimizer, scheduler)
        self.guard.attach([p for p in model.parameters() if p.requires_grad], grad_clip)
        if self.rank == 0 and self.run_dir is not None:  # the report names what the training code made
            write_optimizer(self.run_dir, optimizer, scheduler)
        optimizer.register_step_post_hook(lambda *_: self._updated())
        self.checkpoints.good = self._snapshot(extra={})  # a rollback before the first checkpoint starts over
        self.telemetry.metrics.registry.register(HeartbeatCollector(self.heartbeat))
        if self.telemetry.hook is not None:  # the hook marks the wait in the gradient all-reduce
            self.telemetry.hook.heartbeat = self.heartbeat
        return GuardedOptimizer(self.guard, optimizer)

    def _begin(self) -> None:
        """First contact of this rank with the job: post the start, count a restart, serve /metrics."""
        if self._begun:
            return
        self._begun = True
        tel = self._telemetry()
        if self.board:
            self.board.started(self.rank, self._resumed_step, self.session.node_id())
        if self._resumed_step is not None:
            tel.metrics.restarts.labels(self.job_id, str(self.rank)).inc()
            log.warning("rank %d resumed from the checkpoint at step %d", self.rank, self._resumed_step)
            tel.record_event({"step": self._resumed_step, "event": "restart"})
        self._start_system(tel)
        if self.serve_metrics:  # after the restore, so the first scrape already counts the restart
            host, port = tel.serve(self.session.node_address())
            self.metrics_url = f"http://{host}:{port}/metrics"
            if self.sd_dir is not None:
                self._sd_file = self.sd_dir / f"{self.job_id}-{self.rank}.json"
                from gradwatch.status import Endpoint, target_groups, write_atomic

                groups = target_groups(self.job_id, [Endpoint(rank=self.rank, host=host, port=port)])
                write_atomic(self._sd_file, json.dumps(groups))
        if self.rank == 0:
            metrics = self.metrics_url or "not served (serve_metrics is off)"
            where = self.run_dir if self.run_dir is not None else "none"
            print(f"gradwatch: job {self.job_id} metrics {metrics} run directory {where}", file=sys.stderr, flush=True)
        self.recorder.restart_clock()
        self.heartbeat.enter(DATA, self.step + 1)
        self.heartbeat.start(self.board, self.session.node_id(), self.session.node_address())

    def _telemetry(self) -> Telemetry:
        if self.telemetry is None:
            raise RuntimeError(
                "call run.watch(model, optimizer) before reporting steps: gradwatch measures the "
                "model and guards the optimizer you give it"
            )
        return self.telemetry

    # ---------------------------------------------------------------- steps
    def backward(
        self, loss: torch.Tensor, *, losses: dict[str, torch.Tensor | float] | None = None, samples: int | None = None
    ) -> bool:
        """`loss.backward()` and `report()` in one: the loss mean rides on DDP's gradient all-reduce."""
        tel = self._open_step()
        before = tel.begin_step(self.step + 1)
        tel.before_backward(loss.detach() if self.world_size > 1 else None)
        self.heartbeat.enter(BACKWARD, self.step + 1)
        loss.backward()
        self.heartbeat.enter(OPTIMIZER)
        waited = tel.sync_wait_seconds(time.perf_counter())
        return self._decide(loss, losses, samples, waited, before)

    def report(
        self,
        loss: torch.Tensor | float,
        *,
        losses: dict[str, torch.Tensor | float] | None = None,
        samples: int | None = None,
    ) -> bool:
        """Report this step's loss after your own `backward()`, before `optimizer.step()`.

        Returns whether the update is safe (loss and gradient norm finite on every rank), the same
        answer on every rank. `losses` are named parts of the loss, exported per rank. Every rank
        calls it every step (with more than one rank it joins a small all-reduce).
        """
        tel = self._open_step()
        before = tel.begin_step(self.step + 1)
        return self._decide(loss, losses, samples, 0.0, before)

    def _open_step(self) -> Telemetry:
        tel = self._telemetry()
        self._in_step = True
        if tel.hook is None or tel.hook.shadow is None:  # else the hook records it while this step's all-reduce runs
            self.end_step()
        self._begin()
        return tel

    def _decide(
        self,
        loss: torch.Tensor | float,
        losses: dict[str, Any] | None,
        samples: int | None,
        waited: float,
        before: list[torch.Tensor] | None,
    ) -> bool:
        self._in_step, rewinds, rollbacks = False, self.rewinds, self.rollbacks
        self.end_step()  # the previous step recorded (if its all-reduce did not) and acted on
        # this step's gradient came from the weights before the rewind or rollback: no update, no step counted
        if self.rewinds != rewinds or self.rollbacks != rollbacks:
            self.safe = False
            return False
        tel = self._telemetry()
        terms = losses or {}
        for term in terms:
            self.recorder.check_name(term, "loss term")
        decision = self.guard.decide(tel, loss, terms, self.step)
        self.last_loss = decision.loss
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0
        n = samples or 0
        if samples and not self.recorder.samples:  # the noise scale's small batch: what one rank's step sees
            tel.batch_size = samples
            if tel.metrics.job is not None:
                tel.metrics.job.global_batch.labels(self.job_id).set(samples * self.world_size)
        self._pending = Pending(
            self.step + 1,
            decision.loss,
            decision.global_loss,
            decision.grad_norm,
            decision.param_norms,
            decision.mean_local_sq,
            decision.terms,
            n,
            waited,
            lr,
            decision.safe,
            time.perf_counter(),
            before,
            decision.local_sq,
        )
        if not self.safe:
            self.end_step()  # no update to wait for
            self.heartbeat.enter(DATA, self.step + 1)
        return self.safe

    def _updated(self) -> None:
        """The optimizer's step post-hook: the update is made, so the step can be measured and recorded.

        With the DDP hook on CPU, the recording waits for the next step's gradient all-reduce and runs
        while the other ranks catch up (the all-reduce waits for the slowest rank anyway); anything that
        needs it sooner (`end_step`, a checkpoint, validation, the end) records it first.
        """
        p = self._pending
        if p is None or not p.applied:
            return
        p.ended = time.perf_counter()
        self.step = p.step  # the loop's own counter is current at once; the recording may follow
        self.heartbeat.enter(DATA, p.step + 1)
        hook = self.telemetry.hook if self.telemetry is not None else None
        if hook is not None and hook.cpu:
            hook.shadow = self._record_pending
        else:
            self._record(p)

    def _record_pending(self) -> None:
        if self._pending is not None:
            self._record(self._pending)

    def flush(self) -> None:
        """Record the reported step and bring every series, the detectors and the history up to date.

        They take steps in batches (at most 16 steps or 0.25 s behind; a non-finite step at once), which a
        scrape every few seconds never notices; call this before reading them yourself.
        """
        self.end_step()
        if self.telemetry is not None:
            self.telemetry.flush()

    def end_step(self) -> None:
        """Record the reported step now (if its optimizer update never came) and apply the divergence guard.

        Called by itself at the next gradwatch call; call it yourself to act on a divergence at once.
        A failure to record the previous step during this step's all-reduce is raised here.
        """
        hook = self.telemetry.hook if self.telemetry is not None else None
        if hook is not None:
            hook.shadow = None  # recorded here and now
            if hook.error is not None:  # recording it during the all-reduce failed
                error, hook.error = hook.error, None
                raise RuntimeError(f"recording step {self.step} failed: {error}") from error
        pending = self._pending
        if pending is not None:
            self._record(pending)
        if self._rewind_due is not None and not self._in_step:
            (cause, seen_at), self._rewind_due = self._rewind_due, None
            self._rewind(cause, seen_at)
        # weights restored between a forward and its backward would break autograd: that waits for the backward
        if self._guard_due and not (self._in_step and self.spec.on_divergence in ("rewind", "rollback")):
            self._guard_due = False
            self._guard()
        if self._stop_reason is not None:
            reason, self._stop_reason = self._stop_reason, None
            self.finish(error=reason)  # the result keeps the run's last step, phases and anomalies
            raise DivergenceStop(reason)

    def _record(self, p: Pending) -> None:
        self._pending = None
        tel = self._telemetry()
        self.step = p.step
        self.recorder.record(p, self.epoch)
        self._guard_due = self.spec.on_divergence != "alert" and bool(tel.monitor.anomalies.get("divergence"))
        if self.spec.on_spike == "rewind" and self._rewind_due is None and tel.monitor.anomalies.get("loss_spike"):
            self._rewind_due = ("loss_spike", p.step)
        self._stop_reason = self.guard.check_skipped(self.step, p.applied, p.global_loss)
        self.post_progress(force=self.max_steps is not None and p.step >= self.max_steps)

    # -------------------------------------------------------- the guard
    def _guard(self) -> None:
        tel = self._telemetry()
        if self.spec.on_divergence == "rewind":
            self._rewind("divergence", self.step)
            return
        if self.spec.on_divergence == "stop":
            reason = (
                f"training diverged at step {self.step} (loss EMA {tel.monitor.loss_ema:.4g}); on_divergence is stop"
            )
            self._failed(reason)
            raise DivergenceStop(reason)
        self._rollback(self.spec.rollback)

    def _rollback(self, cfg: RollbackSpec) -> None:
        tel = self._telemetry()
        if self.rollbacks >= cfg.max_rollbacks:
            reason = (
                f"training diverged again at step {self.step} after {self.rollbacks} rollbacks (rollback.max_rollbacks)"
            )
            self._failed(reason)
            raise DivergenceStop(reason)
        bad_step = self.step
        good = self.checkpoints.rollback(cfg)  # the weights, optimizer and scheduler, the learning rate lowered
        self._load_position(good)
        self.skip_until_step = self.step + cfg.skip_batches
        self.guard.stale = True
        tel.metrics.rollbacks.labels(self.job_id, str(self.rank)).inc()
        detail = f"diverged at step {bad_step}; back to step {self.step}, lr x{self.lr_scale:g}"
        log.warning("rank %d: %s", self.rank, detail)
        tel.record_event({"step": bad_step, "event": "rollback", "to_step": self.step, "lr_scale": self.lr_scale})
        if self.board and self.rank == 0:
            self.board.post_event(
                {
                    "kind": "rollback",
                    "name": "rollback",
                    "step": bad_step,
                    "to_step": self.step,
                    "lr_scale": self.lr_scale,
                    "detail": detail,
                }
            )
        if self.on_rollback is not None:
            self.on_rollback(copy.deepcopy(good["extra"]))

    # ------------------------------------------------------ validation
    def log_validation(self, loss: float, accuracy: float | None = None, *, reduce: bool = False) -> None:
        """A validation result at the current step. With `reduce`, every rank calls it and the mean over
        ranks is what counts; else pass the same (already reduced) value on every rank."""
        self.end_step()
        self.recorder.validation(self.step, loss, accuracy, reduce=reduce)
        self.post_progress(force=True)

    def log(self, **scalars: float) -> None:
        """Custom scalars, one gauge each (`gradwatch_scalar{name}`), per rank; at most
        MAX_NAMED_SERIES names with the loss terms. Rank 0's also go to the history, one line a call
        (`{"step", "event": "scalars", "scalars": {...}}`)."""
        self.recorder.log(self.step, scalars)

    # ------------------------------------------------ system metrics
    def tokens(self, count: int) -> None:
        """This step's batch held `count` tokens (call once a step): tokens/s in the system metrics."""
        if self.system is not None:
            self.system.tokens_total += count

    def _start_system(self, tel: Telemetry) -> None:
        """The system metrics' sampler thread, every telemetry.system_interval seconds (0: none)."""
        cfg = self.spec.telemetry
        if not cfg.enabled or not cfg.system_interval or self.system is not None:
            return
        self.system = SystemSampler(
            tel.metrics,
            cfg.system_interval,
            gpu_index=(self.device.index or 0) if self.device.type == "cuda" else None,
            flops_per_sample=cfg.flops_per_sample,
            peak_flops=cfg.peak_flops,
            log_path=self.run_dir / f"system-rank{self.rank}.jsonl" if self.run_dir else None,
        )
        self.system.start()

    # ------------------------------------------------ rewind-and-skip
    def batches(self, loader: Any, *, indices: Callable[[Any], Any] | None = None) -> Any:
        """Endless batches of `loader` for your own loop, epoch after epoch (`run.epoch`), as rewind-and-skip
        needs them: resumed where the checkpoint left off, the batches a rewind left out skipped, and each
        batch recorded for the step it feeds (call `next()` right before the step). The loader's sampler must
        replay its order (a `DistributedSampler`, or no shuffling); `indices(batch)` gives a batch's sample
        indices for the events, else they come from the sampler. docs/rewind.md."""
        if not replayable(loader):
            sampler = type(getattr(loader, "sampler", None)).__name__
            raise ValueError(
                f"run.batches(): the loader's sampler ({sampler}) does not replay its order, so a rewind could "
                "not skip the right batch: use a DistributedSampler (seeded: its order depends only on seed "
                "and epoch) or shuffle=False"
            )

        def moved(epoch: int, taken: int) -> None:
            self.epoch, self._batch_in_epoch = epoch, taken

        return replay_batches(
            loader,
            self.batch_log,
            place=lambda: (self.epoch, self._batch_in_epoch),
            moved=moved,
            next_step=lambda: self.step + 1,
            indices_of=indices,
        )

    def _rewind(self, cause: str, seen_at: int) -> None:
        """on_spike / on_divergence rewind: back to the last good checkpoint, the batches of the
        rewind.skip_steps steps ending at `seen_at` left out from now on; at most rewind.max_rewinds times."""
        tel = self._telemetry()
        cfg, what = self.spec.rewind, "loss spike" if cause == "loss_spike" else "divergence"
        if self.rewinds >= cfg.max_rewinds:
            reason = (
                f"{what} at step {seen_at} after {self.rewinds} rewinds (rewind.max_rewinds is {cfg.max_rewinds}): "
                f"skipping the batches that fed them did not help; {len(self.batch_log.skipped)} batches skipped"
            )
            self.finish(error=reason)  # the result keeps the run's last step, phases and anomalies
            raise DivergenceStop(reason)
        good, left_out = self.checkpoints.rewind(seen_at, cfg.skip_steps)
        self._load_position(good)
        mine = [b.describe() for b in left_out]
        everyone: list[Any] = [mine]
        if self.world_size > 1:  # every rank rewinds at the same step (the detectors see all-reduced losses)
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        skipped = [
            {**b, "indices": [ranks[i]["indices"] if i < len(ranks) else None for ranks in everyone]}
            for i, b in enumerate(mine)
        ]
        tel.metrics.rewinds.labels(self.job_id, str(self.rank)).inc()
        steps = ", ".join(str(b["step"]) for b in skipped) or "none still logged"
        detail = (
            f"{what} at step {seen_at}; back to step {self.step} (rewind {self.rewinds} of at most "
            f"{cfg.max_rewinds}), skipping the batches of steps {steps}"
        )
        log.warning("rank %d: %s", self.rank, detail)
        event = {"step": seen_at, "event": "rewind", "cause": cause, "to_step": self.step, "skipped": skipped}
        tel.record_event(event)
        if self.board and self.rank == 0:
            listed = skipped[:MAX_LISTED_BATCHES]
            self.board.post_event(
                {
                    "kind": "rewind",
                    "name": cause,
                    "step": seen_at,
                    "to_step": self.step,
                    "skipped": listed,
                    "skipped_batches": len(skipped),
                    "detail": detail,
                }
            )
        if self.on_rollback is not None:
            self.on_rollback(copy.deepcopy(good["extra"]))

    # ----------------------------------------------------- checkpoints
    def _snapshot(self, extra: dict[str, Any]) -> dict[str, Any]:
        position = {
            "step": self.step,
            "epoch": self.epoch,
            "skipped_steps": self.skipped_steps,
            "first_val_loss": self.first_val_loss,
            "detectors": self.telemetry.detector_state() if self.telemetry else None,
            "batch_in_epoch": self._batch_in_epoch,
        }
        return self.checkpoints.snapshot(position, extra)

    def _load(self, state: dict[str, Any]) -> None:
        self.checkpoints.load_weights(state)
        self._load_position(state)

    def _load_position(self, state: dict[str, Any]) -> None:
        """Where the run stands as `state` has it: step, epoch, the detectors, the place in the epoch."""
        self.step, self.epoch = state["step"], state["epoch"]
        self._pending = None
        if self.telemetry is not None:  # the detectors go on from the checkpoint's state, remembering since
            self.telemetry.restore_detectors(state.get("detectors"))
        self._batch_in_epoch = state.get("batch_in_epoch", 0)

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> None:
        """Save the model, optimizer, scheduler, the run's position and your `extra` state through Ray Train
        (rank 0 writes, every rank calls). Kept in memory as the rollback target unless the run is suspect."""
        self.end_step()
        self.heartbeat.enter(CHECKPOINT)
        tel = self._telemetry()
        state = self._snapshot(extra or {})
        metrics = {
            "step": self.step,
            "train_loss": tel.last.get("loss"),
            "val_loss": self.last_val[0] if self.last_val else None,
        }
        self.checkpoints.save(state, tel.monitor.anomalies, metrics)
        self.heartbeat.enter(DATA)

    def restore(self) -> dict[str, Any] | None:
        """Load the latest checkpoint (after a worker-group restart) into the watched model, optimizer and
        scheduler; returns the `extra` state saved with it, or None when the run starts fresh."""
        self._telemetry()
        state = self.checkpoints.latest()
        if state is None:
            self._begin()
            return None
        self._load(state)
        self.checkpoints.resume(state)
        self.skipped_steps, self.first_val_loss = state["skipped_steps"], state["first_val_loss"]
        self._resumed_step = self.step
        self._begin()
        return state["extra"]

    # -------------------------------------------------------- progress
    def post_progress(self, force: bool = False) -> None:
        """Rank 0 tells the job's driver how far it got (at most twice a second unless forced)."""
        if self.telemetry is None:
            return
        self.progress.post(
            self.telemetry,
            step=self.step,
            max_steps=self.max_steps,
            epoch=self.epoch,
            last_val=self.last_val,
            samples=self.recorder.samples,
            rollbacks=self.rollbacks,
            force=force,
        )

    # ------------------------------------------------------------ end
    def _failed(self, reason: str) -> None:
        """The run stops here with `reason`: outside a job, result.json says so (inside one, the driver does)."""
        if self.local_dir is None:
            return
        report: dict[str, Any] = {"rank": self.rank, "steps": self.step, "skipped_steps": self.skipped_steps}
        if self.telemetry is not None:
            self.telemetry.flush()
            self.post_progress(force=True)  # where it stopped
            report = self.rank_report()
        self.local_dir.finish({self.rank: report}, error=reason)

    def finish(self, report: dict[str, Any] | None = None, *, error: str | None = None) -> dict[str, Any]:
        """The run is over on this rank: post its outcome (rank 0) and this rank's report; returns the outcome.

        Outside a job every rank calls it (with more than one rank it gathers the ranks' reports) and rank 0
        writes result.json: succeeded, or failed with `error`."""
        self.end_step()
        tel = self._telemetry()
        outcome = {
            "steps": self.step,
            "train_loss": tel.last.get("global_loss", tel.last.get("loss")),
            "val_loss": self.last_val[0] if self.last_val else None,
            "val_accuracy": self.last_val[1] if self.last_val else None,
            "first_val_loss": self.first_val_loss,
            "rollbacks": self.rollbacks,
            "skipped_steps": self.skipped_steps,
            "extra": {
                "phases": [{"phase": p, "step": s} for p, s in tel.phases_entered],
                "anomalies": [{"kind": k, "first_step": s} for k, s in tel.anomalies_raised.items()],
            },
        }
        mine = {**self.rank_report(), **(report or {})}
        self.progress.finish(tel, outcome, mine, error=error, post_progress=lambda: self.post_progress(force=True))
        self.heartbeat.stop()  # done: the grace period that follows is no hang
        return outcome

    def rank_report(self) -> dict[str, Any]:
        """What this rank ended with: its steps, skipped updates and mean step time; under the test
        hook also a fingerprint of its parameters (a copy of all of them to the host)."""
        return rank_report(self._telemetry(), self.job_id, self.rank, self.step, self.skipped_steps, self.guard.params)

    @property
    def scraped(self) -> bool:
        """Whether anything has fetched this rank's /metrics yet (close() waits for a last scrape only then)."""
        return self.telemetry is not None and self.telemetry.scraped

    def close(self, grace_seconds: float | None = None) -> None:
        """Stop serving /metrics once the last values have been scraped, at most `grace_seconds` (default
        the spec's telemetry.grace_seconds) after the last step; at once when nothing has scraped the
        endpoint yet and nothing was told where it is (no job, no `sd_dir`). Outside a job, a
        run closed before `finish()` ends failed in result.json."""
        global _run
        self.heartbeat.stop()
        if self.local_dir is not None and self.local_dir.result is None:
            self._failed(f"the run was closed at step {self.step} before run.finish(): the training ended early")
        if self.system is not None:
            self.system.stop()
            self.system = None
        if self.telemetry is not None:
            grace = self.spec.telemetry.grace_seconds if grace_seconds is None else grace_seconds
            # In a job the service announces the endpoint to Prometheus; outside one, start(sd_dir=...) does.
            announced = self._sd_file is not None or (self.board is not None and not self.own_run_dir)
            self.telemetry.close(grace if self.serve_metrics else 0, discoverable=announced)
        if self._sd_file is not None:
            self._sd_file.unlink(missing_ok=True)
            self._sd_file = None
        if _run is self:  # a later gradwatch.start() in this process makes a new run
            _run = None
