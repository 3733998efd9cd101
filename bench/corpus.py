"""Synthetic loss curves with known truth: healthy families and unhealthy ones with a known onset.

Each family is a function `(seed) -> Curve`. The curves are what a person would see on a loss
plot of a real run of that kind: a trend (power law, exponential, cosine-scheduled progress) times
per-batch noise (Gaussian, or right-skewed gamma for small batches), a validation loss every
`VAL_EVERY` steps, the learning rate, and for the learning-rate families the per-layer update
ratios a worker measures. Used by bench/detector_quality.py and the detector tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

STEPS = 2000
VAL_EVERY = 20
MEASURE_EVERY = 10  # gradient statistics, as telemetry.interval


@dataclass
class Curve:
    family: str
    seed: int
    rows: list[dict] = field(default_factory=list)
    onset: int | None = None  # first step of the fault (unhealthy families)
    warmup_steps: int = 0  # the schedule's warm-up, as a spec would say


def _noise(rng: np.random.Generator, n: int, cv: float, skewed: bool = False) -> np.ndarray:
    """Multiplicative per-batch noise with mean 1 and coefficient of variation `cv`."""
    if skewed:  # a small batch's mean loss: right-skewed, positive (gamma with that CV)
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, 1.0 / shape, n)
    return np.clip(1.0 + cv * rng.standard_normal(n), 0.05, None)


def _power_law(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(1, n + 1, dtype=float)
    start = rng.uniform(1.0, 3.0)
    floor = start * rng.uniform(0.02, 0.4)
    exponent = rng.uniform(0.3, 0.8)
    t0 = rng.uniform(5, 60)
    return floor + (start - floor) * (1.0 + t / t0) ** -exponent


def _val(rng: np.random.Generator, trend: np.ndarray, gap: float = 1.05, cv: float = 0.01) -> dict[int, float]:
    out = {}
    for step in range(VAL_EVERY, len(trend) + 1, VAL_EVERY):
        out[step] = float(trend[step - 1] * gap * (1.0 + cv * rng.standard_normal()))
    return out


def _rows(
    loss: np.ndarray,
    val: dict[int, float] | None = None,
    lr: np.ndarray | None = None,
    update_ratio: np.ndarray | None = None,
    grad_norm: np.ndarray | None = None,
) -> list[dict]:
    rows = []
    for i, value in enumerate(loss):
        step = i + 1
        row: dict = {"step": step, "loss": float(value)}
        if lr is not None:
            row["lr"] = float(lr[i])
        if step % MEASURE_EVERY == 0:
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm[i])
            if update_ratio is not None:
                row["layer_update_ratio"] = {f"layer{j}": float(update_ratio[i] * (1 + 0.3 * j)) for j in range(3)}
                row["layer_grad_norm"] = {f"layer{j}": float(0.5 + 0.2 * j) for j in range(3)}
        if val is not None and step in val:
            row["val_loss"] = val[step]
        rows.append(row)
    return rows


def _cosine_lr(n: int, warmup: int, peak: float = 1e-3) -> np.ndarray:
    t = np.arange(1, n + 1, dtype=float)
    warm = np.minimum(1.0, t / max(warmup, 1))
    progress = np.clip((t - warmup) / max(n - warmup, 1), 0.0, 1.0)
    return peak * np.where(t <= warmup, warm, 0.5 * (1 + np.cos(math.pi * progress)))


# ------------------------------------------------------------------ healthy families
def power_law(cv: float) -> Callable[[int], Curve]:
    def make(seed: int) -> Curve:
        rng = np.random.default_rng(seed)
        trend = _power_law(rng, STEPS)
        return Curve(f"power_law_{round(cv * 100)}pct", seed, _rows(trend * _noise(rng, STEPS, cv), _val(rng, trend)))

    return make


def llm_constant_lr(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    start = math.log(rng.choice([256, 32000, 50257]))
    floor = start * rng.uniform(0.25, 0.45)
    trend = floor + (start - floor) * (1.0 + t / rng.uniform(10, 40)) ** -rng.uniform(0.4, 0.7)
    lr = np.full(STEPS, 3e-4)
    return Curve("llm_constant_lr", seed, _rows(trend * _noise(rng, STEPS, 0.02), _val(rng, trend, 1.02), lr))


def warmup_cosine(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    warmup = int(rng.integers(50, 300))
    lr = _cosine_lr(STEPS, warmup)
    progress = np.cumsum(lr) / lr.max()  # steps at full learning rate so far
    start = rng.uniform(1.5, 3.0)
    floor = start * rng.uniform(0.05, 0.4)
    trend = floor + (start - floor) * (1.0 + progress / rng.uniform(10, 50)) ** -rng.uniform(0.4, 0.9)
    loss = trend * _noise(rng, STEPS, 0.05)
    return Curve("warmup_cosine", seed, _rows(loss, _val(rng, trend), lr), warmup_steps=warmup)


def warm_restarts(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    period = int(rng.choice([250, 400, 500]))
    t = np.arange(STEPS)
    lr = 1e-3 * 0.5 * (1 + np.cos(math.pi * (t % period) / period)) + 1e-5
    progress = np.cumsum(lr) / lr.max()
    start = rng.uniform(1.5, 3.0)
    floor = start * rng.uniform(0.05, 0.3)
    base = floor + (start - floor) * (1.0 + progress / 20.0) ** -0.6
    # each restart's high learning rate lifts the loss a little, then it falls below where it was
    lift = 1.0 + rng.uniform(0.05, 0.2) * (lr / lr.max()) * (t >= period)
    trend = base * lift
    return Curve("warm_restarts", seed, _rows(trend * _noise(rng, STEPS, 0.04), _val(rng, trend), lr))


def small_batch_heavy_tailed(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend = _power_law(rng, STEPS)
    loss = trend * _noise(rng, STEPS, rng.uniform(0.3, 0.5), skewed=True)
    return Curve("small_batch_skewed", seed, _rows(loss, _val(rng, trend, cv=0.02)))


def near_zero(cv: float) -> Callable[[int], Curve]:
    def make(seed: int) -> Curve:
        rng = np.random.default_rng(seed)
        t = np.arange(1, STEPS + 1, dtype=float)
        start = rng.uniform(0.5, 2.5)
        trend = start * np.exp(-t / rng.uniform(100, 400)) + start * 1e-4
        loss = trend * _noise(rng, STEPS, cv, skewed=True)
        return Curve(f"near_zero_cv{cv:g}", seed, _rows(loss, _val(rng, trend + start * 0.01, cv=0.05)))

    return make


def fine_tuning(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    final = rng.uniform(0.3, 2.0)
    trend = final * (1.0 + rng.uniform(0.1, 0.3) * np.exp(-t / rng.uniform(50, 300)))
    loss = trend * _noise(rng, STEPS, rng.uniform(0.02, 0.06))
    return Curve("fine_tuning", seed, _rows(loss, _val(rng, trend, cv=0.01), np.full(STEPS, 2e-5)))


def plateau_then_descent(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    start = rng.uniform(1.5, 3.0)
    level = start * rng.uniform(0.4, 0.7)
    begin, length = int(rng.integers(150, 400)), int(rng.integers(200, 600))
    first = level + (start - level) * np.exp(-t / (begin / 4))
    later = np.clip(t - begin - length, 0, None)
    trend = np.where(t < begin + length, first, level * (0.3 + 0.7 * (1.0 + later / 50.0) ** -0.7))
    loss = trend * _noise(rng, STEPS, 0.03)
    return Curve("plateau_then_descent", seed, _rows(loss, _val(rng, trend)))


HEALTHY: dict[str, Callable[[int], Curve]] = {
    "power_law_2pct": power_law(0.02),
    "power_law_5pct": power_law(0.05),
    "power_law_10pct": power_law(0.10),
    "llm_constant_lr": llm_constant_lr,
    "warmup_cosine": warmup_cosine,
    "warm_restarts": warm_restarts,
    "small_batch_skewed": small_batch_heavy_tailed,
    "near_zero_cv0.5": near_zero(0.5),
    "near_zero_cv1": near_zero(1.0),
    "fine_tuning": fine_tuning,
    "plateau_then_descent": plateau_then_descent,
}


# ------------------------------------------------------------------ unhealthy families
def _healthy_base(rng: np.random.Generator, cv: float = 0.03) -> tuple[np.ndarray, np.ndarray, int]:
    trend = _power_law(rng, STEPS)
    return trend, _noise(rng, STEPS, cv), int(rng.integers(500, 1300))


def slow_exponential_divergence(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    t = np.arange(1, STEPS + 1)
    rate = rng.uniform(0.005, 0.02)
    trend = trend * np.exp(rate * np.clip(t - onset, 0, None))
    return Curve("slow_exponential_divergence", seed, _rows(trend * noise, _val(rng, trend)), onset)


def linear_divergence(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    t = np.arange(1, STEPS + 1)
    level = trend[onset - 1]
    trend = trend + level * rng.uniform(0.005, 0.02) * np.clip(t - onset, 0, None)  # +0.5-2 % of it per step
    return Curve("linear_divergence", seed, _rows(trend * noise, _val(rng, trend)), onset)


def persistent_jump(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    trend = trend * np.where(np.arange(1, STEPS + 1) >= onset, 3.0, 1.0)
    return Curve("persistent_3x_jump", seed, _rows(trend * noise, _val(rng, trend)), onset)


def one_step_spike(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng, cv=float(rng.choice([0.02, 0.05])))
    loss = trend * noise
    loss[onset - 1] = 2.0 * trend[onset - 1]
    return Curve("one_step_2x_spike", seed, _rows(loss, _val(rng, trend)), onset)


def one_nan(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    loss = trend * noise
    loss[onset - 1] = float("nan")
    return Curve("one_nan", seed, _rows(loss, _val(rng, trend)), onset)


def persistent_nan(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    loss = trend * noise
    loss[onset - 1 :] = float("nan")
    return Curve("persistent_nan", seed, _rows(loss, _val(rng, trend)), onset)


def validation_turns_up(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    t = np.arange(1, STEPS + 1)
    val_trend = trend * 1.05 * (1.0 + rng.uniform(0.0005, 0.002) * np.clip(t - onset, 0, None))
    return Curve("validation_turns_up", seed, _rows(trend * noise, _val(rng, val_trend, gap=1.0)), onset)


def flat_from_start(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    level = rng.uniform(0.5, 3.0)
    trend = np.full(STEPS, level)
    loss = trend * _noise(rng, STEPS, rng.uniform(0.01, 0.08))
    return Curve("flat_from_start", seed, _rows(loss, _val(rng, trend)), onset=1)


def lr_far_too_high(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    start = rng.uniform(1.0, 3.0)
    stuck = start * rng.uniform(1.2, 1.6)
    trend = stuck + (start - stuck) * np.exp(-t / rng.uniform(5, 30))
    loss = trend * _noise(rng, STEPS, rng.uniform(0.02, 0.08))
    return Curve("lr_far_too_high", seed, _rows(loss, _val(rng, trend), np.full(STEPS, 8.0)), onset=1)


def lr_far_too_low(seed: int) -> Curve:
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    start = rng.uniform(1.0, 3.0)
    trend = start * (1.0 - 0.005 * t / STEPS)  # learns half a percent in the whole run
    loss = trend * _noise(rng, STEPS, rng.uniform(0.01, 0.05))
    ratio = np.full(STEPS, 10 ** rng.uniform(-10, -8))
    grad = np.full(STEPS, rng.uniform(0.5, 5.0))
    return Curve("lr_far_too_low", seed, _rows(loss, _val(rng, trend), np.full(STEPS, 1e-8), ratio, grad), onset=1)


UNHEALTHY: dict[str, Callable[[int], Curve]] = {
    "slow_exponential_divergence": slow_exponential_divergence,
    "linear_divergence": linear_divergence,
    "persistent_3x_jump": persistent_jump,
    "one_step_2x_spike": one_step_spike,
    "one_nan": one_nan,
    "persistent_nan": persistent_nan,
    "validation_turns_up": validation_turns_up,
    "flat_from_start": flat_from_start,
    "lr_far_too_high": lr_far_too_high,
    "lr_far_too_low": lr_far_too_low,
}

# What each unhealthy family must be caught by: the detector (anomaly kind) and the alert.
MEANT_FOR: dict[str, tuple[str, str]] = {
    "slow_exponential_divergence": ("divergence", "TrainingDiverging"),
    "linear_divergence": ("divergence", "TrainingDiverging"),
    "persistent_3x_jump": ("divergence", "TrainingDiverging"),
    "one_step_2x_spike": ("loss_spike", "TrainingLossSpike"),
    "one_nan": ("nonfinite", "TrainingLossNonFinite"),
    "persistent_nan": ("divergence", "TrainingDiverging"),
    "validation_turns_up": ("overfitting", "TrainingOverfitting"),
    "flat_from_start": ("plateau", "TrainingStalled"),
    "lr_far_too_high": ("divergence", "TrainingDiverging"),
    "lr_far_too_low": ("lr_too_low", "TrainingStalled"),
}
