"""The update guard: whether a step's update is safe (loss and gradient norm finite on every rank, no
rollback's skip window), and when a stretch of skipped updates means the run has diverged.

The decision is made on values that are identical on every rank (the all-reduced loss and the gradient
norm), so all ranks skip together and the replicas stay equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from workers.heartbeat import COLLECTIVE, OPTIMIZER, Heartbeat

if TYPE_CHECKING:
    from workers.telemetry import Telemetry

# Applied updates in a row that end a stretch of skipped ones; fewer (a finite batch now and then
# while the loss is inf) do not: the run has not recovered.
RECOVERY_STEPS = 10


class _Safe(Protocol):
    safe: bool


class GuardedOptimizer:
    """The watched optimizer: `step()` applies the update only when the run said it is safe.

    Everything else is the wrapped optimizer's (`param_groups`, `state_dict`, ...); a learning-rate
    scheduler takes the wrapped one, `guarded.optimizer`.
    """

    def __init__(self, run: _Safe, optimizer: torch.optim.Optimizer):
        self._run, self.optimizer = run, optimizer

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self._run.safe:
            return None
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:  # param_groups, state, state_dict, ...
        return getattr(self.optimizer, name)


@dataclass
class Decision:
    """What the guard read off a step (on the host) and whether its update is safe."""

    loss: float  # this rank's loss
    global_loss: float  # the mean over the ranks
    grad_norm: float  # the global gradient norm
    param_norms: list[float] | None  # a measured step's per-parameter norms
    mean_local_sq: float | None  # the DDP hook's mean |G_small|^2 over the ranks
    terms: dict[str, float]
    local_sq: float | None  # a measured step's |G_small|^2 on this rank (from the DDP hook)
    safe: bool


class UpdateGuard:
    """One rank's update guard: `decide()` each step, `check_skipped()` once the step is recorded."""

    def __init__(
        self, world_size: int, device: torch.device, heartbeat: Heartbeat, max_skipped_steps: int | None
    ) -> None:
        self.world_size, self.device, self.heartbeat = world_size, device, heartbeat
        self.max_skipped_steps = max_skipped_steps
        self.safe = True
        self.skipped_steps = 0
        self.skip_until_step = 0  # a rollback skips the updates of the steps before this one
        self.stale = False  # a rollback just happened: the next update came from the old weights
        # a stretch of skipped updates: how many, since when, applied ones since, the last applied (step, loss)
        self._skipped_in_a_row, self._skipped_since, self._applied_in_a_row = 0, 0, 0
        self._last_applied: tuple[int, float] | None = None
        self.params: list[torch.Tensor] = []
        self.float_grads = True
        self.grad_clip: float | None = None

    def attach(self, params: list[torch.Tensor], grad_clip: float | None) -> None:
        """The parameters whose gradients are judged (and clipped to `grad_clip` when the update is safe)."""
        self.params, self.grad_clip = params, grad_clip
        self.float_grads = all(p.dtype == torch.float32 for p in params)

    def scalar(self, value: torch.Tensor | float) -> torch.Tensor:
        """`value` as a float32 scalar tensor on the run's device, detached (no copy when it already is one)."""
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.device == self.device:
            return value.detach() if value.dim() == 0 else value.detach().reshape(())
        return torch.as_tensor(value, dtype=torch.float32, device=self.device).detach().reshape(())

    def decide(self, tel: Telemetry, loss: torch.Tensor | float, terms: dict[str, Any], step: int) -> Decision:
        """Read the step's loss, loss terms and gradient norms (one copy to the host), share the loss over
        the ranks, and decide whether the update of the step after `step` is safe; clip it if so."""
        loss_t = self.scalar(loss)
        param_norms = tel.grad_norms()  # before clipping, measured steps only
        # One fused norm per parameter; their squares are summed on the host, where the values go anyway.
        whole = tel.reduced_grad_norm() if param_norms is None else None
        if param_norms is not None:
            norms = param_norms
        elif whole is not None:
            norms = [whole]
        else:
            norms = list(torch._foreach_norm([p.grad for p in self.params if p.grad is not None]))
        if not self.float_grads:
            norms = [n.float() for n in norms]
        # a measured step's |G_small|^2 on this rank, read now: the hook starts the next step's sum
        local_sq = tel.local_sq()
        stats = torch.stack(
            [loss_t, *norms, *(self.scalar(v) for v in terms.values()), *([local_sq] if local_sq is not None else [])]
        )
        k, n_terms = 1 + len(norms), len(terms)
        flagged = False  # whether a rank's non-finite gradient comes as a count (no DDP hook)
        shared = None
        if self.world_size > 1:
            shared = tel.mean_loss()  # [mean loss, ...] over the ranks, carried by DDP's gradient all-reduce
            if shared is None:  # no DDP hook: one small collective of its own (loss, non-finite gradient flag)
                norm = torch.linalg.vector_norm(stats[1:k])
                shared = torch.stack([loss_t / self.world_size, (~torch.isfinite(norm)).float()])
                self.heartbeat.enter(COLLECTIVE)
                dist.all_reduce(shared)
                self.heartbeat.enter(OPTIMIZER)
                flagged = True
            if stats.device.type != "cpu":  # one copy to the host (on CPU, two reads cost less than a cat)
                stats, shared = torch.cat([stats, shared]), None
        # note: the one CPU-GPU sync of every step: loss and norm decide whether the update is applied
        values = stats.tolist()
        loss_value = values[0]
        norm_value = math.sqrt(sum(v * v for v in values[1:k]))
        term_values = dict(zip(terms, values[k : k + n_terms], strict=True))
        rest = values[k + n_terms :]
        local_value = rest.pop(0) if local_sq is not None else None
        shared_values = rest if shared is None else shared.tolist()
        global_loss = shared_values[0] if shared_values else loss_value
        grads_finite = math.isfinite(norm_value) and not (flagged and shared_values[1])
        rolled_back = self.stale or step < self.skip_until_step
        self.stale = False
        self.safe = grads_finite and math.isfinite(global_loss) and not rolled_back
        if self.safe and self.grad_clip is not None:
            total = torch.linalg.vector_norm(stats[1:k])  # on the device: no copy back for the clip
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, total)
        if not self.safe:
            self.skipped_steps += 1
        return Decision(
            loss_value,
            global_loss,
            norm_value,
            values[1:k] if param_norms is not None else None,
            None if flagged or len(shared_values) < 2 else shared_values[1],  # the hook's mean |G_small|^2
            term_values,
            local_value,
            self.safe,
        )

    def check_skipped(self, step: int, applied: bool, loss: float) -> str | None:
        """Why the run must end, once max_skipped_steps steps passed since an update was first skipped with
        no recovery (RECOVERY_STEPS applied updates in a row) in between: its weights no longer move."""
        if step < self._skipped_since:  # rolled back to before the stretch: judge afresh
            self._skipped_in_a_row = 0
        if self._skipped_in_a_row == 0:  # healthy so far
            if applied:
                self._last_applied = (step, loss)
                return None
            self._skipped_since, self._applied_in_a_row = step, 0
        self._skipped_in_a_row += not applied
        self._applied_in_a_row = self._applied_in_a_row + 1 if applied else 0
        if self._applied_in_a_row >= RECOVERY_STEPS:
            self._skipped_in_a_row, self._last_applied = 0, (step, loss)
            return None
        steps = step - self._skipped_since + 1
        limit = self.max_skipped_steps
        if limit is None or steps < limit:
            return None
        since, all_skipped = self._skipped_since, self._skipped_in_a_row == steps
        last = (
            f"last finite loss{'' if all_skipped else ' before them'} {self._last_applied[1]:.4g} at step "
            f"{self._last_applied[0]}"
            if self._last_applied
            else "no finite loss before them"
        )
        if all_skipped:
            return f"diverged: {steps} consecutive non-finite steps since step {since}; {last}"
        return (
            f"diverged: {self._skipped_in_a_row} of the {steps} steps since step {since} were non-finite, "
            f"never {RECOVERY_STEPS} finite in a row; {last}"
        )
