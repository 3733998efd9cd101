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
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gradwatch.names import ANOMALIES
from gradwatch.spec_telemetry import DetectorSpec

_MAD_TO_SIGMA = 1.4826  # median absolute deviation times this is a normal distribution's sigma
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


@dataclass(frozen=True)
class Event:
    """A change of state worth one log line: a phase entered, or an anomaly raised or cleared.

    For `kind="phase"`, `name` is the phase entered and `raised` is always True.
    """

    step: int
    kind: Literal["phase", "anomaly"]
    name: str
    raised: bool
    detail: str


@dataclass(frozen=True)
class Finding:
    """One detector's verdict on one observation: does its condition hold, and why, in words.

    `urgent` findings (a non-finite loss or gradient) count even during warmup.
    """

    holds: bool
    detail: str = ""
    urgent: bool = False


_QUIET = Finding(False)


def _median_sorted(ordered: list[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class SortedWindow:
    """The last `size` values, also kept sorted, so the median costs nothing per step."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.values: deque[float] = deque()
        self.ordered: list[float] = []

    def add(self, value: float) -> None:
        if len(self.values) == self.size:
            old = self.values.popleft()
            del self.ordered[bisect_left(self.ordered, old)]
        self.values.append(value)
        insort(self.ordered, value)

    def __len__(self) -> int:
        return len(self.values)

    def median(self) -> float:
        return _median_sorted(self.ordered)

    def mad(self, center: float) -> float:
        return _median_sorted(sorted(abs(v - center) for v in self.ordered))


class LossTracker:
    """The train loss smoothed: EMA with its standard error, initial level, and the noise of one loss.

    The EMA is bias-corrected (early on it is the weighted mean of the losses so far, not the first
    one) and robust: a loss above `ceiling` (the spike detector's bound) enters it at the ceiling,
    so one bad batch does not move it; a lasting jump soon raises the ceiling with it. The noise is
    the robust standard deviation of consecutive differences, which a trend does not inflate.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.alpha = spec.ema_alpha
        history = max(spec.plateau_window, spec.phase_window) + 1
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

    def update(self, loss: float, ceiling: float | None = None) -> bool:
        """Take one step's loss; a non-finite loss leaves the EMA as it was. Returns whether it was finite."""
        self.steps += 1
        if not math.isfinite(loss):
            return False
        self.finite_steps += 1
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
        return True

    def ema_sigma(self, n: int | None = None) -> float:
        """Standard error of the EMA after n finite losses (default: now), from the current noise."""
        return self.sigma * math.sqrt(_weight_share(self.alpha, self.finite_steps if n is None else n))

    def learned_at_most(self) -> tuple[float, float] | None:
        """(upper bound of how much the loss fell from its first window to its latest, first window's
        mean); None until both windows are full."""
        if len(self.latest) < self.window or self.finite_steps < _STALL_AFTER_WINDOWS * self.window:
            return None
        first = self.first_level
        if self.finite_steps % self.window == 0:
            self.latest_sum = sum(self.latest)  # a running sum drifts by rounding: renew it now and then
        latest = self.latest_sum / len(self.latest)
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
    at least `spike_min_ratio` times the median. Losses <= 0 are judged in linear space."""

    def __init__(self, spec: DetectorSpec) -> None:
        self.z = spec.spike_z
        self.min_ratio = spec.spike_min_ratio
        self.window = SortedWindow(spec.spike_window)
        self.scale = 0.0
        self.seen = 0
        self.ceiling: float | None = None

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
                self.scale = max(_MAD_TO_SIGMA * self.window.mad(median), _SPIKE_SCALE_FLOOR)
            bound = median + max(self.z * self.scale, math.log(self.min_ratio))
            self.ceiling = math.exp(min(bound, 700.0))
            if value > bound:
                z = (value - median) / self.scale
                finding = Finding(
                    True,
                    f"loss {loss:.4g} is {math.exp(value - median):.1f}x the median "
                    f"{math.exp(median):.4g} of the last {len(self.window)} losses "
                    f"({z:.1f} robust standard deviations in log scale)",
                )
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
        self.since_warmup: deque[float] = deque(maxlen=spec.divergence_patience)  # losses past warm-up

    def update(self, loss: float, finite_step: bool, tracker: LossTracker, past_warmup: bool) -> Finding:
        if not finite_step:
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.nonfinite_limit:
                return Finding(True, f"{self.nonfinite_run} non-finite steps in a row (last loss {loss})", urgent=True)
            return _QUIET
        self.nonfinite_run = 0
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
        self.stalled_improvement = spec.stalled_improvement
        self.converged_loss = spec.converged_loss
        self.sigmas = spec.noise_sigmas
        self.flat = False
        self.stalled = False

    def update(self, tracker: LossTracker) -> Finding:
        fall = tracker.fall(self.window)
        if fall is None:
            return _QUIET
        noise = tracker.fall_noise(self.window)
        if self.flat:
            if abs(fall) > 2.0 * self.sigmas * noise:  # wide hysteresis: a converged run does not flap
                self.flat = False
        elif abs(fall) < self.sigmas * noise:
            self.flat = True  # a loss rising beyond noise is not flat: divergence judges it
        self.stalled = False
        if not self.flat:
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
    """Validation loss above its best level by more than noise and `overfit_min_rise`, `overfit_evals`
    evaluations in a row, while the train loss EMA is below where it was at that best.

    The best level is the lowest upper bound (evaluation plus its noise margin) seen, so a minimum
    of noise is not mistaken for it; each evaluation counts by its lower bound. Holds until the
    validation loss comes back within that margin.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self.evals = spec.overfit_evals
        self.min_rise = spec.overfit_min_rise
        self.sigmas = spec.noise_sigmas / math.sqrt(2.0)  # a margin on each side of the difference
        self.best_upper: float | None = None
        self.train_at_best: float | None = None
        self.last: float | None = None
        self.diffs: deque[float] = deque(maxlen=16)
        self.streak = 0

    def update(self, val_loss: float, train_ema: float | None) -> Finding:
        if not math.isfinite(val_loss):
            return _QUIET
        if self.last is not None:
            self.diffs.append(abs(val_loss - self.last))
        self.last = val_loss
        if len(self.diffs) < 4:
            return _QUIET  # no noise estimate yet
        noise = _median_sorted(sorted(self.diffs)) * _MAD_TO_SIGMA / math.sqrt(2.0)
        upper, lower = val_loss + self.sigmas * noise, val_loss - self.sigmas * noise
        if self.best_upper is None or upper < self.best_upper:
            self.best_upper, self.train_at_best = upper, train_ema
        best = self.best_upper
        train_falling = train_ema is not None and self.train_at_best is not None and train_ema < self.train_at_best
        self.streak = self.streak + 1 if lower > best + self.min_rise * abs(best) and train_falling else 0
        if self.streak < self.evals:
            return _QUIET
        return Finding(
            True,
            f"val loss {val_loss:.4g} is above its best level {best:.4g} for {self.streak} "
            f"evaluations while the train loss kept falling",
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

    def update(
        self, grad_norm: float, norms: Mapping[str, float], ratios: Mapping[str, float] | None
    ) -> tuple[Finding, Finding, Finding]:
        """Returns (vanishing, exploding, lr_too_low); `ratios` None: not judged (schedule tail)."""
        if not math.isfinite(grad_norm) or any(not math.isfinite(v) for v in norms.values()):
            return _QUIET, _QUIET, _QUIET
        vanishing = self._vanishing(grad_norm, norms)
        return vanishing, self._exploding(grad_norm, ratios or {}), self._lr_too_low(vanishing, ratios)

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

    def classify(self, tracker: LossTracker, *, past_warmup: bool, diverging: bool, flat: bool, stalled: bool) -> str:
        """The phase this one observation points to, before debouncing."""
        fall = tracker.fall(self.window)
        slope: float | None = None  # the loss's fall per step, when it stands out of the noise
        if fall is not None and fall > self.sigmas * tracker.fall_noise(self.window):
            slope = fall / self.window
            self.steepest = max(self.steepest, slope)
        if diverging:
            return "diverging"
        if not past_warmup:
            return "warmup"
        if flat:
            return "stalled" if stalled else "converged"
        rising = fall is not None and fall < -self.sigmas * tracker.fall_noise(self.window)
        above_start = (
            tracker.ema is not None
            and tracker.initial is not None
            and tracker.ema - self.sigmas * tracker.ema_sigma() > tracker.initial + self.sigmas * tracker.initial_sigma
        )
        if rising or above_start:
            return self.phase or "warmup"  # getting worse is not learning: no new phase until it is judged
        # entering rapid learning again takes a steeper slope than staying in it, so noise does not toggle it
        needed = self.rapid * (1.0 if self.phase in ("rapid_learning", "warmup") else _REENTER_RAPID)
        if slope is not None and slope >= needed * self.steepest > 0.0:
            return "rapid_learning"
        return "refinement"

    def update(self, tracker: LossTracker, *, past_warmup: bool, diverging: bool, flat: bool, stalled: bool) -> str:
        candidate = self.classify(tracker, past_warmup=past_warmup, diverging=diverging, flat=flat, stalled=stalled)
        if candidate == self.phase:
            self.pending, self.pending_count = None, 0
        elif self.phase is None or candidate == "diverging" or self.phase == "diverging":
            self.phase, self.pending, self.pending_count = candidate, None, 0
        else:
            self.pending_count = self.pending_count + 1 if candidate == self.pending else 1
            self.pending = candidate
            if self.pending_count >= self.patience:
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
    """

    def __init__(
        self, spec: DetectorSpec | None = None, *, warmup_steps: int = 0, max_steps: int | None = None
    ) -> None:
        self.spec = spec if spec is not None else DetectorSpec()
        if max_steps is not None and max_steps < 1:
            raise ValueError(
                f"max_steps must be at least 1 (or None when the run's length is unknown), not {max_steps}"
            )
        self.max_steps = max_steps  # the run's planned length, when known: windows may scale with it
        self.warmup_steps = max(self.spec.warmup_steps, warmup_steps)  # the schedule's warm-up counts too
        self.loss = LossTracker(self.spec)
        self.spikes = SpikeDetector(self.spec)
        self.divergence = DivergenceDetector(self.spec)
        self.plateau = PlateauDetector(self.spec)
        self.overfitting = OverfittingDetector(self.spec)
        self.gradients = GradientDetector(self.spec)
        self.phases = PhaseDetector(self.spec)
        self.latches = {kind: Latch(self.spec.anomaly_clear_steps) for kind in ANOMALIES}
        self.first_step: int | None = None
        self.lr_peak = 0.0
        self.lr_last = 0.0
        self.lr_rising = False
        self.current_phase = "warmup"
        self.pending_events: list[Event] = []
        self.entered: list[tuple[str, int]] = []
        self.raised: dict[str, int] = {}
        self.raise_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ observations
    def observe_step(self, step: int, loss: float, *, lr: float | None = None, grad_norm: float | None = None) -> None:
        loss = float(loss)
        if lr is not None and math.isfinite(lr):
            self.lr_rising = lr > self.lr_peak * (1.0 + 1e-9) and self.first_step is not None
            self.lr_peak = max(self.lr_peak, lr)
            self.lr_last = lr
        past = self._past_warmup(step)
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if not finite:
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
            self._judge(step, "nonfinite", Finding(True, f"{what}: the step was skipped", urgent=True), past)
        else:
            self._judge(step, "nonfinite", _QUIET, past)
        spike = self.spikes.update(loss if finite else float("nan"))
        if finite:
            self.loss.update(loss, ceiling=self.spikes.ceiling)
        self._judge(step, "loss_spike", spike, past)
        self._judge(step, "divergence", self.divergence.update(loss, finite, self.loss, past), past)
        diverging = self.latches["divergence"].held
        self._judge(step, "plateau", self.plateau.update(self.loss) if finite and not diverging else _QUIET, past)
        phase = self.phases.update(
            self.loss,
            past_warmup=past,
            diverging=self.latches["divergence"].held,
            flat=self.plateau.flat,
            stalled=self.plateau.stalled,
        )
        self._enter(step, phase)

    def observe_gradients(
        self,
        step: int,
        grad_norm: float,
        layer_grad_norms: Mapping[str, float] | None = None,
        layer_update_ratios: Mapping[str, float] | None = None,
    ) -> None:
        past = self._past_warmup(step)
        # Update ratios scale with the learning rate: in a schedule's tail they say nothing about gradients.
        in_tail = self.lr_rising or (self.lr_peak > 0.0 and self._last_lr_fraction() < _LR_TAIL)
        vanishing, exploding, lr_low = self.gradients.update(
            float(grad_norm), layer_grad_norms or {}, None if in_tail else (layer_update_ratios or {})
        )
        self._judge(step, "vanishing_gradients", vanishing, past)
        self._judge(step, "exploding_gradients", exploding, past)
        self._judge(step, "lr_too_low", lr_low, past)

    def observe_validation(self, step: int, val_loss: float) -> None:
        past = self._past_warmup(step)
        self._judge(step, "overfitting", self.overfitting.update(float(val_loss), self.loss.ema), past)

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
        return events

    def state_dict(self) -> dict[str, Any]:
        """Everything the detectors hold, as JSON-able values (for checkpoints)."""
        return {k: _encode(v) for k, v in vars(self).items() if k != "spec"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned, onto a monitor built from the same spec."""
        for name, value in state.items():
            if name in vars(self) and name != "spec":
                setattr(self, name, _decode(value, getattr(self, name)))
        self.pending_events = []

    # ------------------------------------------------------------------ internals
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
