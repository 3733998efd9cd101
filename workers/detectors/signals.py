"""The detectors of issue-sized failures that a loss level alone does not show: a dead run, a learning-rate
schedule that ends early, a slow rise of the loss, a growing gradient norm, recurring spikes that grow,
and frequent skipped (non-finite gradient) steps. Each is fed one observation at a time, measures time in
optimizer steps and answers with a `Finding`; `DynamicsMonitor` wires them to their anomaly kinds.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from gradwatch.spec_telemetry import DetectorSpec
from workers.detectors.base import (
    MAD_TO_SIGMA,
    QUIET,
    BlockMedians,
    Finding,
    mann_kendall_z,
    median_sorted,
    resolution,
    theil_sen,
)

DEAD_MIN_VALUES = 5  # a dead run needs at least this many identical logged values, however sparse the log
DEAD_RESOLUTION = 1e-3  # identical values prove nothing when written to coarser than this share of themselves
DEAD_LAYER_MEASUREMENTS = 3  # a dead layer: exactly 0 on at least this many measurements
GRAD_LEVEL_VALUES = 5  # the grad norm's level is the median of at least this many values
TREND_BLOCKS = 20  # the shorter trend horizon is cut into this many blocks
GROWTH_BLOCKS = 16  # the grad-norm growth horizon is cut into this many blocks


class DeadRunDetector:
    """Nothing moves: the loss bit-identical, or every gradient exactly 0, for `dead_run_steps` steps.

    A loss of exactly 0 is a perfect fit, not a dead run. A log that rounds its losses (4 digits) can
    repeat a value on a flat curve, hence at least `DEAD_MIN_VALUES` identical values as well, and a value
    written to fewer than about 4 significant digits (0.0003 in a log of 4 decimals: a fine-tune's train
    loss near 0) repeats whenever the curve moves by less than the rounding: it is not counted."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.steps = spec.dead_run_steps
        self.value: float | None = None
        self.since = 0
        self.count = 0
        self.zero_since: int | None = None
        self.zero_count = 0

    def note_grad(self, step: int, grad_norm: float | None) -> None:
        """Take a global gradient norm (from a step or a measurement)."""
        if grad_norm is None or not math.isfinite(grad_norm):
            return
        if grad_norm == 0.0:
            if self.zero_since is None:
                self.zero_since, self.zero_count = step, 0
            self.zero_count += 1
        else:
            self.zero_since, self.zero_count = None, 0

    def update(self, step: int, loss: float) -> Finding:
        if not math.isfinite(loss) or loss == 0.0:
            self.value = None
        elif loss == self.value:
            self.count += 1
        else:
            self.value, self.since, self.count = loss, step, 1
        if (
            self.value is not None
            and self.count >= DEAD_MIN_VALUES
            and step - self.since >= self.steps
            and resolution(self.value) <= DEAD_RESOLUTION * abs(self.value)
        ):
            return Finding(
                True,
                f"the loss has been exactly {self.value!r} for {step - self.since} steps ({self.count} values): "
                "nothing is learning (a learning rate of 0, frozen parameters, one batch repeated?)",
            )
        if self.zero_since is not None and self.zero_count >= DEAD_MIN_VALUES and step - self.zero_since >= self.steps:
            return Finding(
                True, f"every gradient has been exactly 0 for {step - self.zero_since} steps: nothing is learning"
            )
        return QUIET


class LrScheduleDetector:
    """A learning-rate schedule that ends early: the logged lr at 0 for `lr_schedule_steps` steps, or (after
    its peak, with the run's length known) below `lr_schedule_fraction` of the peak, before the last
    `lr_schedule_tail` share of `max_steps` (where a schedule's tail near 0 is the plan). Without the run's
    length only an lr of exactly 0 that lasts is judged: a cosine or linear decay reaches 0 at its last step."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.fraction = spec.lr_schedule_fraction
        self.steps = spec.lr_schedule_steps
        self.tail = spec.lr_schedule_tail
        self.peak = 0.0
        self.since: int | None = None

    def update(self, step: int, lr: float | None, max_steps: int | None) -> Finding:
        if lr is None or not math.isfinite(lr):
            return QUIET
        self.peak = max(self.peak, lr)
        in_tail = max_steps is not None and step >= (1.0 - self.tail) * max_steps
        low = lr <= 0.0 or (max_steps is not None and 0.0 < self.peak and lr <= self.fraction * self.peak)
        if not low or (in_tail and self.since is None):  # low since before the tail: still the bug
            self.since = None
            return QUIET
        if self.since is None:
            self.since = step
        if step - self.since < self.steps:
            return QUIET
        where = f" at {step / max_steps:.0%} of max_steps {max_steps}" if max_steps else ""
        return Finding(
            True,
            f"the learning rate is {lr:.3g} ({lr / self.peak if self.peak else 0.0:.2g} of its peak {self.peak:.3g}) "
            f"since step {self.since}{where}: the schedule ended before the run; check its total steps or epochs",
        )


class TrendDetector:
    """A divergence that creeps: the loss level (the median of a few block medians of log-loss) at least
    `trend_rise` above its best level beyond noise, and rising significantly (Mann-Kendall z above
    `trend_z`) over two nested horizons, `trend_horizon` steps and twice that. Requiring both horizons is
    what keeps a bounded oscillation quiet: over the longer one it does not rise. Once raised it holds
    until the level is back within half of `trend_rise` of the best. A rise too slow to reach `trend_rise`
    (a loss whose fall goes on under the creep) counts by its length instead: beyond noise, rising over
    the longer horizon and over the whole window since the best level, at least twice that horizon; it
    then holds until the level is back within half of the rise it was raised at."""

    def __init__(self, spec: DetectorSpec, max_steps: int | None) -> None:
        horizon = max(spec.trend_horizon, (max_steps or 0) // 40)
        self.block = max(1, horizon // TREND_BLOCKS)
        self.n = max(4, horizon // self.block)
        self.series = BlockMedians(self.block, keep=2 * self.n)
        self.level_blocks = max(2, self.n // 4)
        self.rise = math.log1p(spec.trend_rise)
        self.z = spec.trend_z
        self.sigmas = spec.noise_sigmas
        self.best: float | None = None
        self.curvature: deque[float] = deque(maxlen=64)  # |second differences| of the block medians
        self.since_best: list[float] = []  # the block medians since the best level, thinned to at most 8 n
        self.raised_at = self.rise  # the rise it was raised at: it clears below half of it
        self.finding = QUIET

    def update(self, step: int, loss: float, past_warmup: bool) -> Finding:
        if not math.isfinite(loss) or loss <= 0.0 or not self.series.add(step, math.log(loss)):
            return self.finding
        blocks = self.series.blocks
        if len(blocks) >= 3:
            self.curvature.append(abs(blocks[-1] - 2.0 * blocks[-2] + blocks[-3]))
        if len(blocks) < self.level_blocks or len(self.curvature) < 4:
            return self.finding
        level = median_sorted(sorted(list(blocks)[-self.level_blocks :]))
        if past_warmup and (self.best is None or level < self.best):
            self.best = level
            self.since_best = []
        else:
            self.since_best.append(blocks[-1])
            if len(self.since_best) > 8 * self.n:  # halve the resolution, keep the whole window
                pairs = self.since_best
                self.since_best = [0.5 * (a + b) for a, b in zip(pairs[::2], pairs[1::2], strict=False)]
        if self.best is None:
            return self.finding
        rise = level - self.best
        if self.finding.holds:
            if rise < 0.5 * min(self.rise, self.raised_at):
                self.finding = QUIET
            return self.finding
        # one block median's noise, from second differences (a trend does not inflate them)
        noise = median_sorted(sorted(self.curvature)) * MAD_TO_SIGMA / math.sqrt(6.0)
        margin = self.sigmas * math.sqrt(2.0) * 1.25 * noise / math.sqrt(self.level_blocks)
        if rise <= margin or len(blocks) < 2 * self.n:
            return self.finding
        longer = self.series.last(2 * self.n)
        z_short, z_long = mann_kendall_z(longer[-self.n :]), mann_kendall_z(longer)
        if rise > self.rise + margin and z_short > self.z and z_long > self.z:
            self._raise(
                rise,
                f"the loss has crept up to {math.expm1(rise):.0%} above its best level {math.exp(self.best):.4g} "
                f"and keeps rising over the last {self.n * self.block} and {2 * self.n * self.block} steps "
                f"(Mann-Kendall z {z_short:.1f}, {z_long:.1f})",
            )
            return self.finding
        # a rise too slow for `trend_rise` by now: the whole window since the best level, at least twice the
        # longer horizon, rising significantly and still rising over the longer horizon. The evidence is the
        # rise's length, not its size: a bounded oscillation around its level does not rise over the whole.
        if len(self.since_best) >= 4 * self.n:
            z_all = mann_kendall_z(np.asarray(self.since_best, dtype=float))
            if z_all > self.z and z_long > self.z:
                self._raise(
                    rise,
                    f"the loss has crept up to {math.expm1(rise):.0%} above its best level "
                    f"{math.exp(self.best):.4g} and has kept rising since it was there, over "
                    f"{len(self.since_best)} blocks (Mann-Kendall z {z_all:.1f}, {z_long:.1f} over the last "
                    f"{2 * self.n * self.block} steps)",
                )
        return self.finding

    def _raise(self, rise: float, detail: str) -> None:
        self.finding, self.raised_at = Finding(True, detail), rise


class ValidationDivergence:
    """Worse than at the start on both losses: the last `overfit_evals` evaluations all at least `trend_rise`
    above the first one, and the train loss EMA `trend_rise` above where it was at the first evaluation (or
    at its first value after it, in a log whose train loss starts later). A run that learned and then
    oscillates (a GAN, warm restarts) stays below where it began; overfitting is the case where the train
    loss falls. It counts during warm-up too: evaluations are averages over a whole set, and a rise sustained
    over several of them with the train loss rising as well is no warm-up transient but a peak learning rate
    too high (a Whisper fine-tune at a hundred times its usual rate: eval loss 2.55, then 3.2-4.5, the
    train loss 1.24 -> 2.03 as the warm-up climbs). Holds until an evaluation breaks the condition."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.evals = spec.overfit_evals
        self.rise = spec.trend_rise
        self.first: float | None = None
        self.train_first: float | None = None
        self.above = 0  # evaluations in a row `trend_rise` above the first
        self.finding = QUIET

    def restart(self) -> None:
        """Count evaluations in a row afresh (the first evaluation and train loss stay the reference)."""
        self.above, self.finding = 0, QUIET

    def update(self, val_loss: float, train_ema: float | None) -> Finding:
        if not math.isfinite(val_loss):
            return self.finding
        if self.first is None:
            self.first = val_loss
        if self.train_first is None:
            self.train_first = train_ema
        self.above = self.above + 1 if val_loss > self.first * (1.0 + self.rise) else 0
        base = self.train_first
        worse = train_ema is not None and base is not None and base > 0.0 and train_ema > base * (1.0 + self.rise)
        if self.above < self.evals or not worse:
            self.finding = QUIET
            return self.finding
        assert train_ema is not None and base is not None
        self.finding = Finding(
            True,
            f"the val loss is {val_loss / self.first - 1.0:+.0%} over its first evaluation {self.first:.4g} for "
            f"{self.above} evaluations and the train loss EMA {train_ema / base - 1.0:+.0%} over where it was "
            f"then: the run is worse than at its start on both (a learning rate too high?)",
            urgent=True,
        )
        return self.finding


class GradNormTracker:
    """The global gradient norm against its own baseline, in log scale, without per-layer data.

    Its level is the median of the norms of the last `grad_norm_window` steps (at least
    `GRAD_LEVEL_VALUES`); its baseline the lowest level seen past warm-up. Exploding: the level
    `grad_explode_factor` times the baseline. Growth (an early warning): over `grad_growth_horizon` steps
    the norm rose significantly (Mann-Kendall z above `trend_z` on block medians), by `grad_growth_factor`
    (Theil-Sen slope), and the level is that far above the baseline too."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.window = spec.grad_norm_window
        self.explode_factor = spec.grad_explode_factor
        self.growth = math.log(spec.grad_growth_factor)
        self.z = spec.trend_z
        self.recent: deque[tuple[int, float]] = deque()
        self.baseline: float | None = None
        block = max(1, spec.grad_growth_horizon // GROWTH_BLOCKS)
        self.series = BlockMedians(block, keep=GROWTH_BLOCKS)
        self.last_step: int | None = None
        self.explode = QUIET
        self.grow = QUIET

    def update(self, step: int, grad_norm: float | None, past_warmup: bool) -> tuple[Finding, Finding]:
        """Returns (exploding, growing)."""
        if grad_norm is None or step == self.last_step or not math.isfinite(grad_norm) or grad_norm <= 0.0:
            return self.explode, self.grow
        self.last_step = step
        value = math.log(grad_norm)
        recent = self.recent
        recent.append((step, value))
        while len(recent) > GRAD_LEVEL_VALUES and recent[0][0] <= step - self.window:
            recent.popleft()
        closed = self.series.add(step, value)
        if len(recent) < GRAD_LEVEL_VALUES:
            return self.explode, self.grow
        level = median_sorted(sorted(v for _, v in recent))
        if past_warmup and (self.baseline is None or level < self.baseline):
            self.baseline = level
        if self.baseline is None:
            return self.explode, self.grow
        above = level - self.baseline
        self.explode = QUIET
        if above >= math.log(self.explode_factor):
            self.explode = Finding(
                True,
                f"global grad norm {math.exp(level):.3g} (median of the last {len(recent)}) is "
                f"{math.exp(above):.0f}x its baseline {math.exp(self.baseline):.3g} (limit {self.explode_factor:g}x)",
            )
        if closed and len(self.series.blocks) == GROWTH_BLOCKS:
            blocks = self.series.last(GROWTH_BLOCKS)
            grown = theil_sen(blocks, np.arange(GROWTH_BLOCKS, dtype=float)) * GROWTH_BLOCKS
            z = mann_kendall_z(blocks) if grown >= self.growth and above >= self.growth else 0.0
            self.grow = QUIET
            if z > self.z:
                span = GROWTH_BLOCKS * self.series.block
                self.grow = Finding(
                    True,
                    f"global grad norm grew {math.exp(grown):.1f}x over the last {span} steps (Mann-Kendall z "
                    f"{z:.1f}) to {math.exp(above):.1f}x its baseline {math.exp(self.baseline):.3g}: often "
                    "the precursor of a blow-up",
                )
        return self.explode, self.grow


class SpikeRecurrence:
    """Instability: `spike_recurrence` loss spikes within `spike_recurrence_steps`, each larger than the one
    before. Reported as a divergence (the guard's rollback with a lower learning rate is the remedy); holds
    until a spike-free `spike_recurrence_steps`."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.count = spec.spike_recurrence
        self.steps = spec.spike_recurrence_steps
        self.spikes: deque[tuple[int, float]] = deque(maxlen=spec.spike_recurrence)
        self.in_spike = False
        self.finding = QUIET

    def update(self, step: int, spiking: bool, ratio: float) -> Finding:
        if spiking and not self.in_spike:
            self.spikes.append((step, ratio))
            spikes = list(self.spikes)
            if (
                len(spikes) == self.count
                and step - spikes[0][0] <= self.steps
                and all(b[1] > a[1] for a, b in zip(spikes, spikes[1:], strict=False))
            ):
                sizes = ", ".join(f"{r:.1f}x" for _, r in spikes)
                self.finding = Finding(
                    True,
                    f"{self.count} loss spikes in {step - spikes[0][0]} steps, each larger than the last ({sizes}): "
                    "the run is unstable",
                )
        self.in_spike = spiking
        if self.finding.holds and self.spikes and step - self.spikes[-1][0] > self.steps:
            self.finding = QUIET
        return self.finding


class SkipCounter:
    """Steps whose loss is finite but whose gradient is not: GradScaler's skipped steps under AMP. One now
    and then (the scaler growing its scale every 2000 steps) is counted, not alarmed; `nonfinite_skips`
    of them within `nonfinite_window` steps is the `nonfinite` alarm."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.limit = spec.nonfinite_skips
        self.window = spec.nonfinite_window
        self.recent: deque[int] = deque()
        self.total = 0

    def update(self, step: int, skipped: bool) -> Finding:
        if skipped:
            self.total += 1
            self.recent.append(step)
        while self.recent and self.recent[0] <= step - self.window:
            self.recent.popleft()
        if len(self.recent) >= self.limit:
            return Finding(
                True,
                f"{len(self.recent)} steps with a non-finite gradient (finite loss) in the last {self.window} "
                f"steps ({self.total} in all): more than a loss scaler's occasional skip",
                urgent=True,
            )
        return QUIET
