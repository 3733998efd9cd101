"""Recording: a step's measurements handed to the telemetry once its update is made, the validation
results, and the named series (loss terms and custom scalars, at most MAX_NAMED_SERIES per rank)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from workers.telemetry import Telemetry

MAX_NAMED_SERIES = 16  # named loss terms and custom scalars together, per rank: series stay bounded
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$")


@dataclass
class Pending:
    """A reported step waiting for its optimizer update (to measure the update it made)."""

    step: int
    loss: float
    global_loss: float
    grad_norm: float
    param_norms: list[float] | None
    mean_local_sq: float | None
    terms: dict[str, float]
    samples: int
    waited: float
    lr: float
    applied: bool
    ended: float  # when the step was over: its update made, or its skip decided
    before: list[torch.Tensor] | None  # a measured step's weights before its update
    local_sq: float | None  # a measured step's |G_small|^2 on this rank (from the DDP hook)


class Recorder:
    """One rank's recording into its telemetry (`telemetry()` gives it, or says why there is none yet)."""

    def __init__(self, telemetry: Callable[[], Telemetry], world_size: int, device: torch.device) -> None:
        self._telemetry, self.world_size, self.device = telemetry, world_size, device
        self.samples = 0  # samples of the recorded steps, on this rank
        self.first_val_loss: float | None = None
        self.last_val: tuple[float, float | None] | None = None
        self._named: dict[str, Any] = {}
        self._mark = time.perf_counter()

    def restart_clock(self) -> None:
        """The next recorded step's time counts from now."""
        self._mark = time.perf_counter()

    def record(self, p: Pending, epoch: int) -> None:
        """Hand step `p` to the telemetry: its series, the detectors and the history."""
        tel = self._telemetry()
        seconds, self._mark = max(0.0, p.ended - self._mark - p.waited), p.ended
        self.samples += p.samples
        tel.end_step(
            p.step,
            epoch,
            loss=p.loss,
            global_loss=p.global_loss,
            grad_norm=p.grad_norm,
            param_grad_norms=p.param_norms,
            mean_local_sq=p.mean_local_sq,
            local_sq=p.local_sq,
            before=p.before,
            lr=p.lr,
            samples=p.samples,
            seconds=seconds,
            applied=p.applied,
        )
        for term, value in p.terms.items():
            self.gauge("term", term).set(value)

    def validation(self, step: int, loss: float, accuracy: float | None, *, reduce: bool) -> None:
        """A validation result at `step`; with `reduce`, the mean over the ranks (every rank calls it)."""
        tel = self._telemetry()
        if reduce and self.world_size > 1:
            values = torch.tensor(
                [loss, -1.0 if accuracy is None else accuracy], dtype=torch.float64, device=self.device
            )
            dist.all_reduce(values)
            loss, acc = (values / self.world_size).tolist()
            accuracy = None if accuracy is None else acc
        if self.first_val_loss is None:
            self.first_val_loss = loss
        self.last_val = (loss, accuracy)
        tel.observe_validation(step, loss, accuracy)

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Custom scalars at `step`, one gauge each; rank 0's also go to the history, one line a call."""
        values: dict[str, float] = {}
        for name, value in scalars.items():
            self.check_name(name, "scalar")
            try:
                values[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"run.log({name}=...): give a number, got {type(value).__name__}") from None
            self.gauge("scalar", name).set(values[name])
        if values:  # the history (rank 0's) keeps them with the step: `gradwatch report` and replays read them
            self._telemetry().record_event({"step": step, "event": "scalars", "scalars": values})

    def check_name(self, name: str, what: str) -> None:
        """Refuse a name that is no good label value, or one more than MAX_NAMED_SERIES names."""
        if name in self._named or f"term:{name}" in self._named or f"scalar:{name}" in self._named:
            return
        if not _NAME.match(name):
            raise ValueError(
                f"{what} name {name!r}: use letters, digits and '_' (a Prometheus label value "
                "that reads well), at most 63 characters"
            )
        if len(self._named) >= MAX_NAMED_SERIES:
            raise ValueError(
                f"{what} {name!r} would be named series number {len(self._named) + 1}: gradwatch keeps "
                f"at most {MAX_NAMED_SERIES} named losses and scalars per run so the series stay "
                f"bounded (have: {', '.join(sorted(self._named))})"
            )

    def gauge(self, kind: str, name: str) -> Any:
        """The gauge of the named series `kind:name` (a loss term or a scalar), made on first use."""
        key = f"{kind}:{name}"
        if key not in self._named:
            self._named[key] = self._telemetry().metrics.named(kind, name)
        return self._named[key]
