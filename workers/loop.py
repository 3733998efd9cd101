"""The built-in training loop each worker runs: one screen for the step, the training API for the rest.

`train_loop_per_worker` is what Ray Train's TorchTrainer calls on every rank;
`Trainer` is constructible on its own (see tests) with a LocalSession. Telemetry,
the update guard, rollbacks and checkpoints are those of `workers.training.Run`,
the API a user's own training function calls: one implementation for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from gradwatch.spec import JobSpec
from workers.board import BoardClient
from workers.data import build_data
from workers.heartbeat import FORWARD
from workers.models import build_model, loss_and_correct
from workers.optim import build_optimizer, build_scheduler
from workers.rewind import replay_batches
from workers.session import LocalSession, RayTrainSession, Session
from workers.telemetry import Telemetry
from workers.training import DivergenceStop, Run, reports_for_tests

log = logging.getLogger("gradwatch.loop")

__all__ = ["DivergenceStop", "Outcome", "Position", "Trainer", "run_local", "train_loop_per_worker"]


@dataclass
class Position:
    """Where the built-in loop stands in its data (the step itself is the run's); saved in every checkpoint."""

    batch_in_epoch: int = 0
    samples: int = 0


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
    def __init__(
        self,
        spec: JobSpec,
        session: Session,
        *,
        job_id: str = "local",
        run_dir: Path | None = None,
        board: BoardClient | None = None,
        serve_metrics: bool = False,
    ):
        assert spec.model is not None and spec.data is not None, "the built-in loop needs a model and data"
        self.spec, self.session, self.job_id, self.board = spec, session, job_id, board
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
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
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if spec.precision == "bf16"
            else contextlib.nullcontext()
        )
        self.pos = Position()
        # the sample indices of the first epoch, under the test hook only (gradwatch.names.TEST_REPORTS_ENV)
        self.seen_first_epoch: list[torch.Tensor] | None = [] if reports_for_tests() else None
        self.run = Run(
            session,
            spec,
            job_id=job_id,
            run_dir=run_dir,
            board=board,
            serve_metrics=serve_metrics and spec.telemetry.enabled,
        )
        self.run.max_steps = self.total_steps
        self.run.watch(self.model, self.optimizer, self.scheduler, grad_clip=spec.grad_clip, batch_size=spec.batch_size)
        self.run.on_rollback = self._rolled_back

    @property
    def telemetry(self) -> Telemetry:
        assert self.run.telemetry is not None
        return self.run.telemetry

    @property
    def step(self) -> int:
        return self.run.step

    def _loader(self, dataset, *, shuffle: bool) -> DataLoader:
        per_rank = len(dataset) // self.world_size
        drop_last = shuffle and per_rank >= self.spec.batch_size
        sampler: DistributedSampler | None = (
            DistributedSampler(
                dataset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=shuffle,
                seed=self.spec.seed,
                drop_last=shuffle,
            )
            if self.world_size > 1 or "rewind" in (self.spec.on_spike, self.spec.on_divergence)
            else None  # a rewind needs an order that replays; one rank alone shuffles with its generator otherwise
        )
        loader = DataLoader(
            dataset,
            batch_size=self.spec.batch_size,
            sampler=sampler,
            shuffle=shuffle and sampler is None,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.spec.seed),
        )
        return self.session.prepare_loader(loader)

    # ------------------------------------------------------------------ run
    def train(self) -> Outcome:
        self.restore()
        batches = self.batches()
        loss = float("nan")
        while self.step < self.total_steps:
            x, y, index = next(batches)
            before = self.step
            loss = self.train_step(x, y, index)
            if self.data.task == "language_model":
                self.run.tokens(y.numel())  # a character model trains on every position of every block
            step = self.step
            if step <= before:  # a rewind undid the step: nothing new to validate or save
                continue
            if step % self.spec.validation.every_steps == 0 or step == self.total_steps:
                self.validate()
            if step % self.spec.checkpoint.every_steps == 0 or step == self.total_steps:
                self.save_checkpoint()
        return self.finish(loss)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> float:
        self.model.train()
        self.run.heartbeat.enter(FORWARD)  # the batch is loaded
        with self.autocast:
            logits = self.model(x)
        loss, _ = loss_and_correct(self.data.task, logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.run.backward(loss, samples=len(x)):  # non-finite gradients never reach the weights
            self.optimizer.step()
            self.scheduler.step()  # a skipped update does not use up the schedule
        self.pos.samples += len(x)
        if self.seen_first_epoch is not None and self.run.epoch == 0 and len(self.seen_first_epoch) < 4096:
            self.seen_first_epoch.append(index.detach())  # kept as tensors: no host sync on the step path
        return self.run.last_loss

    def batches(self):
        """Endless batches; a resumed run continues its epoch where the checkpoint left it, a rewound one
        from the restored place, leaving out the batches the rewind skips (workers/rewind.py)."""

        def moved(epoch: int, taken: int) -> None:
            self.run.epoch, self.pos.batch_in_epoch = epoch, taken

        return replay_batches(
            self.train_loader,
            self.run.batch_log,
            place=lambda: (self.run.epoch, self.pos.batch_in_epoch),
            moved=moved,
            next_step=lambda: self.step + 1,
            indices_of=lambda batch: batch[2],  # kept as a tensor: read only if a rewind lists it
        )

    def _rolled_back(self, extra: dict[str, Any]) -> None:
        """The run went back to its last good checkpoint: so does the loop's place in the data."""
        self.pos = Position(**extra["position"]) if extra else Position()

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
            totals += torch.tensor(
                [loss.item() * n, float(correct) if correct is not None else 0.0, n],
                dtype=torch.float64,
                device=self.device,
            )
        if self.world_size > 1:
            dist.all_reduce(totals)
        loss_sum, correct_sum, count = totals.tolist()
        val_loss = loss_sum / max(count, 1)
        val_acc = correct_sum / max(count, 1) if self.data.task != "regression" else None
        self.run.log_validation(val_loss, val_acc)  # already reduced over the ranks
        return val_loss, val_acc

    # --------------------------------------------------- checkpoints
    def _inner(self) -> torch.nn.Module:
        inner: torch.nn.Module = getattr(self.model, "module", self.model)  # DDP's wrapped model, or the model
        return inner

    def save_checkpoint(self) -> None:
        self.run.save_checkpoint({"position": dataclasses.asdict(self.pos)})

    def restore(self) -> int | None:
        """Resume from the latest checkpoint, if any; returns its step."""
        extra = self.run.restore()
        if extra is None:
            return None
        self.pos = Position(**extra["position"])
        torch.manual_seed(self.spec.seed + 1_000_003 * self.rank + self.step)
        return self.step

    def finish(self, loss: float) -> Outcome:
        report = None
        if self.seen_first_epoch is not None:
            seen = torch.cat(self.seen_first_epoch).cpu().tolist() if self.seen_first_epoch else []
            report = {"first_epoch_indices": sorted(set(seen))}
        outcome = self.run.finish(report=report)
        if outcome["train_loss"] is None:
            outcome["train_loss"] = loss
        return Outcome(**outcome)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker of the group."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = JobSpec.model_validate(config["spec"], context={"user_code": "skip"})
    session = RayTrainSession()
    board = BoardClient.connect(config["job_id"])
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    trainer = Trainer(
        spec,
        session,
        job_id=config["job_id"],
        run_dir=run_dir,
        board=board,
        serve_metrics=config.get("serve_metrics", True),
    )
    try:
        trainer.train()
    finally:
        trainer.run.close()


def run_local(spec: JobSpec, job_id: str = "local", run_dir: Path | None = None) -> Outcome:
    """Train in this process alone (world size 1, no Ray)."""
    trainer = Trainer(spec, LocalSession(), job_id=job_id, run_dir=run_dir)
    return trainer.train()
