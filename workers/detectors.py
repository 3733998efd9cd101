"""Online detectors of training dynamics: the run's phase and its anomalies.

Plain Python over floats the worker already holds on the host (no torch, no host syncs here).
Each detector is a small class fed one observation at a time and answers with a `Finding`;
`DynamicsMonitor` wires them together, latches anomalies with hysteresis and reports each change
once as an `Event`. Windows count observations, not step indices; thresholds come from
`DetectorSpec` (the job spec's `telemetry.detectors`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from gradwatch.spec_telemetry import DetectorSpec

PHASES: tuple[str, ...] = ("warmup", "rapid_learning", "refinement", "converged", "stalled", "diverging")
ANOMALIES: tuple[str, ...] = ("loss_spike", "divergence", "plateau", "overfitting", "vanishing_gradients",
                              "exploding_gradients")

_MAD_TO_SIGMA = 1.4826  # median absolute deviation times this is a normal distribution's sigma
_SPIKE_SCALE_FLOOR = 0.01  # of the median: a perfectly flat history must not make every wiggle a spike
_SPIKE_MIN_SAMPLES = 8
_INITIAL_SAMPLES = 5  # the initial loss is the median of the first few, so one odd first batch does not count
_SIGNIFICANT_SIGMAS = 2.0  # an EMA fall beyond this many noise deviations is learning, not chance
_REENTER_RAPID = 1.5  # back into rapid learning takes this much more slope than staying in it
_CLEARLY_SIGMAS = 3.0  # a plateau ends only on an improvement this far beyond noise
_SUSTAINED_STEPS = 5  # losses in a row above the divergence limit that make a divergence
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


def _median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


class LossTracker:
    """The train loss smoothed: EMA, best EMA, initial level, recent raw losses and their noise.

    The EMA is bias-corrected (early on it is the weighted mean of the losses so far, not the first
    one) and robust: a loss above `ceiling` (the spike detector's bound) enters it at the ceiling,
    so one bad batch does not move it; a lasting jump soon raises the ceiling with it.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self._alpha = spec.ema_alpha
        history = max(spec.plateau_window, spec.phase_window) + 1
        self._ema_history: deque[float] = deque(maxlen=history)
        self._count_history: deque[int] = deque(maxlen=history)
        self._recent: deque[float] = deque(maxlen=spec.spike_window)
        self._first: list[float] = []
        self._ema_raw = 0.0
        self._decay_power = 1.0
        self.ema: float | None = None
        self.best_ema: float | None = None
        self.initial: float | None = None
        self.steps = 0
        self.finite_steps = 0

    def update(self, loss: float, ceiling: float | None = None) -> bool:
        """Take one step's loss; a non-finite loss leaves the EMA as it was. Returns whether it was finite."""
        self.steps += 1
        finite = math.isfinite(loss)
        if finite:
            self.finite_steps += 1
            smoothed = loss if ceiling is None else min(loss, ceiling)
            raw = (1.0 - self._alpha) * self._ema_raw + self._alpha * smoothed  # convex: cannot overflow
            self._ema_raw = raw if math.isfinite(raw) else self._alpha * smoothed
            self._decay_power *= 1.0 - self._alpha
            correction = 1.0 - self._decay_power
            ema = self._ema_raw / correction if correction > 0.0 else smoothed
            self.ema = ema if math.isfinite(ema) else smoothed  # rounding at the edge of the float range
            self.best_ema = self.ema if self.best_ema is None else min(self.best_ema, self.ema)
            self._recent.append(loss)
            if len(self._first) < _INITIAL_SAMPLES:
                self._first.append(loss)
                self.initial = _median(self._first)
        if self.ema is not None:
            self._ema_history.append(self.ema)
            self._count_history.append(self.finite_steps)
        return finite

    def fall(self, window: int) -> float | None:
        """How much the EMA fell over the last `window` observations (negative when it rose)."""
        if len(self._ema_history) <= window:
            return None
        return self._ema_history[-1 - window] - self._ema_history[-1]

    def improvement(self, window: int) -> float | None:
        """The EMA's fall over the last `window` observations relative to where it was."""
        fall = self.fall(window)
        if fall is None:
            return None
        return fall / max(abs(self._ema_history[-1 - window]), _TINY)

    def noise(self) -> float:
        """Robust standard deviation of one raw loss around its trend (from consecutive differences)."""
        recent = list(self._recent)
        if len(recent) < 4:
            return 0.0
        diffs = [abs(b - a) for a, b in zip(recent, recent[1:], strict=False)]
        # |x_i - x_{i-1}| of iid noise has median 0.6745 * sqrt(2) * sigma; differencing removes the trend
        return _median(diffs) * _MAD_TO_SIGMA / math.sqrt(2.0)

    def fall_noise(self, window: int) -> float:
        """Standard deviation that noise alone would give `fall(window)`; on the safe (large) side, as
        it ignores that the two ends share samples."""
        if len(self._count_history) <= window:
            return 0.0
        sigma = self.noise()
        share = self._weight_share(self._count_history[-1 - window]) + self._weight_share(
            self._count_history[-1])
        return sigma * math.sqrt(share)

    def _weight_share(self, n: int) -> float:
        """Variance of the bias-corrected EMA of n iid samples, in units of one sample's variance."""
        a = self._alpha
        if n < 1:
            return 0.0
        if a >= 1.0:
            return 1.0
        q = 1.0 - a
        qn = q**n
        if qn >= 1.0:  # alpha too small to register in floating point: a plain mean
            return 1.0 / n
        return a * (1.0 - qn * qn) / ((2.0 - a) * (1.0 - qn) * (1.0 - qn))

    def fraction_of_initial(self) -> float | None:
        """The EMA as a fraction of the initial loss; None when that ratio means nothing (initial <= 0)."""
        if self.ema is None or self.initial is None or self.initial <= 0.0:
            return None
        return self.ema / self.initial


class SpikeDetector:
    """A loss far above its recent history: robust z-score against the median/MAD of the last losses
    (the MAD floored at 1% of the median, so a perfectly flat history needs a real jump)."""

    def __init__(self, spec: DetectorSpec) -> None:
        self._z = spec.spike_z
        self._window: deque[float] = deque(maxlen=spec.spike_window)
        self.ceiling: float | None = None

    def update(self, loss: float) -> Finding:
        """Judge one loss against the window before it; afterwards `ceiling` is the bound it was held to."""
        self.ceiling = None
        if not math.isfinite(loss):
            return _QUIET  # divergence's business, and it must not poison the window
        finding = _QUIET
        if len(self._window) >= _SPIKE_MIN_SAMPLES:
            median = _median(self._window)
            mad = _median(abs(v - median) for v in self._window)
            scale = max(_MAD_TO_SIGMA * mad, _SPIKE_SCALE_FLOOR * abs(median), _TINY)
            self.ceiling = median + self._z * scale
            z = (loss - median) / scale
            if z > self._z:
                finding = Finding(True, f"loss {loss:.4g} is {z:.1f} robust standard deviations above the "
                                        f"median {median:.4g} of the last {len(self._window)} losses")
        self._window.append(loss)
        return finding


class DivergenceDetector:
    """A non-finite loss; the loss EMA grown to `divergence_factor` times its best; or every one of
    the last few losses that far above the best EMA (a lasting jump, before the robust EMA catches up)."""

    def __init__(self, spec: DetectorSpec) -> None:
        self._factor = spec.divergence_factor
        self._above = 0  # consecutive finite losses above the limit

    def update(self, loss: float, tracker: LossTracker) -> Finding:
        if not math.isfinite(loss):
            return Finding(True, f"loss is {loss}", urgent=True)
        ema, best = tracker.ema, tracker.best_ema
        if ema is None or best is None:
            return _QUIET
        limit = best + (self._factor - 1.0) * max(abs(best), _TINY)  # factor * best for a positive best
        self._above = self._above + 1 if loss > limit else 0
        if ema > limit:
            times = f" ({ema / best:.1f}x)" if best > 0.0 else ""
            return Finding(True, f"loss EMA {ema:.4g} is above {self._factor:g}x its best {best:.4g}{times}")
        if self._above >= _SUSTAINED_STEPS:
            return Finding(True, f"the last {self._above} losses (now {loss:.4g}) are all above "
                                 f"{self._factor:g}x the best loss EMA {best:.4g}")
        return _QUIET


class PlateauDetector:
    """The loss EMA stopped improving (relative improvement over `plateau_window` below the threshold)
    while the loss is not low enough to call the run converged.

    `flat` has its own hysteresis: it starts when the improvement is below the threshold by one noise
    deviation and ends only when it is above twice the threshold by three, so noise around a
    converged loss does not toggle it. A loss that rises without diverging counts as flat too.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self._window = spec.plateau_window
        self._threshold = spec.plateau_rel_improvement
        self._converged_fraction = spec.converged_fraction
        self._converged_loss = spec.converged_loss
        self.flat = False

    def low_loss(self, tracker: LossTracker) -> bool:
        """Low enough to count as converged once flat."""
        if tracker.ema is None:
            return False
        if self._converged_loss is not None and tracker.ema <= self._converged_loss:
            return True
        fraction = tracker.fraction_of_initial()
        return fraction is not None and fraction <= self._converged_fraction

    def update(self, tracker: LossTracker) -> Finding:
        improvement = tracker.improvement(self._window)
        if improvement is None:
            return _QUIET
        noise = tracker.fall_noise(self._window) / max(abs(tracker.ema or 0.0), _TINY)
        if self.flat:
            if improvement > 2.0 * self._threshold + _CLEARLY_SIGMAS * noise:
                self.flat = False
        elif improvement + noise < self._threshold:
            self.flat = True
        if not self.flat or self.low_loss(tracker):
            return _QUIET
        return Finding(True, f"loss EMA {tracker.ema:.4g} improved {improvement:.2%} over the last "
                             f"{self._window} steps (threshold {self._threshold:.2%}) and is not converged")


class OverfittingDetector:
    """Validation loss rising `overfit_evals` evaluations in a row while the train loss EMA falls.

    Holds until the validation loss comes back to where it was before the rise.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self._evals = spec.overfit_evals
        self._last_val: float | None = None
        self._last_train: float | None = None
        self._streak = 0
        self._streak_val: float | None = None
        self._streak_train: float | None = None
        self._reference: float | None = None  # val loss before the rise, while overfitting holds

    def update(self, val_loss: float, train_ema: float | None) -> Finding:
        if not math.isfinite(val_loss):
            return self._finding(val_loss)
        if self._last_val is not None and val_loss > self._last_val:
            if self._streak == 0:
                self._streak_val, self._streak_train = self._last_val, self._last_train
            self._streak += 1
        else:
            self._streak = 0
        self._last_val, self._last_train = val_loss, train_ema
        if self._reference is not None and val_loss <= self._reference:
            self._reference = None
        if (self._reference is None and self._streak >= self._evals and train_ema is not None
                and self._streak_train is not None and train_ema < self._streak_train):
            self._reference = self._streak_val
        return self._finding(val_loss)

    def _finding(self, val_loss: float) -> Finding:
        if self._reference is None:
            return _QUIET
        return Finding(True, f"val loss {val_loss:.4g} rose {self._streak} evaluations in a row from "
                             f"{self._reference:.4g} while the train loss kept falling")


class GradientDetector:
    """Vanishing and exploding gradients from the global and per-layer norms and update ratios.

    Vanishing: some layer's grad norm below `vanishing_grad_norm`, the smallest layer grad norm below
    `vanishing_layer_ratio` of the largest (the early layers of a deep sigmoid net), or a layer's
    update ratio below `vanishing_update_ratio`. Exact zeros are left out (a layer that got no
    gradient or took no step, such as a frozen one or at learning rate 0) unless every layer is zero.
    Exploding: a non-finite norm, the global norm above `exploding_grad_norm`, or a layer's update
    ratio above `exploding_update_ratio`. Non-finite update ratios (a zero weight) are left out.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self._spec = spec

    def update(self, grad_norm: float, layer_grad_norms: Mapping[str, float],
               layer_update_ratios: Mapping[str, float]) -> tuple[Finding, Finding]:
        """Returns (vanishing, exploding)."""
        return (self._vanishing(grad_norm, layer_grad_norms, layer_update_ratios),
                self._exploding(grad_norm, layer_grad_norms, layer_update_ratios))

    def _vanishing(self, grad_norm: float, norms: Mapping[str, float],
                   ratios: Mapping[str, float]) -> Finding:
        spec = self._spec
        finite = {k: v for k, v in norms.items() if math.isfinite(v)}
        if finite and all(v == 0.0 for v in finite.values()) and grad_norm == 0.0:
            return Finding(True, f"no layer received any gradient ({len(finite)} layers at 0)")
        positive = {k: v for k, v in finite.items() if v > 0.0}
        if positive:
            low = sorted((v, k) for k, v in positive.items() if v < spec.vanishing_grad_norm)
            if low:
                return Finding(True, f"{len(low)} of {len(positive)} layers have grad norm below "
                                     f"{spec.vanishing_grad_norm:g} (smallest: {low[0][1]} {low[0][0]:.3g})")
            smallest = min(positive, key=positive.__getitem__)
            largest = max(positive, key=positive.__getitem__)
            if positive[smallest] < spec.vanishing_layer_ratio * positive[largest]:
                return Finding(True, f"grad norm of {smallest} ({positive[smallest]:.3g}) is below "
                                     f"{spec.vanishing_layer_ratio:g} of {largest}'s "
                                     f"({positive[largest]:.3g})")
        moving = {k: v for k, v in ratios.items() if math.isfinite(v) and v > 0.0}
        still = sorted((v, k) for k, v in moving.items() if v < spec.vanishing_update_ratio)
        if still:
            value, layer = still[0]
            return Finding(True, f"{len(still)} of {len(moving)} layers have update ratio below "
                                 f"{spec.vanishing_update_ratio:g} (smallest: {layer} {value:.3g})")
        return _QUIET

    def _exploding(self, grad_norm: float, norms: Mapping[str, float],
                   ratios: Mapping[str, float]) -> Finding:
        spec = self._spec
        bad = sorted(k for k, v in norms.items() if not math.isfinite(v))
        if not math.isfinite(grad_norm) or bad:
            where = f" (layers: {', '.join(bad[:5])})" if bad else ""
            return Finding(True, f"gradient norm is {grad_norm}{where}", urgent=True)
        if grad_norm > spec.exploding_grad_norm:
            return Finding(True, f"global grad norm {grad_norm:.4g} is above {spec.exploding_grad_norm:g}")
        high = sorted(((v, k) for k, v in ratios.items()
                       if math.isfinite(v) and v > spec.exploding_update_ratio), reverse=True)
        if high:
            value, layer = high[0]
            return Finding(True, f"{len(high)} layers have update ratio above "
                                 f"{spec.exploding_update_ratio:g} (largest: {layer} {value:.3g})")
        return _QUIET


class PhaseDetector:
    """Which phase the run is in, from the loss EMA's slope, flatness and level.

    rapid_learning while the EMA falls (significantly, beyond noise) at least `rapid_slope_fraction`
    of its steepest rate so far, else refinement; once flat: converged when the loss is low, stalled
    when it is still above `stalled_fraction` of its initial level. A new phase must hold
    `phase_patience` steps before it is reported (so warmup lasts a little past `warmup_steps`);
    diverging is reported at once.
    """

    def __init__(self, spec: DetectorSpec) -> None:
        self._window = spec.phase_window
        self._rapid = spec.rapid_slope_fraction
        self._stalled_fraction = spec.stalled_fraction
        self._patience = spec.phase_patience
        self._steepest = 0.0
        self._pending: str | None = None
        self._pending_count = 0
        self.phase: str | None = None

    def classify(self, tracker: LossTracker, *, past_warmup: bool, diverging: bool, flat: bool,
                 low_loss: bool) -> str:
        """The phase this one observation points to, before debouncing."""
        fall = tracker.fall(self._window)
        if fall is not None and math.isfinite(fall):
            self._steepest = max(self._steepest, fall / self._window)
        if diverging:
            return "diverging"
        if not past_warmup:
            return "warmup"
        if flat:
            if low_loss:
                return "converged"
            fraction = tracker.fraction_of_initial()
            return "stalled" if fraction is not None and fraction > self._stalled_fraction else "refinement"
        # entering rapid learning again takes a steeper slope than staying in it, so noise does not toggle it
        needed = self._rapid * (1.0 if self.phase in ("rapid_learning", "warmup") else _REENTER_RAPID)
        if (fall is not None and fall > _SIGNIFICANT_SIGMAS * tracker.fall_noise(self._window)
                and fall / self._window >= needed * self._steepest > 0.0):
            return "rapid_learning"
        return "refinement"

    def update(self, tracker: LossTracker, *, past_warmup: bool, diverging: bool, flat: bool,
               low_loss: bool) -> str:
        candidate = self.classify(tracker, past_warmup=past_warmup, diverging=diverging, flat=flat,
                                  low_loss=low_loss)
        if candidate == self.phase:
            self._pending, self._pending_count = None, 0
        elif self.phase is None or candidate == "diverging":
            self.phase, self._pending, self._pending_count = candidate, None, 0
        else:
            self._pending_count = self._pending_count + 1 if candidate == self._pending else 1
            self._pending = candidate
            if self._pending_count >= self._patience:
                self.phase, self._pending, self._pending_count = candidate, None, 0
        return self.phase


class Latch:
    """An anomaly's held state: raised as soon as its condition holds, cleared once the condition has
    been false for `clear_steps` steps."""

    def __init__(self, clear_steps: int) -> None:
        self._clear_steps = clear_steps
        self._last_true: int | None = None
        self.held = False

    def update(self, step: int, holds: bool) -> bool:
        """Returns whether `held` changed."""
        if holds:
            self._last_true = step
            if not self.held:
                self.held = True
                return True
            return False
        if self.held and self._last_true is not None and step - self._last_true >= self._clear_steps:
            self.held = False
            return True
        return False


class DynamicsMonitor:
    """The run's phase and anomalies from its loss, gradients and validation, one observation at a time.

    Call `observe_step` every step, `observe_gradients` when gradient statistics are measured and
    `observe_validation` after each evaluation; read `phase`, `anomalies` and `loss_ema` for metrics,
    and `events()` for what changed since the last call.
    """

    def __init__(self, spec: DetectorSpec | None = None) -> None:
        self.spec = spec if spec is not None else DetectorSpec()
        self.loss = LossTracker(self.spec)
        self.spikes = SpikeDetector(self.spec)
        self.divergence = DivergenceDetector(self.spec)
        self.plateau = PlateauDetector(self.spec)
        self.overfitting = OverfittingDetector(self.spec)
        self.gradients = GradientDetector(self.spec)
        self.phases = PhaseDetector(self.spec)
        self._latches = {kind: Latch(self.spec.anomaly_clear_steps) for kind in ANOMALIES}
        self._first_step: int | None = None
        self._phase = "warmup"
        self._pending: list[Event] = []
        self._phases_entered: list[tuple[str, int]] = []
        self._anomalies_raised: dict[str, int] = {}

    # ------------------------------------------------------------------ observations
    def observe_step(self, step: int, loss: float) -> None:
        loss = float(loss)
        past = self._past_warmup(step)
        spike = self.spikes.update(loss)
        self.loss.update(loss, ceiling=self.spikes.ceiling)
        self._judge(step, "loss_spike", spike, past)
        self._judge(step, "divergence", self.divergence.update(loss, self.loss), past)
        self._judge(step, "plateau", self.plateau.update(self.loss), past)
        phase = self.phases.update(self.loss, past_warmup=past, diverging=self._latches["divergence"].held,
                                   flat=self.plateau.flat, low_loss=self.plateau.low_loss(self.loss))
        self._enter(step, phase)

    def observe_gradients(self, step: int, grad_norm: float,
                          layer_grad_norms: Mapping[str, float] | None = None,
                          layer_update_ratios: Mapping[str, float] | None = None) -> None:
        past = self._past_warmup(step)
        vanishing, exploding = self.gradients.update(float(grad_norm), layer_grad_norms or {},
                                                     layer_update_ratios or {})
        self._judge(step, "vanishing_gradients", vanishing, past)
        self._judge(step, "exploding_gradients", exploding, past)

    def observe_validation(self, step: int, val_loss: float) -> None:
        past = self._past_warmup(step)
        self._judge(step, "overfitting", self.overfitting.update(float(val_loss), self.loss.ema), past)

    # ------------------------------------------------------------------ state
    @property
    def phase(self) -> str:
        return self._phase

    @property
    def anomalies(self) -> dict[str, bool]:
        return {kind: latch.held for kind, latch in self._latches.items()}

    @property
    def loss_ema(self) -> float | None:
        return self.loss.ema

    @property
    def phases_entered(self) -> list[tuple[str, int]]:
        """Every phase entered, in order, with the step it was entered at."""
        return list(self._phases_entered)

    @property
    def anomalies_raised(self) -> dict[str, int]:
        """Each anomaly kind ever raised, with the step it was first raised at."""
        return dict(self._anomalies_raised)

    def events(self) -> list[Event]:
        """Phase and anomaly changes since the last call, oldest first."""
        events, self._pending = self._pending, []
        return events

    # ------------------------------------------------------------------ internals
    def _past_warmup(self, step: int) -> bool:
        if self._first_step is None:
            self._first_step = step
        return step - self._first_step >= self.spec.warmup_steps

    def _judge(self, step: int, kind: str, finding: Finding, past_warmup: bool) -> None:
        latch = self._latches[kind]
        holds = finding.holds and (past_warmup or finding.urgent)
        if not latch.update(step, holds):
            return
        if latch.held:
            self._anomalies_raised.setdefault(kind, step)
            self._pending.append(Event(step, "anomaly", kind, True, finding.detail))
        else:
            self._pending.append(Event(step, "anomaly", kind, False,
                                       f"{kind} cleared: its condition has not held for "
                                       f"{self.spec.anomaly_clear_steps} steps"))

    def _enter(self, step: int, phase: str) -> None:
        if self._phases_entered and phase == self._phase:
            return
        previous = self._phase if self._phases_entered else None
        self._phase = phase
        self._phases_entered.append((phase, step))
        detail = f"entered {phase}" + (f" after {previous}" if previous else "")
        ema = self.loss.ema
        if ema is not None:
            detail += f" (loss EMA {ema:.4g})"
        self._pending.append(Event(step, "phase", phase, True, detail))
