"""Online detectors of training dynamics: the run's phase and its anomalies.

Plain Python over floats the worker already holds on the host (no torch, no host syncs here).
Each detector is a small class fed one observation at a time and answers with a `Finding`;
`DynamicsMonitor` wires them together, latches anomalies with hysteresis and reports each change
once as an `Event`. Windows count observations, not step indices; thresholds come from
`DetectorSpec` (the job spec's `telemetry.detectors`).

Every comparison is made against the curve's own noise, estimated as it goes: a level is an EMA
with a standard error, a best level is the lowest upper bound seen, and a change counts only when
it clears `noise_sigmas` of that noise. That is what keeps a noisy healthy run quiet.
`gradwatch replay` feeds recorded curves through this same code.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Mapping
from typing import Any

from gradwatch.names import ANOMALIES
from gradwatch.spec_telemetry import DetectorSpec
from workers.detectors.base import MAD_TO_SIGMA as _MAD_TO_SIGMA
from workers.detectors.base import QUIET as _QUIET
from workers.detectors.base import Event, Finding, SortedWindow
from workers.detectors.base import median_sorted as _median_sorted
from workers.detectors.base import resolution as _resolution
from workers.detectors.signals import (
    DeadRunDetector,
    GradNormTracker,
    LrScheduleDetector,
    SkipCounter,
    SpikeRecurrence,
    TrendDetector,
    ValidationDivergence,
)

_SPIKE_SCALE_FLOOR = 0.01  # in log space: a perfectly flat history still needs a 1 % x spike_z jump
_SPIKE_MIN_SAMPLES = 16
_SCALE_EVERY = 8  # the spike window's MAD and the noise estimate are refreshed this often (they move slowly)
_INITIAL_SAMPLES = 5  # the initial level is the median of the first few losses
_REENTER_RAPID = 1.5  # back into rapid learning takes this much more slope than staying in it
_RECENT_FOR_JUMP = 9  # a lasting jump: the median of this many latest losses
_STALL_AFTER_WINDOWS = 2.5  # a stall is judged this many windows in: a slow fine-tune shows its fall by then
_BLOWUP = 10.0  # the median of the latest losses this many times the start (or best) is a divergence
_MIN_RISE_OF_START = 0.02  # a divergence rises at least this fraction of the start above the best level
_WELL_MEASURED = 0.3  # one loss's noise below this fraction of its level
_LR_TAIL = 0.05  # below this fraction of its peak the learning rate is in the schedule's tail
_LR_TOO_LOW_MEASUREMENTS = 3  # measured steps in a row
_TINY = 1e-12
_SKIPS_IN_A_ROW = 16  # GradScaler halves its scale at each skip: 16 in a row take it from 65536 to 1
_FEW_EVALS = 8  # below this many evaluations the validation noise is not measured yet
_DEAD_LAYER_MEASUREMENTS = 3  # a dead layer: exactly 0 on at least this many measurements
_LONG_HISTORY = 256  # the EMA's whole-run history keeps at most this many points (thinned as the run grows)
_LEVEL_ROWS = 4096  # the latest level is a mean of at most this many losses
_CROSSINGS = 5  # the oscillation period: from the last this many crossings of the EMA and a slower one
_PERIOD_ROWS = 512  # the phase's slope is measured over a whole oscillation period, up to this many losses
_SLOW_EMA = 0.1  # the slower EMA's alpha, as a share of ema_alpha


class LossTracker:
    """The train loss smoothed: EMA with its standard error, initial level, and the noise of one loss.

    The EMA is bias-corrected (early on it is the weighted mean of the losses so far, not the first
    one) and robust: a loss above `ceiling` (the spike detector's bound) enters it at the ceiling,
    so one bad batch does not move it; a lasting jump soon raises the ceiling with it. The noise is
    the robust standard deviation of consecutive differences, which a trend does not inflate.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.alpha = spec.ema_alpha
        history = max(spec.plateau_window, spec.phase_window, _PERIOD_ROWS) + 1
        self.ema_history: deque[float] = deque(maxlen=history)
        self.count_history: deque[int] = deque(maxlen=history)
        self.diffs = SortedWindow(spec.spike_window)
        self.first: list[float] = []
        self.previous: float | None = None
        self.ema_raw = 0.0
        self.decay_power = 1.0
        self.ema: float | None = None
        # What the run has learned: the mean of its first `plateau_window` losses against the mean of
        # its latest ones (two windows that do not overlap), each with its standard error.
        self.window = spec.plateau_window
        self.first_window: list[float] = []
        self.first_level = 0.0
        self.latest: deque[float] = deque(maxlen=spec.plateau_window)
        self.latest_sum = 0.0
        self.sigmas = spec.noise_sigmas
        self.initial: float | None = None
        self.initial_sigma = 0.0
        self.sigma = 0.0  # one loss's noise
        self.ceiling: float | None = None  # the spike bound the last loss was held to
        self.steps = 0
        self.finite_steps = 0
        # The whole run's EMA, thinned (every `long_every`-th finite loss): falls over half the run so far.
        self.long_steps: list[int] = []
        self.long_emas: list[float] = []
        self.long_counts: list[int] = []
        self.long_sums: list[float] = []  # the running sum of the losses at each point: means between them
        self.long_every = 1
        self.step = 0  # the optimizer step of the last finite loss
        # Running sums of the latest losses: the mean over any recent window, for levels longer than a period.
        self.sums: deque[float] = deque([0.0], maxlen=_LEVEL_ROWS + 1)
        self.total = 0.0
        # An oscillation's period: steps between crossings of the EMA and a slower EMA.
        self.slow: float | None = None
        self.above_slow: bool | None = None
        self.crossings: deque[int] = deque(maxlen=_CROSSINGS)

    def update(self, loss: float, ceiling: float | None = None, step: int | None = None) -> bool:
        """Take one step's loss; a non-finite loss leaves the EMA as it was. Returns whether it was finite."""
        self.steps += 1
        if not math.isfinite(loss):
            return False
        self.finite_steps += 1
        self.step = self.finite_steps if step is None else step
        self.ceiling = ceiling
        smoothed = loss if ceiling is None else min(loss, ceiling)
        raw = (1.0 - self.alpha) * self.ema_raw + self.alpha * smoothed  # convex: cannot overflow
        self.ema_raw = raw if math.isfinite(raw) else self.alpha * smoothed
        self.decay_power *= 1.0 - self.alpha
        correction = 1.0 - self.decay_power
        ema = self.ema_raw / correction if correction > 0.0 else smoothed
        self.ema = ema if math.isfinite(ema) else smoothed  # rounding at the edge of the float range
        if self.previous is not None:
            self.diffs.add(abs(smoothed - self.previous))
            if self.finite_steps % _SCALE_EVERY == 0 or len(self.diffs) < _SCALE_EVERY:
                # |x_i - x_{i-1}| of iid noise has median 0.6745 * sqrt(2) * sigma
                self.sigma = self.diffs.median() * _MAD_TO_SIGMA / math.sqrt(2.0)
        self.previous = smoothed
        if len(self.first_window) < self.window:
            self.first_window.append(smoothed)
            if len(self.first_window) == self.window:
                # the median: a blow-up in the first steps (a learning rate far too high) must not
                # look like a high start the run then "learned" its way down from
                self.first_level = _median_sorted(sorted(self.first_window))
        else:
            if len(self.latest) == self.window:
                self.latest_sum -= self.latest[0]
            self.latest.append(smoothed)
            self.latest_sum += smoothed
        if len(self.first) < _INITIAL_SAMPLES:
            self.first.append(loss)
            self.initial = _median_sorted(sorted(self.first))
            self.initial_sigma = 1.25 * max(self.sigma, _TINY) / math.sqrt(len(self.first))
        self.ema_history.append(self.ema)
        self.count_history.append(self.finite_steps)
        self._long_and_level(smoothed)
        return True

    def _long_and_level(self, smoothed: float) -> None:
        assert self.ema is not None
        if (self.finite_steps - 1) % self.long_every == 0:
            if len(self.long_steps) == _LONG_HISTORY:  # keep every other point: the history spans the whole run
                self.long_steps, self.long_emas = self.long_steps[::2], self.long_emas[::2]
                self.long_counts, self.long_sums = self.long_counts[::2], self.long_sums[::2]
                self.long_every *= 2
            self.long_steps.append(self.step)
            self.long_emas.append(self.ema)
            self.long_counts.append(self.finite_steps - 1)
            self.long_sums.append(self.total)  # the sum before this loss: means of the losses between points
        self.total += smoothed
        self.sums.append(self.total)
        slow_alpha = self.alpha * _SLOW_EMA
        self.slow = self.ema if self.slow is None else (1.0 - slow_alpha) * self.slow + slow_alpha * self.ema
        # a crossing counts once the EMA is clearly on the other side: its own noise does not cross
        margin = 2.0 * self.sigma * math.sqrt(self.alpha / (2.0 - self.alpha))
        above = True if self.ema > self.slow + margin else False if self.ema < self.slow - margin else self.above_slow
        if self.above_slow is not None and above is not None and above != self.above_slow:
            self.crossings.append(self.finite_steps)
        self.above_slow = above

    def period(self) -> float:
        """The loss's oscillation period in observations, from the last crossings of its EMA and a slower EMA
        (0 until there are enough of them). Noise gives short periods; a trend gives none."""
        if len(self.crossings) < _CROSSINGS:
            return 0.0
        c = list(self.crossings)
        return 2.0 * _median_sorted(sorted(b - a for a, b in zip(c, c[1:], strict=False)))

    def long_fall(self, horizon: int) -> tuple[float, float, float] | None:
        """(how much the loss level fell over the last `horizon` steps, the noise of that fall, the level
        now); levels are means over a quarter of the horizon (at least `plateau_window` losses), so a
        long horizon is measured as precisely as its length allows. None before the history reaches back."""
        if len(self.long_steps) < 4 or self.step - self.long_steps[0] < horizon:
            return None
        counts, sums = self.long_counts, self.long_sums
        i = bisect_right(self.long_steps, self.step - horizon) - 1
        rows = max(self.window, (self.finite_steps - counts[i]) // 4, int(2 * self.period()))
        j = max(0, bisect_right(counts, self.finite_steps - rows) - 1)  # the latest level: from point j to now
        k = max(0, bisect_right(counts, counts[i] - rows) - 1)  # the earlier level: from point k to point i
        n_now, n_then = self.finite_steps - counts[j], counts[i] - counts[k]
        if n_now < 1 or n_then < 1:
            return None
        now, then = (self.total - sums[j]) / n_now, (sums[i] - sums[k]) / n_then
        return then - now, self.sigma * math.sqrt(1.0 / n_now + 1.0 / n_then), now

    def latest_mean(self, rows: int) -> float:
        """The mean of the latest `rows` losses (as the EMA took them; at most the history held)."""
        rows = max(1, min(rows, len(self.sums) - 1))
        return (self.sums[-1] - self.sums[-1 - rows]) / rows

    def ema_sigma(self, n: int | None = None) -> float:
        """Standard error of the EMA after n finite losses (default: now), from the current noise."""
        return self.sigma * math.sqrt(_weight_share(self.alpha, self.finite_steps if n is None else n))

    def learned_at_most(self) -> tuple[float, float] | None:
        """(upper bound of how much the loss fell from its first window to its latest, first window's
        mean); None until both windows are full."""
        if len(self.latest) < self.window or self.finite_steps < _STALL_AFTER_WINDOWS * self.window:
            return None
        first = self.first_level
        # the latest level over at least two periods of an oscillation: a crest is not a level
        rows = max(self.window, min(int(2 * self.period()), self.finite_steps - self.window))
        latest = self.latest_mean(rows)
        margin = self.sigmas * math.hypot(1.25, 1.0) * self.sigma / math.sqrt(self.window)  # a median, a mean
        return first - latest + margin, first

    def fall(self, window: int) -> float | None:
        """How much the EMA fell over the last `window` observations (negative when it rose)."""
        if len(self.ema_history) <= window:
            return None
        return self.ema_history[-1 - window] - self.ema_history[-1]

    def fall_noise(self, window: int) -> float:
        """Standard deviation that noise alone would give `fall(window)`; on the safe (large) side, as
        it ignores that the two ends share samples."""
        if len(self.count_history) <= window:
            return 0.0
        share = _weight_share(self.alpha, self.count_history[-1 - window]) + _weight_share(
            self.alpha, self.count_history[-1]
        )
        return self.sigma * math.sqrt(share)


def _weight_share(alpha: float, n: int) -> float:
    """Variance of the bias-corrected EMA of n iid samples, in units of one sample's variance."""
    if n < 1 or alpha >= 1.0:
        return 1.0
    q = 1.0 - alpha
    qn = q**n
    if qn >= 1.0:  # alpha too small to register in floating point: a plain mean
        return 1.0 / n
    return alpha * (1.0 - qn * qn) / ((2.0 - alpha) * (1.0 - qn) * (1.0 - qn))


class SpikeDetector:
    """One loss far above its recent history: a robust z-score of log(loss) against the median/MAD of
    the last losses (log space, because batch noise is right-skewed and scales with the loss), and
    at least `spike_min_ratio` times the median. Losses <= 0 are judged in linear space. The scale is
    at least the rounding step of the logged losses over their median: 0.0008 after a run of 0.0002 and
    0.0003 in a log of 4 decimals is a few rounding steps, not a spike."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.z = spec.spike_z
        self.min_ratio = spec.spike_min_ratio
        self.window = SortedWindow(spec.spike_window)
        self.scale = 0.0
        self.seen = 0
        self.ceiling: float | None = None
        self.ratio = 1.0  # the last spike's loss over the recent median
        # the rounding steps of every `_SCALE_EVERY`-th loss of the window (a log rounds all its losses alike)
        self.steps: deque[float] = deque(maxlen=spec.spike_window // _SCALE_EVERY + 1)
        self.step = 0.0  # the largest of them, refreshed with the scale

    def update(self, loss: float) -> Finding:
        """Judge one loss against the window before it; afterwards `ceiling` is the bound it was held to."""
        self.ceiling = None
        if not math.isfinite(loss) or loss <= 0.0:
            return _QUIET  # non-finite: its own event; <= 0: no log scale to judge it on
        value = math.log(loss)
        finding = _QUIET
        if len(self.window) >= _SPIKE_MIN_SAMPLES:
            median = self.window.median()
            if self.seen % _SCALE_EVERY == 0 or not self.scale:
                self.step = max(self.steps, default=0.0)
                self.scale = max(_MAD_TO_SIGMA * self.window.mad(median), _SPIKE_SCALE_FLOOR)
            scale = max(self.scale, self.step / math.exp(median))
            bound = median + max(self.z * scale, math.log(self.min_ratio))
            self.ceiling = math.exp(min(bound, 700.0))
            if value > bound:
                z = (value - median) / scale
                self.ratio = math.exp(value - median)
                finding = Finding(
                    True,
                    f"loss {loss:.4g} is {math.exp(value - median):.1f}x the median "
                    f"{math.exp(median):.4g} of the last {len(self.window)} losses "
                    f"({z:.1f} robust standard deviations in log scale)",
                )
        if self.seen % _SCALE_EVERY == 0:
            self.steps.append(_resolution(loss))
        self.seen += 1
        self.window.add(value)
        return finding


class DivergenceDetector:
    """The run got worse and stays worse, in one of four ways:
    - the loss level (EMA, less its noise margin) above `divergence_factor` times its best level
      (the lowest EMA plus its noise margin seen so far), or the median of the latest losses there
      (a lasting jump, before the robust EMA catches up);
    - the loss level above where the run started by `divergence_rise`, for `divergence_patience` steps
      past warm-up (a learning rate so high the run never learns);
    - `nonfinite_steps` non-finite steps in a row (one is a `nonfinite` event: the loop skipped it);
    - a blow-up: the median of the latest losses over 10x the start, even during warm-up.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.factor = spec.divergence_factor
        self.rise = spec.divergence_rise
        self.patience = spec.divergence_patience
        self.nonfinite_limit = spec.nonfinite_steps
        self.sigmas = spec.noise_sigmas
        self.best_upper: float | None = None
        self.recent: deque[float] = deque(maxlen=_RECENT_FOR_JUMP)
        self.nonfinite_run = 0
        self.skipped_run = 0
        self.since_warmup: deque[float] = deque(maxlen=spec.divergence_patience)  # losses past warm-up

    def update(
        self, loss: float, finite_step: bool, tracker: LossTracker, past_warmup: bool, skipped: bool = False
    ) -> Finding:
        """`skipped`: the loss was finite, the gradient not (a loss scaler's skip): those count in a row up
        to `_SKIPS_IN_A_ROW`, a non-finite loss up to `nonfinite_steps`."""
        if not finite_step:
            self.nonfinite_run += 1
            self.skipped_run = self.skipped_run + 1 if skipped else 0
            most = _SKIPS_IN_A_ROW if self.skipped_run == self.nonfinite_run else self.nonfinite_limit
            if self.nonfinite_run >= most:
                return Finding(True, f"{self.nonfinite_run} non-finite steps in a row (last loss {loss})", urgent=True)
            return _QUIET
        self.nonfinite_run = self.skipped_run = 0
        ema = tracker.ema
        if ema is None:
            return _QUIET
        margin = self.sigmas * tracker.ema_sigma()
        upper, lower = ema + margin, ema - margin
        if past_warmup and (self.best_upper is None or upper < self.best_upper):
            self.best_upper = upper
        self.recent.append(loss)
        best = self.best_upper
        # Medians of a few losses and a start from the first five mean something only while one loss's
        # noise is well below its level; on noisier curves (a loss near zero) the EMA rule alone judges.
        well_measured = tracker.sigma < _WELL_MEASURED * abs(ema)
        if best is not None and best > 0.0:
            # a rise that is a sliver of where the run started (losses near zero) is not a divergence
            limit = max(self.factor * best, best + _MIN_RISE_OF_START * (tracker.initial or 0.0))
            if lower > limit:
                return Finding(
                    True, f"loss EMA {ema:.4g} is {ema / best:.1f}x its best level {best:.4g} (limit {self.factor:g}x)"
                )
            if len(self.recent) == self.recent.maxlen and well_measured:
                median = _median_sorted(sorted(self.recent))
                # the median of n losses: about 1.25 sigma / sqrt(n)
                if median - self.sigmas * 1.25 * tracker.sigma / math.sqrt(len(self.recent)) > limit:
                    return Finding(
                        True,
                        f"the last {len(self.recent)} losses (median {median:.4g}) are above "
                        f"{self.factor:g}x the best loss level {best:.4g}",
                    )
        start = tracker.initial
        if start is not None and start > 0.0 and len(self.recent) == self.recent.maxlen:
            # a blow-up outruns every noise estimate (the noise grows with it): judge it by size alone
            median = _median_sorted(sorted(self.recent))
            # the start's noise as measured over the first steps: a blow-up inflates every later estimate
            if median > _BLOWUP * max(start + self.sigmas * tracker.initial_sigma, best or 0.0):
                return Finding(
                    True,
                    f"the last {len(self.recent)} losses (median {median:.4g}) are over "
                    f"{_BLOWUP:g}x where the run started ({start:.4g})",
                    urgent=True,
                )
        if past_warmup and start is not None and start > 0.0:
            self.since_warmup.append(min(loss, tracker.ceiling) if tracker.ceiling is not None else loss)
            n = len(self.since_warmup)
            if n == self.patience and well_measured:
                mean = sum(self.since_warmup) / n
                # 2 sigma, not noise_sigmas: healthy runs end far below their start, so this test has slack
                start_upper = start + 2.0 * 1.25 * tracker.sigma / math.sqrt(len(tracker.first))
                if mean - self.sigmas * tracker.sigma / math.sqrt(n) > (1.0 + self.rise) * start_upper:
                    return Finding(
                        True,
                        f"the mean loss of the last {n} steps ({mean:.4g}) is above where the "
                        f"run started ({start:.4g}): it is getting worse, not learning",
                    )
        return _QUIET


class PlateauDetector:
    """Flat: the loss EMA fell no more than noise over `plateau_window` steps (with hysteresis: flat
    ends only on a fall clearly beyond noise). Stalled, the plateau anomaly behind TrainingStalled:
    flat, and surely not learning: even the upper bound of how far the loss fell from its first
    `plateau_window` steps to its latest ones is below `stalled_improvement` of where it started (or
    the loss is above `converged_loss`, when set). Flat after learning is convergence.

    A curve too noisy to tell within a window is never called stalled.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.window = spec.plateau_window
        self.share = spec.judge_after_share
        self.stalled_improvement = spec.stalled_improvement
        self.converged_loss = spec.converged_loss
        self.sigmas = spec.noise_sigmas
        self.flat = False
        self.stalled = False

    def update(self, tracker: LossTracker, elapsed: int = 0, max_steps: int | None = None) -> Finding:
        """`elapsed`: steps since the first observation; with `max_steps` no stall before `judge_after_share`."""
        fall = tracker.fall(self.window)
        if fall is None:
            return _QUIET
        noise = tracker.fall_noise(self.window)
        if self.flat:
            if abs(fall) > 2.0 * self.sigmas * noise:  # wide hysteresis: a converged run does not flap
                self.flat = False
        elif abs(fall) <= self.sigmas * noise:
            self.flat = True  # rising beyond noise is not flat (divergence judges it); <=: a dead run has no noise
        self.stalled = False
        if not self.flat or (max_steps is not None and elapsed < self.share * max_steps):
            return _QUIET
        if self.converged_loss is not None:
            self.stalled = tracker.ema is not None and tracker.ema > self.converged_loss
            if self.stalled:
                return Finding(True, f"loss EMA {tracker.ema:.4g} is flat above converged_loss {self.converged_loss:g}")
            return _QUIET
        learned = tracker.learned_at_most()
        if learned is None:
            return _QUIET
        at_most, first = learned
        self.stalled = at_most < self.stalled_improvement * abs(first)
        if not self.stalled:
            return _QUIET
        return Finding(
            True,
            f"loss EMA {tracker.ema:.4g} is flat and has fallen at most {at_most / abs(first):.1%} "
            f"from its first {self.window} steps (mean {first:.4g}): the run is not learning",
        )


class OverfittingDetector:
    """Validation loss rising while the train loss falls, with few or many evaluations.

    With `_FEW_EVALS` evaluations or more: above its best level by more than noise and `overfit_min_rise`,
    `overfit_evals` evaluations in a row, while the train loss EMA is below where it was at that best. The
    noise comes from second differences of the evaluations, which a steady rise does not inflate; the
    best level is the lowest upper bound (evaluation plus its noise margin) seen, and each evaluation
    counts by its lower bound. With fewer (a fine-tune's 3-5): the last `overfit_evals` evaluations all
    after the best, each above the one before, the last `overfit_few_rise` above the best, the train loss
    falling; a rise twice that size needs one evaluation fewer (a Whisper fine-tune evaluated every 1000
    steps whose eval loss goes 0.32, 0.36, 0.39 is overfitting at the third, not the fourth). That fast
    path is for a run that will have few evaluations: when `max_steps` and the evaluations' spacing say
    twice `_FEW_EVALS` or more are planned, it waits for the noise. In a run of fewer than that, a rise
    under `overfit_min_rise` counts when it is monotone over `overfit_evals` + 1 evaluations and beyond
    noise (`_creeping`). Holds until the validation loss comes back.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.evals = spec.overfit_evals
        self.min_rise = spec.overfit_min_rise
        self.few_rise = spec.overfit_few_rise
        self.sigmas = spec.noise_sigmas / math.sqrt(2.0)  # a margin on each side of the difference
        self.best_upper: float | None = None
        self.train_at_best: float | None = None
        self.values: deque[float] = deque(maxlen=64)
        self.trains: deque[float | None] = deque(maxlen=64)
        self.curvature: deque[float] = deque(maxlen=16)
        self.count = 0
        self.streak = 0
        self.last_step: int | None = None

    def update(
        self, val_loss: float, train_ema: float | None, step: int | None = None, max_steps: int | None = None
    ) -> Finding:
        if not math.isfinite(val_loss):
            return _QUIET
        self.count += 1
        self.values.append(val_loss)
        self.trains.append(train_ema)
        gap = None if step is None or self.last_step is None else step - self.last_step
        self.last_step = step
        if len(self.values) >= 3:
            a, b, c = self.values[-3], self.values[-2], self.values[-1]
            self.curvature.append(abs(c - 2.0 * b + a))
        planned = self.count  # the evaluations the run will have, when its length and their spacing say
        if step is not None and max_steps is not None and gap is not None and gap > 0:
            planned += max(0, max_steps - step) // gap
        if self.count < _FEW_EVALS:
            # a run that will have many evaluations waits for their noise: enough are left to judge with
            return _QUIET if planned >= 2 * _FEW_EVALS else self._few(val_loss, train_ema)
        # |x_i - 2 x_{i-1} + x_{i-2}| of iid noise has median 0.6745 * sqrt(6) * sigma
        noise = _median_sorted(sorted(self.curvature)) * _MAD_TO_SIGMA / math.sqrt(6.0)
        upper, lower = val_loss + self.sigmas * noise, val_loss - self.sigmas * noise
        if self.best_upper is None:  # the best so far may be one of the first few evaluations
            at = min(range(len(self.values)), key=self.values.__getitem__)
            self.best_upper, self.train_at_best = self.values[at] + self.sigmas * noise, self.trains[at]
        if upper < self.best_upper:
            self.best_upper, self.train_at_best = upper, train_ema
        best = self.best_upper
        train_falling = train_ema is not None and self.train_at_best is not None and train_ema < self.train_at_best
        self.streak = self.streak + 1 if lower > best + self.min_rise * abs(best) and train_falling else 0
        if self.streak >= self.evals:
            return Finding(
                True,
                f"val loss {val_loss:.4g} is above its best level {best:.4g} for {self.streak} "
                f"evaluations while the train loss kept falling",
            )
        # with few evaluations their noise cannot be told from the curve's own bend and a monotone rise is
        # the evidence; with more, the noise is measured and a monotone run of noise turns up by chance
        return self._creeping(val_loss, train_ema) if planned < 2 * _FEW_EVALS else _QUIET

    def _creeping(self, val_loss: float, train_ema: float | None) -> Finding:
        """A slow rise under `overfit_min_rise` of the best level (yet at least that share of the fall from
        the first evaluation to the best): every one of the last `overfit_evals` + 1 evaluations above
        the one before, all after the lowest, the last above it beyond the noise of the evaluations from just
        before the lowest on (their second differences: the noise falls with the loss level, and the steep
        part of the curve would inflate it), the train loss falling. Noise alone rarely climbs that many
        times in a row out of its minimum."""
        values = list(self.values)
        best_at = min(range(len(values)), key=values.__getitem__)
        run = values[best_at:]
        train_best = self.trains[best_at]
        best = values[best_at]
        rise = val_loss - best
        if (
            rise >= self.min_rise * abs(best)  # a rise that size is the streak's to judge, with its noise bounds
            or rise < self.min_rise * (values[0] - best)  # a speck against what the evaluations had learned
            or len(run) < self.evals + 2
            or train_ema is None
            or train_best is None
            or train_ema >= train_best
            or not all(b > a for a, b in zip(run[-self.evals - 2 :], run[-self.evals - 1 :], strict=False))
        ):
            return _QUIET
        near = values[max(0, best_at - 2) :]  # the noise where the loss is now, not where it fell from
        curvature = sorted(abs(c - 2.0 * b + a) for a, b, c in zip(near, near[1:], near[2:], strict=False))
        noise = _median_sorted(curvature) * _MAD_TO_SIGMA / math.sqrt(6.0)
        if rise <= 2.0 * self.sigmas * noise:  # a margin on each side of the difference
            return _QUIET
        return Finding(
            True,
            f"val loss rose at each of the last {self.evals + 1} evaluations, from its best "
            f"{best:.4g} to {val_loss:.4g} ({val_loss / best - 1.0:+.1%}), while the train loss kept falling",
        )

    def _few(self, val_loss: float, train_ema: float | None) -> Finding:
        values = list(self.values)
        best_at = min(range(len(values)), key=values.__getitem__)
        best = values[best_at]
        streak = values[best_at + 1 :]
        train_best = self.trains[best_at]
        train_falling = train_ema is not None and train_best is not None and train_ema < train_best
        rising = all(b > a for a, b in zip([best, *streak], streak, strict=False))
        needed = self.evals if val_loss < best + 2.0 * self.few_rise * abs(best) else max(1, self.evals - 1)
        if len(streak) < needed or not rising or not train_falling or val_loss < best + self.few_rise * abs(best):
            return _QUIET
        return Finding(
            True,
            f"val loss rose over {len(streak)} evaluations in a row, from its best {best:.4g} to {val_loss:.4g}, "
            f"while the train loss kept falling",
        )


class GradientDetector:
    """Vanishing, exploding gradients and a learning rate too low, from the measured norms and ratios.

    Vanishing: some layer's grad norm below `vanishing_grad_norm`, or the smallest layer grad norm
    below `vanishing_layer_ratio` of the largest (the early layers of a deep sigmoid net). Exact zeros
    are left out (a frozen layer) unless every layer is zero. Exploding: the global norm above
    `exploding_grad_norm`, or a layer's update ratio above `exploding_update_ratio`. Learning rate too
    low: healthy gradients, yet the median layer update ratio below `lr_too_low_update_ratio` on
    several measurements in a row. A non-finite norm is a `nonfinite` event, not these.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.spec = spec
        self.tiny_updates = 0
        self.had_grad: dict[str, bool] = {}  # layers seen with a gradient: a later exact 0 is a dead layer
        self.zero_since: dict[str, list[int]] = {}  # layer -> [first step at exactly 0, measurements since]

    def update(
        self,
        grad_norm: float,
        norms: Mapping[str, float],
        ratios: Mapping[str, float] | None,
        step: int | None = None,
    ) -> tuple[Finding, Finding, Finding]:
        """Returns (vanishing, exploding, lr_too_low); `ratios` None: not judged (schedule tail). With the
        step, a layer whose gradient went to exactly 0 after it had one is a dead layer."""
        if not math.isfinite(grad_norm) or any(not math.isfinite(v) for v in norms.values()):
            return _QUIET, _QUIET, _QUIET
        dead = self._dead_layers(step, norms) if step is not None else _QUIET
        vanishing = dead if dead.holds else self._vanishing(grad_norm, norms)
        return vanishing, self._exploding(grad_norm, ratios or {}), self._lr_too_low(vanishing, ratios)

    def _dead_layers(self, step: int, norms: Mapping[str, float]) -> Finding:
        for layer, value in norms.items():
            if value > 0.0:
                self.had_grad[layer] = True
                self.zero_since.pop(layer, None)
            elif value == 0.0 and layer in self.had_grad:
                since = self.zero_since.setdefault(layer, [step, 0])
                since[1] += 1
        dead = sorted(
            layer
            for layer, (since, count) in self.zero_since.items()
            if count >= _DEAD_LAYER_MEASUREMENTS and step - since >= self.spec.dead_layer_steps
        )
        if not dead:
            return _QUIET
        longest = max(step - self.zero_since[layer][0] for layer in dead)
        return Finding(
            True,
            f"{len(dead)} of {len(norms)} layers are dead: their gradient has been exactly 0 for up to {longest} "
            f"steps after they had one ({', '.join(dead[:6])}{', ...' if len(dead) > 6 else ''})",
        )

    def _vanishing(self, grad_norm: float, norms: Mapping[str, float]) -> Finding:
        spec = self.spec
        if norms and all(v == 0.0 for v in norms.values()) and grad_norm == 0.0:
            return Finding(True, f"no layer received any gradient ({len(norms)} layers at 0)")
        positive = {k: v for k, v in norms.items() if v > 0.0}
        if not positive:
            return _QUIET
        low = sorted((v, k) for k, v in positive.items() if v < spec.vanishing_grad_norm)
        if low:
            return Finding(
                True,
                f"{len(low)} of {len(positive)} layers have grad norm below "
                f"{spec.vanishing_grad_norm:g} (smallest: {low[0][1]} {low[0][0]:.3g})",
            )
        smallest = min(positive, key=positive.__getitem__)
        largest = max(positive, key=positive.__getitem__)
        if positive[smallest] < spec.vanishing_layer_ratio * positive[largest]:
            return Finding(
                True,
                f"grad norm of {smallest} ({positive[smallest]:.3g}) is below "
                f"{spec.vanishing_layer_ratio:g} of {largest}'s ({positive[largest]:.3g})",
            )
        return _QUIET

    def _exploding(self, grad_norm: float, ratios: Mapping[str, float]) -> Finding:
        spec = self.spec
        if grad_norm > spec.exploding_grad_norm:
            return Finding(True, f"global grad norm {grad_norm:.4g} is above {spec.exploding_grad_norm:g}")
        high = sorted(
            ((v, k) for k, v in ratios.items() if math.isfinite(v) and v > spec.exploding_update_ratio), reverse=True
        )
        if high:
            value, layer = high[0]
            return Finding(
                True,
                f"{len(high)} layers have update ratio above "
                f"{spec.exploding_update_ratio:g} (largest: {layer} {value:.3g})",
            )
        return _QUIET

    def _lr_too_low(self, vanishing: Finding, ratios: Mapping[str, float] | None) -> Finding:
        if ratios is None:
            return _QUIET  # the schedule's tail: small updates are the plan
        moving = sorted(v for v in ratios.values() if math.isfinite(v) and v > 0.0)
        if not moving or vanishing.holds:
            self.tiny_updates = 0
            return _QUIET
        median = _median_sorted(moving)
        limit = self.spec.lr_too_low_update_ratio
        self.tiny_updates = self.tiny_updates + 1 if median < limit else 0
        if self.tiny_updates < _LR_TOO_LOW_MEASUREMENTS:
            return _QUIET
        return Finding(
            True,
            f"the weights barely move: median layer update ratio {median:.3g} is below "
            f"{limit:g} while the gradients are healthy; raise the learning rate",
        )


class PhaseDetector:
    """Which phase the run is in, from the loss EMA's slope, flatness and what it has learned.

    rapid_learning while the EMA falls (significantly, beyond noise) at least `rapid_slope_fraction`
    of its steepest rate so far, else refinement; once flat: stalled when the plateau detector says
    the run is not learning, else converged. A new phase must hold `phase_patience` steps before it
    is reported; diverging is reported at once.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.window = spec.phase_window
        self.rapid = spec.rapid_slope_fraction
        self.patience = spec.phase_patience
        self.sigmas = spec.noise_sigmas
        self.steepest = 0.0
        self.pending: str | None = None
        self.pending_count = 0
        self.phase: str | None = None

    def classify(
        self,
        tracker: LossTracker,
        *,
        past_warmup: bool,
        diverging: bool,
        flat: bool,
        stalled: bool,
        converged: bool | None = None,
    ) -> str:
        """The phase this one observation points to, before debouncing."""
        # over a whole period of an oscillation: its down-swings are not rapid learning
        window = min(max(self.window, int(tracker.period())), _PERIOD_ROWS)
        fall = tracker.fall(window)
        slope: float | None = None  # the loss's fall per step, when it stands out of the noise
        if fall is not None and fall > self.sigmas * tracker.fall_noise(window):
            slope = fall / window
            self.steepest = max(self.steepest, slope)
        if diverging:
            return "diverging"
        if not past_warmup:
            return "warmup"
        if stalled:
            return "stalled"
        if converged if converged is not None else flat:
            return "converged"
        rising = fall is not None and fall < -self.sigmas * tracker.fall_noise(window)
        above_start = (
            tracker.ema is not None
            and tracker.initial is not None
            and tracker.ema - self.sigmas * tracker.ema_sigma() > tracker.initial + self.sigmas * tracker.initial_sigma
        )
        if rising or above_start:
            return self.phase or "warmup"  # getting worse is not learning: no new phase until it is judged
        # entering rapid learning again takes a steeper slope than staying in it, so noise does not toggle it
        needed = self.rapid * (1.0 if self.phase in ("rapid_learning", "warmup") else _REENTER_RAPID)
        # and a fall over the plateau window, steep too when entering again: a down-swing is not learning
        longer = tracker.fall(tracker.window)
        falling = longer is None or longer > self.sigmas * tracker.fall_noise(tracker.window)
        if falling and longer is not None and self.phase not in ("rapid_learning", "warmup"):
            falling = longer / tracker.window >= needed * self.steepest
        if slope is not None and falling and slope >= needed * self.steepest > 0.0:
            return "rapid_learning"
        return "refinement"

    def update(
        self,
        tracker: LossTracker,
        *,
        past_warmup: bool,
        diverging: bool,
        flat: bool,
        stalled: bool,
        converged: bool | None = None,
    ) -> str:
        candidate = self.classify(
            tracker, past_warmup=past_warmup, diverging=diverging, flat=flat, stalled=stalled, converged=converged
        )
        if candidate == self.phase:
            self.pending, self.pending_count = None, 0
        elif self.phase is None or candidate == "diverging" or self.phase == "diverging":
            self.phase, self.pending, self.pending_count = candidate, None, 0
        else:
            self.pending_count = self.pending_count + 1 if candidate == self.pending else 1
            self.pending = candidate
            # leaving a flat phase takes a whole plateau window: a converged run does not flap on noise
            patience = (
                self.patience if self.phase not in ("converged", "stalled") else max(self.patience, tracker.window)
            )
            if self.pending_count >= patience:
                self.phase, self.pending, self.pending_count = candidate, None, 0
        return self.phase


class Latch:
    """An anomaly's held state: raised as soon as its condition holds, cleared once the condition has
    been false for `clear_steps` steps."""

    def __init__(self, clear_steps: int) -> None:
        self.clear_steps = clear_steps
        self.last_true: int | None = None
        self.held = False

    def update(self, step: int, holds: bool) -> bool:
        """Returns whether `held` changed."""
        if holds:
            self.last_true = step
            if not self.held:
                self.held = True
                return True
            return False
        if self.held and self.last_true is not None and step - self.last_true >= self.clear_steps:
            self.held = False
            return True
        return False


class DynamicsMonitor:
    """The run's phase and anomalies from its loss, gradients and validation, one observation at a time.

    Call `observe_step` every step (with the learning rate and global gradient norm when known),
    `observe_gradients` when per-layer statistics are measured and `observe_validation` after each
    evaluation; read `phase`, `anomalies` and `loss_ema` for metrics, and `events()` for what changed
    since the last call. `state_dict()`/`load_state_dict()` carry everything across a checkpoint.

    `step` is the optimizer step: windows, patience and warm-up are measured in steps. A log written
    every k steps (a replayed CSV) is recognised from its first steps and the windows that count
    observations are cut to k times fewer; `max_steps`, when known, lets the verdicts that depend on the
    run's length (a stall, convergence, a schedule that ends early) wait for their share of it.
    """

    def __init__(
        self, spec: DetectorSpec | None = None, *, warmup_steps: int = 0, max_steps: int | None = None
    ) -> None:
        self.spec = spec if spec is not None else DetectorSpec()
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (None when the run's length is unknown), not {max_steps}")
        self.max_steps = max_steps  # the run's planned length, when known
        self.warmup_steps = max(self.spec.warmup_steps, warmup_steps)  # the schedule's warm-up counts too
        self.stride = 1
        self._build(self.spec)
        self.replaying = False
        self.opening: list[list[Any]] | None = []  # the first observations, until the log's stride is known
        self.handed: list[Event] = []  # events handed out while the stride was not known yet

    def _build(self, rows: DetectorSpec) -> None:
        """Every detector afresh; `rows` is the spec with its observation-counted windows cut to the stride."""
        self.rows_spec = rows
        self.loss = LossTracker(rows)
        self.spikes = SpikeDetector(rows)
        self.divergence = DivergenceDetector(rows)
        self.plateau = PlateauDetector(rows)
        self.overfitting = OverfittingDetector(self.spec)
        self.gradients = GradientDetector(self.spec)
        self.phases = PhaseDetector(rows)
        self.dead = DeadRunDetector(self.spec)
        self.lr_schedule = LrScheduleDetector(self.spec)
        self.trend = TrendDetector(self.spec, self.max_steps)
        self.val_divergence = ValidationDivergence(self.spec)
        self.grad_norms = GradNormTracker(self.spec)
        self.recurring = SpikeRecurrence(self.spec)
        self.skips = SkipCounter(self.spec)
        self.latches = {kind: Latch(self.spec.anomaly_clear_steps) for kind in ANOMALIES}
        self.first_step: int | None = None
        self.lr_peak = 0.0
        self.lr_last = 0.0
        self.lr_rising = False
        self.converged = False
        self.current_phase = "warmup"
        self.pending_events: list[Event] = []
        self.entered: list[tuple[str, int]] = []
        self.raised: dict[str, int] = {}
        self.raise_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ observations
    def observe_step(self, step: int, loss: float, *, lr: float | None = None, grad_norm: float | None = None) -> None:
        if self._opening("step", step, loss, lr, grad_norm):
            return
        loss = float(loss)
        if lr is not None and math.isfinite(lr):
            self.lr_rising = lr > self.lr_peak * (1.0 + 1e-9) and self.first_step is not None
            self.lr_peak = max(self.lr_peak, lr)
            self.lr_last = lr
        past = self._past_warmup(step)
        assert self.first_step is not None
        elapsed = step - self.first_step
        finite_loss = math.isfinite(loss)
        finite = finite_loss and (grad_norm is None or math.isfinite(grad_norm))
        skipped = finite_loss and not finite  # a loss scaler's skip: counted, alarmed only when frequent
        if not finite_loss:
            self._judge(step, "nonfinite", Finding(True, f"loss {loss}: the step was skipped", urgent=True), past)
        else:
            self._judge(step, "nonfinite", self.skips.update(step, skipped and past), past)
        spike = self.spikes.update(loss if finite else float("nan"))
        if finite:
            self.loss.update(loss, ceiling=self.spikes.ceiling, step=step)
        self._judge(step, "loss_spike", spike, past)
        diverged = self.divergence.update(loss, finite, self.loss, past, skipped=skipped)
        if not diverged.holds:
            diverged = self.recurring.update(step, spike.holds, self.spikes.ratio)
        else:
            self.recurring.update(step, spike.holds, self.spikes.ratio)
        trend = self.trend.update(step, loss, past) if finite else _QUIET
        if not diverged.holds:
            diverged = trend if trend.holds else self.val_divergence.finding
        self._judge(step, "divergence", diverged, past)
        diverging = self.latches["divergence"].held
        self.dead.note_grad(step, grad_norm)
        self._judge(step, "dead_run", self.dead.update(step, loss), past)
        self._judge(step, "lr_schedule", self.lr_schedule.update(step, lr, self.max_steps), past)
        exploding, growing = self.grad_norms.update(step, grad_norm, past)
        self._judge(step, "exploding_gradients", exploding, past)
        self._judge(step, "grad_norm_growth", growing, past)
        plateau = self.plateau.update(self.loss, elapsed, self.max_steps) if finite and not diverging else _QUIET
        long_flat = self._long_flat(elapsed)
        # a stall is flat over half the run too: a crest of an oscillation is flat for a moment only
        self._judge(step, "plateau", plateau if long_flat else _QUIET, past)
        # not learning, whatever the level: a dead run, a schedule at 0, dead layers while the loss is flat
        held = self.latches
        stuck = (
            held["dead_run"].held
            or held["lr_schedule"].held
            or (self.plateau.flat and held["vanishing_gradients"].held)
        )
        stalled = (self.plateau.stalled and long_flat) or stuck
        phase = self.phases.update(
            self.loss,
            past_warmup=past,
            diverging=diverging,
            flat=self.plateau.flat,
            stalled=stalled,
            converged=self._converged(elapsed, stalled),
        )
        self._enter(step, phase)

    def observe_gradients(
        self,
        step: int,
        grad_norm: float,
        layer_grad_norms: Mapping[str, float] | None = None,
        layer_update_ratios: Mapping[str, float] | None = None,
    ) -> None:
        if self._opening("gradients", step, grad_norm, layer_grad_norms, layer_update_ratios):
            return
        past = self._past_warmup(step)
        # Update ratios scale with the learning rate: in a schedule's tail they say nothing about gradients.
        in_tail = self.lr_rising or (self.lr_peak > 0.0 and self._last_lr_fraction() < _LR_TAIL)
        vanishing, exploding, lr_low = self.gradients.update(
            float(grad_norm), layer_grad_norms or {}, None if in_tail else (layer_update_ratios or {}), step=step
        )
        self.dead.note_grad(step, float(grad_norm))
        tracked, growing = self.grad_norms.update(step, float(grad_norm), past)
        self._judge(step, "vanishing_gradients", vanishing, past)
        self._judge(step, "exploding_gradients", exploding if exploding.holds else tracked, past)
        self._judge(step, "grad_norm_growth", growing, past)
        self._judge(step, "lr_too_low", lr_low, past)

    def observe_validation(self, step: int, val_loss: float) -> None:
        if self._opening("validation", step, val_loss):
            return
        past = self._past_warmup(step)
        found = self.overfitting.update(float(val_loss), self.loss.ema, step, self.max_steps)
        self._judge(step, "overfitting", found, past)
        worse = self.val_divergence.update(float(val_loss), self.loss.ema)
        if worse.holds:
            self._judge(step, "divergence", worse, past)

    # ------------------------------------------------------------------ state
    @property
    def phase(self) -> str:
        return self.current_phase

    @property
    def anomalies(self) -> dict[str, bool]:
        return {kind: latch.held for kind, latch in self.latches.items()}

    @property
    def loss_ema(self) -> float | None:
        return self.loss.ema

    @property
    def skipped_steps(self) -> int:
        """Steps with a finite loss and a non-finite gradient past warm-up (a loss scaler's skips)."""
        return self.skips.total

    @property
    def phases_entered(self) -> list[tuple[str, int]]:
        """Every phase entered, in order, with the step it was entered at."""
        return list(self.entered)

    @property
    def anomalies_raised(self) -> dict[str, int]:
        """Each anomaly kind ever raised, with the step it was first raised at."""
        return dict(self.raised)

    def events(self) -> list[Event]:
        """Phase and anomaly changes since the last call, oldest first."""
        events, self.pending_events = self.pending_events, []
        if self.opening is not None:
            self.handed.extend(events)
        return events

    def state_dict(self) -> dict[str, Any]:
        """Everything the detectors hold, as JSON-able values (for checkpoints)."""
        return {k: _encode(v) for k, v in vars(self).items() if k not in ("spec", "rows_spec")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, onto a monitor built from the same spec."""
        stride = state.get("stride", 1)
        if isinstance(stride, int) and stride > 1 and stride != self.stride:
            self.stride = stride
            self._build(_rows_spec(self.spec, stride))
        for name, value in state.items():
            if name in vars(self) and name not in ("spec", "rows_spec"):
                setattr(self, name, _decode(value, getattr(self, name)))
        self.pending_events = []
        # both losses worse over evaluations in a row: after a rollback the run goes on another way, so
        # the evaluations before the checkpoint do not count towards it (a resume waits a few longer)
        self.val_divergence.restart()

    # ------------------------------------------------------------------ internals
    def _opening(self, kind: str, *args: Any) -> bool:
        """Hold on to the first observations; at the fourth step, when the steps come k > 1 apart (a sparse
        log), rebuild the detectors for that stride and take them again. Returns True when an observation
        was taken that way (the caller's work is done)."""
        if self.opening is None or self.replaying:
            return False
        self.opening.append([kind, *args])
        steps = [int(o[1]) for o in self.opening if o[0] == "step"]
        if len(steps) < 4:
            self._take(self.opening[-1])
            return True
        opening, self.opening = self.opening, None
        gaps = sorted(b - a for a, b in zip(steps, steps[1:], strict=False))
        stride = max(1, gaps[len(gaps) // 2])
        if stride == 1:
            self._take(opening[-1])
            self.handed = []
            return True
        handed = {(e.step, e.kind, e.name, e.raised) for e in self.handed}
        self.handed = []
        self.stride = stride
        self._build(_rows_spec(self.spec, stride))
        for observation in opening:
            self._take(observation)
        self.pending_events = [e for e in self.pending_events if (e.step, e.kind, e.name, e.raised) not in handed]
        return True

    def _take(self, observation: list[Any]) -> None:
        self.replaying = True
        try:
            kind, step, *rest = observation
            if kind == "step":
                self.observe_step(step, rest[0], lr=rest[1], grad_norm=rest[2])
            elif kind == "gradients":
                self.observe_gradients(step, *rest)
            else:
                self.observe_validation(step, *rest)
        finally:
            self.replaying = False

    def _long_flat(self, elapsed: int) -> bool:
        """Whether the loss level moved (either way) by no more than noise or `converged_improvement` of it
        over the last half of the run so far (at least `plateau_window` steps)."""
        for horizon in (elapsed // 2, elapsed // 4):  # on two horizons: an oscillation is level on one by chance
            got = self.loss.long_fall(max(self.spec.plateau_window, horizon))
            if got is None:
                return False
            fall, noise, level = got
            if abs(fall) > max(self.spec.noise_sigmas * noise, self.spec.converged_improvement * abs(level)):
                return False
        return True

    def _converged(self, elapsed: int, stalled: bool) -> bool:
        """Converged: the run learned, and over the last half of it so far (at least `plateau_window` steps)
        the loss fell by no more than noise or `converged_improvement` of its level; it stays converged
        until that fall doubles. Not before `judge_after_share` of a run of known length."""
        ema = self.loss.ema
        spec = self.spec
        if stalled or ema is None or (self.max_steps is not None and elapsed < spec.judge_after_share * self.max_steps):
            self.converged = False
            return False
        got = self.loss.long_fall(max(spec.plateau_window, elapsed // 2))
        start = self.loss.first_level if self.loss.first_level else self.loss.initial
        if got is None or start is None:
            self.converged = False
            return False
        fall, noise, level = got
        learned = start - level > max(spec.stalled_improvement * abs(start), spec.noise_sigmas * noise)
        limit = max(spec.noise_sigmas * noise, spec.converged_improvement * abs(level))
        self.converged = learned and abs(fall) <= (2.0 * limit if self.converged else limit)
        return self.converged

    def _last_lr_fraction(self) -> float:
        return self.lr_last / self.lr_peak if self.lr_peak > 0.0 else 1.0

    def _past_warmup(self, step: int) -> bool:
        if self.first_step is None:
            self.first_step = step
        return step - self.first_step >= self.warmup_steps and not self.lr_rising

    def _judge(self, step: int, kind: str, finding: Finding, past_warmup: bool) -> None:
        latch = self.latches[kind]
        holds = finding.holds and (past_warmup or finding.urgent)
        if not latch.update(step, holds):
            return
        if latch.held:
            self.raised.setdefault(kind, step)
            self.raise_counts[kind] = self.raise_counts.get(kind, 0) + 1
            self.pending_events.append(Event(step, "anomaly", kind, True, finding.detail))
        else:
            self.pending_events.append(
                Event(
                    step,
                    "anomaly",
                    kind,
                    False,
                    f"{kind} cleared: its condition has not held for {self.spec.anomaly_clear_steps} steps",
                )
            )

    def _enter(self, step: int, phase: str) -> None:
        if self.entered and phase == self.current_phase:
            return
        previous = self.current_phase if self.entered else None
        self.current_phase = phase
        self.entered.append((phase, step))
        detail = f"entered {phase}" + (f" after {previous}" if previous else "")
        ema = self.loss.ema
        if ema is not None:
            detail += f" (loss EMA {ema:.4g})"
        self.pending_events.append(Event(step, "phase", phase, True, detail))


def _rows_spec(spec: DetectorSpec, stride: int) -> DetectorSpec:
    """The spec for a log written every `stride` steps: windows that count observations cut to as many
    steps (never below what their statistics need), the EMA's memory kept in steps."""

    def rows(steps: int, least: int) -> int:
        return max(least, math.ceil(steps / stride))

    alpha = min(0.5, max(spec.ema_alpha, 1.0 - (1.0 - spec.ema_alpha) ** stride))
    return spec.model_copy(
        update={
            "ema_alpha": alpha,
            "plateau_window": rows(spec.plateau_window, 8),
            "phase_window": rows(spec.phase_window, 4),
            "spike_window": rows(spec.spike_window, 16),
            "divergence_patience": rows(spec.divergence_patience, 5),
            "phase_patience": rows(spec.phase_patience, 2),
        }
    )


# ---------------------------------------------------------------------- checkpoint encoding
def _encode(value: Any) -> Any:
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    if isinstance(value, deque):
        return {"deque": [_encode(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, Event):
        return {"event": [value.step, value.kind, value.name, value.raised, value.detail]}
    if isinstance(value, Finding):
        return {"finding": [value.holds, value.detail, value.urgent]}
    return {"object": {k: _encode(v) for k, v in vars(value).items() if k != "spec"}}


def _decode(value: Any, current: Any) -> Any:
    """Rebuild `value` in the shape of `current` (the freshly constructed attribute it replaces)."""
    if isinstance(value, dict):
        if "deque" in value:
            return deque((_decode(v, None) for v in value["deque"]), maxlen=value["maxlen"])
        if "dict" in value:
            old = current if isinstance(current, dict) else {}
            return {k: _decode(v, old.get(k)) for k, v in value["dict"]}
        if "event" in value:
            return Event(*value["event"])
        if "finding" in value:
            return Finding(*value["finding"])
        if "object" in value and current is not None:
            for name, item in value["object"].items():
                if name in vars(current):
                    setattr(current, name, _decode(item, getattr(current, name)))
            return current
    if isinstance(value, list):
        if isinstance(current, list) and current and isinstance(current[0], tuple):
            return [tuple(v) for v in value]
        return [tuple(v) if isinstance(v, list) else _decode(v, None) for v in value]
    return value
