"""Gradient noise scale from what DDP computes anyway, and the grouping of parameters into layers.

Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A): each rank's local gradient is a mean over B_small examples and the all-reduced one a
mean over B_big = world_size * B_small, so comparing their squared norms gives unbiased estimates of
the true gradient's squared norm |G|^2 and of the per-example noise tr(Sigma), with no extra
backward pass. B_simple = tr(Sigma) / |G|^2 is the batch size at which noise and signal are equal,
an estimate of the critical batch size. Plain Python: the worker hands in floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

OTHER_GROUP = "(other)"  # not a valid module name, so it cannot clash with one
# wrappers that prefix every parameter name: DDP/DataParallel, torch.compile, FSDP, activation checkpointing
_WRAPPER_PREFIXES = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def noise_scale_estimates(
    local_sq_norm_mean: float, global_sq_norm: float, batch_small: int, batch_big: int
) -> tuple[float, float]:
    """Unbiased single-step estimates of (|G|^2, tr(Sigma)).

    local_sq_norm_mean: |G_small|^2, the squared norm of a gradient averaged over `batch_small`
    examples (in DDP: each rank's local gradient, its squared norm averaged over ranks);
    global_sq_norm: |G_big|^2, the squared norm of the gradient averaged over `batch_big` examples
    (in DDP: after the all-reduce). Either estimate can come out negative on one step; only their
    averages over many steps are meaningful.
    """
    if not batch_big > batch_small >= 1:
        raise ValueError(f"need batch_big > batch_small >= 1, got batch_small={batch_small}, batch_big={batch_big}")
    grad_sq = (batch_big * global_sq_norm - batch_small * local_sq_norm_mean) / (batch_big - batch_small)
    trace = (local_sq_norm_mean - global_sq_norm) / (1.0 / batch_small - 1.0 / batch_big)
    return grad_sq, trace


class GradientNoiseScale:
    """B_simple = tr(Sigma) / |G|^2 from local and all-reduced gradient norms, smoothed over steps.

    The numerator and the denominator are averaged separately (bias-corrected EMAs) and divided
    afterwards: each single-step estimate is very noisy and often negative, their ratio even more so.
    With one worker there is no smaller batch to compare with, so there is no estimate (None).
    """

    def __init__(self, ema_decay: float = 0.95) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.ema_decay = ema_decay
        self.reset()

    def reset(self) -> None:
        self._grad_sq = 0.0
        self._trace = 0.0
        self._decay_power = 1.0
        self.updates = 0

    def update(
        self, local_sq_norm_mean: float, global_sq_norm: float, batch_small: int, world_size: int
    ) -> float | None:
        """Take one step's squared norms; returns the current B_simple, or None while undefined.

        `batch_small` is the per-worker batch (examples behind each local gradient); B_big is
        world_size * batch_small. Non-finite norms (a skipped or overflowing step) are ignored.
        """
        if batch_small < 1 or world_size < 1:
            raise ValueError(
                f"need batch_small >= 1 and world_size >= 1, got batch_small={batch_small}, world_size={world_size}"
            )
        if world_size == 1:
            return None
        if not (math.isfinite(local_sq_norm_mean) and math.isfinite(global_sq_norm)):
            return self.value
        grad_sq, trace = noise_scale_estimates(
            local_sq_norm_mean, global_sq_norm, batch_small, world_size * batch_small
        )
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return self.value
        beta = self.ema_decay
        self._grad_sq = beta * self._grad_sq + (1.0 - beta) * grad_sq
        self._trace = beta * self._trace + (1.0 - beta) * trace
        self._decay_power *= beta
        self.updates += 1
        return self.value

    @property
    def grad_sq_norm(self) -> float | None:
        """Smoothed estimate of the true gradient's squared norm |G|^2."""
        return self._grad_sq / (1.0 - self._decay_power) if self.updates else None

    @property
    def noise_trace(self) -> float | None:
        """Smoothed estimate of tr(Sigma), the per-example gradient noise."""
        return self._trace / (1.0 - self._decay_power) if self.updates else None

    @property
    def value(self) -> float | None:
        """B_simple, or None before any update and while either estimate is not positive."""
        # the EMA bias correction is the same factor on both, so it cancels in the ratio
        if not self.updates or self._grad_sq <= 0.0 or self._trace <= 0.0:
            return None
        ratio = self._trace / self._grad_sq
        return ratio if math.isfinite(ratio) else None

    @property
    def critical_batch_hint(self) -> int | None:
        """B_simple rounded to a batch size: training with a global batch well above it wastes compute,
        well below it wastes steps."""
        value = self.value
        return None if value is None else max(1, round(value))


def _module_path(param_name: str) -> list[str]:
    parts = param_name.split(".")
    while len(parts) > 1 and parts[0] in _WRAPPER_PREFIXES:
        parts = parts[1:]
    if len(parts) > 1:
        return parts[:-1]
    leaf = parts[0]
    # a bare layer as the whole model ("weight", "bias", "weight_ih_l0"): one group; other root
    # parameters (a ViT's "cls_token") are their own group
    return ["model"] if leaf.startswith(("weight", "bias")) else [leaf]


def group_layers(param_names: Iterable[str], max_layers: int) -> dict[str, str]:
    """Map each parameter name to a layer group of at most `max_layers` groups, by module path.

    Groups are module paths (`blocks.3.attn.c_attn`, without `.weight`/`.bias`, so a bias shares
    its weight's group), with wrapper prefixes such as DDP's `module.` dropped. When there are
    more modules than `max_layers`, every path is cut to one component fewer (`blocks.3.attn`,
    then `blocks.3`, then `blocks`) until they fit; if even the top-level modules are too many,
    the first `max_layers - 1` of them (in parameter order) keep their names and the rest share
    the group "(other)" (with `max_layers=1` everything is "model"). Deterministic for a given list.
    """
    if max_layers < 1:
        raise ValueError(f"max_layers must be at least 1, got {max_layers}")
    modules = {name: _module_path(name) for name in param_names}
    if not modules:
        return {}
    for depth in range(max(len(path) for path in modules.values()), 0, -1):
        groups = {name: ".".join(path[:depth]) for name, path in modules.items()}
        if len(set(groups.values())) <= max_layers:
            return groups
    if max_layers == 1:
        return {name: "model" for name in modules}
    top = {name: path[0] for name, path in modules.items()}
    kept = set(list(dict.fromkeys(top.values()))[: max_layers - 1])
    return {name: group if group in kept else OTHER_GROUP for name, group in top.items()}
