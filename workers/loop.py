"""The training loop each worker runs: one screen for the step, components for the rest.

`train_loop_per_worker` is what Ray Train's TorchTrainer calls on every rank;
`Trainer` is constructible on its own (see tests) with a LocalSession.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from gradwatch.spec import JobSpec
from workers.board import BoardClient
from workers.checkpoint import load_training_state, save_training_state
from workers.data import build_data
from workers.models import build_model, loss_and_correct
from workers.optim import build_optimizer, build_scheduler
from workers.session import LocalSession, RayTrainSession, Session
from workers.telemetry import Telemetry

log = logging.getLogger("gradwatch.loop")
# A skipped (non-finite) update still advances the schedule; torch warns about exactly that.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")


class DivergenceStop(RuntimeError):
    """on_divergence: stop, and the run diverged."""


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    skip_until_step: int = 0


@dataclass
class Outcome:
    steps: int
    train_loss: float
    val_loss: float | None
    val_accuracy: float | None
    first_val_loss: float | None
    rollbacks: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, spec: JobSpec, session: Session, *, job_id: str = "local", run_dir: Path | None = None,
                 board: BoardClient | None = None, serve_metrics: bool = False):
        self.spec, self.session, self.job_id, self.board = spec, session, job_id, board
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        self.run_dir = Path(run_dir) if run_dir else None
        # Each rank gets its own stream for dropout etc.; data order comes from the sampler's seed.
        torch.manual_seed(spec.seed + 1_000_003 * self.rank)

        self.data = build_data(spec.data, spec.seed)
        torch.manual_seed(spec.seed)  # identical initial weights on every rank
        self.model = session.prepare_model(build_model(spec.model, self.data))
        torch.manual_seed(spec.seed + 1_000_003 * self.rank)
        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters())
        self.train_loader = self._loader(self.data.train, shuffle=True)
        self.val_loader = self._loader(self.data.val, shuffle=False)
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.total_steps = spec.max_steps or spec.epochs * self.steps_per_epoch  # type: ignore[operator]
        self.scheduler = build_scheduler(spec.schedule, self.optimizer, self.total_steps)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if spec.precision == "bf16" else contextlib.nullcontext())
        self.pos = Position()
        self.skipped_steps = 0
        self.first_val_loss: float | None = None
        self.last_val: tuple[float, float | None] | None = None
        self.seen_first_epoch: list[torch.Tensor] = []
        # Detectors see the same (all-reduced) loss on every rank, so guard decisions agree.
        self.global_loss = self.world_size > 1 and (spec.telemetry.enabled or spec.on_divergence != "alert")
        history = self.run_dir / "history.jsonl" if self.run_dir else None
        self.telemetry = Telemetry(spec, job_id, self.rank, self.world_size, self.model, self.device,
                                   board=board, history_path=history)
        self.serve_metrics = serve_metrics and spec.telemetry.enabled
        self._good: tuple[Any, Any, Any, Position] | None = None
        self._last_post = 0.0
        self._t_start = time.time()

    def _loader(self, dataset, *, shuffle: bool) -> DataLoader:
        per_rank = len(dataset) // self.world_size
        drop_last = shuffle and per_rank >= self.spec.batch_size
        sampler = (DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle,
                                      seed=self.spec.seed, drop_last=shuffle)
                   if self.world_size > 1 else None)
        loader = DataLoader(dataset, batch_size=self.spec.batch_size, sampler=sampler,
                            shuffle=shuffle and sampler is None, drop_last=drop_last,
                            generator=torch.Generator().manual_seed(self.spec.seed))
        return self.session.prepare_loader(loader)

    # ------------------------------------------------------------------ run
    def train(self) -> Outcome:
        resumed = self.restore()
        if self.board:
            self.board.post("started", self.rank, resumed)
        if resumed is not None:
            self.telemetry.metrics.restarts.labels(self.job_id, str(self.rank)).inc()
            log.warning("rank %d resumed from the checkpoint at step %d", self.rank, resumed)
        if self.serve_metrics:  # after the restore, so the first scrape already counts the restart
            self.telemetry.serve(self.session.node_address())
        batches = self.batches()
        loss = float("nan")
        while self.pos.step < self.total_steps:
            x, y, index = next(batches)
            if self.pos.step < self.pos.skip_until_step:  # rollback: skip the offending batches
                self.pos.step += 1
                continue
            loss = self.train_step(x, y, index)
            step = self.pos.step
            if step % self.spec.validation.every_steps == 0 or step == self.total_steps:
                self.validate()
            if step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps:
                self.save_checkpoint()
            self.post_progress(force=step == self.total_steps)
        return self.finish(loss)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> float:
        step = self.pos.step + 1
        t0 = time.perf_counter()
        self.telemetry.begin_step(step)
        self.model.train()
        with self.autocast:
            logits = self.model(x)
        loss, _ = loss_and_correct(self.data.task, logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.telemetry.before_backward(loss.detach() if self.global_loss else None)
        loss.backward()
        # A straggler makes every other rank wait here: step time counts this rank's own work only.
        waited = self.telemetry.sync_wait_seconds(time.perf_counter())
        param_norms = self.telemetry.grad_norms()  # before clipping, measured steps only
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        stats = torch.stack([loss.detach().float(), grad_norm.float()])
        if self.global_loss:
            mean = self.telemetry.mean_loss()  # carried by DDP's gradient all-reduce
            if mean is None:  # no DDP hook: a collective of its own
                mean = stats[:1].clone()
                dist.all_reduce(mean)
                mean /= self.world_size
            stats = torch.cat([stats, mean.to(stats.dtype)])
        # note: the one CPU-GPU sync of every step: loss and norm decide whether the update is applied
        values = stats.tolist()
        loss_value, norm_value = values[0], values[1]
        global_loss = values[2] if self.global_loss else loss_value
        applied = math.isfinite(norm_value) and math.isfinite(global_loss)
        self.skipped_steps += not applied
        if applied:  # non-finite gradients never reach the weights
            if self.spec.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.spec.grad_clip, grad_norm)
            self.optimizer.step()
        self.scheduler.step()
        self.pos.step = step
        self.pos.samples += len(x)
        lr = self.optimizer.param_groups[0]["lr"]
        events = self.telemetry.end_step(step, self.pos.epoch, loss=loss_value, global_loss=global_loss,
                                         grad_norm=norm_value, param_grad_norms=param_norms, lr=lr,
                                         samples=len(x), seconds=time.perf_counter() - t0 - waited,
                                         applied=applied)
        if self.pos.epoch == 0 and len(self.seen_first_epoch) < 4096:
            self.seen_first_epoch.append(index.detach())  # kept as tensors: no host sync on the step path
        self.guard(events)
        return loss_value

    def batches(self):
        """Endless batches; a resumed run continues its epoch where the checkpoint left it."""
        while True:
            sampler = getattr(self.train_loader, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(self.pos.epoch)
            skip = self.pos.batch_in_epoch
            for i, batch in enumerate(self.train_loader):
                if i < skip:
                    continue
                self.pos.batch_in_epoch = i + 1
                yield batch
            self.pos.epoch += 1
            self.pos.batch_in_epoch = 0

    # ------------------------------------------------------- the guard
    def guard(self, events: list[dict[str, Any]]) -> None:
        mode = self.spec.on_divergence
        if mode == "alert" or not self.telemetry.monitor.anomalies.get("divergence"):
            return
        if mode == "stop":
            raise DivergenceStop(f"training diverged at step {self.pos.step} "
                                 f"(loss EMA {self.telemetry.monitor.loss_ema:.4g}); on_divergence is stop")
        self.rollback()

    def rollback(self) -> None:
        cfg = self.spec.rollback
        if self.pos.rollbacks >= cfg.max_rollbacks:
            raise DivergenceStop(f"training diverged again at step {self.pos.step} after "
                                 f"{self.pos.rollbacks} rollbacks (rollback.max_rollbacks)")
        bad_step, rollbacks, scale = self.pos.step, self.pos.rollbacks + 1, self.pos.lr_scale * cfg.lr_factor
        if self._good is not None:
            model_state, optim_state, sched_state, pos = self._good
            self._inner().load_state_dict(model_state)
            self.optimizer.load_state_dict(optim_state)
            self.scheduler.load_state_dict(sched_state)
            self.pos = copy.deepcopy(pos)
        else:  # no good checkpoint yet: restart from the initial weights
            torch.manual_seed(self.spec.seed)
            fresh = build_model(self.spec.model, self.data).to(self.device)
            self._inner().load_state_dict(fresh.state_dict())
            self.optimizer = build_optimizer(self.spec.optimizer, self.model.parameters())
            self.scheduler = build_scheduler(self.spec.schedule, self.optimizer, self.total_steps)
            self.pos = Position()
        self.pos.rollbacks, self.pos.lr_scale = rollbacks, scale
        self.pos.skip_until_step = self.pos.step + cfg.skip_batches
        self._apply_lr_scale()
        self.telemetry.reset_detectors()
        self.telemetry.metrics.rollbacks.labels(self.job_id, str(self.rank)).inc()
        event = {"kind": "rollback", "name": "rollback", "step": bad_step, "to_step": self.pos.step,
                 "lr_scale": scale, "detail": f"diverged at step {bad_step}; back to step {self.pos.step}, "
                                              f"lr x{scale:g}"}
        log.warning("rank %d: %s", self.rank, event["detail"])
        if self.board and self.rank == 0:
            self.board.post("post_event", event)

    def _apply_lr_scale(self) -> None:
        scale = self.pos.lr_scale
        self.scheduler.base_lrs = [self.spec.optimizer.lr * scale for _ in self.scheduler.base_lrs]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=False):
            group["lr"] = base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    # --------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> tuple[float, float | None]:
        model = self._inner()
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        for i, (x, y, _) in enumerate(self.val_loader):
            if self.spec.validation.max_batches and i >= self.spec.validation.max_batches:
                break
            with self.autocast:
                logits = model(x)
            loss, correct = loss_and_correct(self.data.task, logits, y)
            n = y.numel() if self.data.task == "language_model" else len(y)
            totals += torch.tensor([loss.item() * n, float(correct) if correct is not None else 0.0, n],
                                   dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct_sum, count = totals.tolist()
        val_loss = loss_sum / max(count, 1)
        val_acc = correct_sum / max(count, 1) if self.data.task != "regression" else None
        if self.first_val_loss is None:
            self.first_val_loss = val_loss
        self.last_val = (val_loss, val_acc)
        self.telemetry.observe_validation(self.pos.step, val_loss, val_acc)
        self.post_progress(force=True)
        return val_loss, val_acc

    # --------------------------------------------------- checkpoints
    def _inner(self) -> torch.nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def save_checkpoint(self) -> None:
        held = self.telemetry.monitor.anomalies
        if not any(held.get(k) for k in ("divergence", "exploding_gradients", "loss_spike")):
            # Every rank keeps the last good state in memory: a rollback must not wait on storage.
            self._good = (copy.deepcopy(self._inner().state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                          copy.deepcopy(self.scheduler.state_dict()), copy.deepcopy(self.pos))
        checkpoint_dir = None
        if self.rank == 0:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="gradwatch-ckpt-"))
            save_training_state(checkpoint_dir, self.model, self.optimizer, self.scheduler, self.pos,
                                {"first_val_loss": self.first_val_loss})
        metrics = {"step": self.pos.step, "train_loss": self.telemetry.last.get("loss"),
                   "val_loss": self.last_val[0] if self.last_val else None}
        self.session.report(metrics, checkpoint_dir)

    def restore(self) -> int | None:
        with self.session.latest_checkpoint_dir() as path:
            if path is None:
                return None
            state = load_training_state(path, self.model, self.optimizer, self.scheduler, self.device)
        self.pos = Position(**state["position"])
        self.first_val_loss = state["extra"].get("first_val_loss")
        self._apply_lr_scale()
        torch.manual_seed(self.spec.seed + 1_000_003 * self.rank + self.pos.step)
        return self.pos.step

    # ------------------------------------------------------- progress
    def post_progress(self, force: bool = False) -> None:
        if self.rank != 0 or self.board is None:
            return
        now = time.time()
        if not force and now - self._last_post < 0.5:
            return
        self._last_post = now
        monitor = self.telemetry.monitor
        last = self.telemetry.last
        elapsed = max(now - self._t_start, 1e-9)
        self.board.post("post_progress", {
            "step": self.pos.step, "max_steps": self.total_steps, "epoch": self.pos.epoch,
            "world_size": self.world_size, "train_loss": last.get("global_loss", last.get("loss")),
            "loss_ema": monitor.loss_ema, "val_loss": self.last_val[0] if self.last_val else None,
            "val_accuracy": self.last_val[1] if self.last_val else None,
            "grad_norm": last.get("grad_norm"), "lr": last.get("lr"),
            "samples_per_second": self.pos.samples * self.world_size / elapsed,
            "phase": monitor.phase, "anomalies": {k: v for k, v in monitor.anomalies.items() if v},
            "rollbacks": self.pos.rollbacks,
        })

    def finish(self, loss: float) -> Outcome:
        outcome = Outcome(
            steps=self.pos.step,
            train_loss=self.telemetry.last.get("global_loss", loss),
            val_loss=self.last_val[0] if self.last_val else None,
            val_accuracy=self.last_val[1] if self.last_val else None,
            first_val_loss=self.first_val_loss,
            rollbacks=self.pos.rollbacks,
            skipped_steps=self.skipped_steps,
            extra={"phases": [{"phase": p, "step": s} for p, s in self.telemetry.phases_entered],
                   "anomalies": [{"kind": k, "first_step": s}
                                 for k, s in self.telemetry.anomalies_raised.items()]},
        )
        if self.board:
            self.board.post("post_rank_report", self.rank, self.rank_report())
            if self.rank == 0:
                self.post_progress(force=True)
                self.board.post("post_final", outcome.__dict__)
        return outcome

    def rank_report(self) -> dict[str, Any]:
        """What this rank saw and ended with: shards and a parameter fingerprint (for verification)."""
        flat = torch.cat([p.detach().float().reshape(-1).cpu() for p in self.model.parameters()])
        registry, labels = self.telemetry.metrics.registry, {"job_id": self.job_id, "rank": str(self.rank)}
        step_sum = registry.get_sample_value("gradwatch_step_duration_seconds_sum", labels) or 0.0
        step_count = registry.get_sample_value("gradwatch_step_duration_seconds_count", labels) or 0.0
        seen = torch.cat(self.seen_first_epoch).cpu().tolist() if self.seen_first_epoch else []
        return {"rank": self.rank, "first_epoch_indices": sorted(set(seen)),
                "param_sum": float(flat.double().sum()),
                "param_hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "steps": self.pos.step,
                "params_finite": bool(torch.isfinite(flat).all()), "skipped_steps": self.skipped_steps,
                "mean_step_seconds": step_sum / step_count if step_count else None}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker of the group."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = JobSpec.model_validate(config["spec"], context={"user_code": "skip"})
    session = RayTrainSession()
    board = BoardClient.connect(config["job_id"])
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    trainer = Trainer(spec, session, job_id=config["job_id"], run_dir=run_dir, board=board,
                      serve_metrics=config.get("serve_metrics", True))
    try:
        trainer.train()
    finally:
        trainer.telemetry.close(spec.telemetry.grace_seconds if config.get("serve_metrics", True) else 0)


def run_local(spec: JobSpec, job_id: str = "local", run_dir: Path | None = None) -> Outcome:
    """Train in this process alone (world size 1, no Ray)."""
    trainer = Trainer(spec, LocalSession(), job_id=job_id, run_dir=run_dir)
    return trainer.train()

