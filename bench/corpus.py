"""Synthetic loss curves with known truth: healthy families and unhealthy ones with a known onset.

Each family is a function `(seed) -> Curve`. The curves are what a person would see on a loss
plot of a real run of that kind: a trend (power law, exponential, cosine-scheduled progress) times
per-batch noise (Gaussian, or right-skewed gamma for small batches), a validation loss every
`VAL_EVERY` steps, the learning rate, and for the learning-rate families the per-layer update
ratios a worker measures. Used by bench/detector_quality.py and the detector tests.

Beside them, `real_logs()`: public training logs (bench/data/real, labelled in its logs.json and
SOURCES.md), each a `Curve` whose seed is its place in that list.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
    max_steps: int | None = None  # the run's planned length, when the log (or spec) knows it


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
    *,
    stride: int = 1,
    grad_every: int = MEASURE_EVERY,
) -> list[dict]:
    """One row per logged step (every `stride` steps); the global grad norm every `grad_every` steps."""
    rows = []
    for i, value in enumerate(loss):
        step = (i + 1) * stride
        row: dict = {"step": step, "loss": float(value)}
        if lr is not None:
            row["lr"] = float(lr[i])
        if grad_norm is not None and step % grad_every == 0:
            row["grad_norm"] = float(grad_norm[i])
        if step % MEASURE_EVERY == 0:
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


def _grad_norms(rng: np.random.Generator, n: int, sigma: float | None = None) -> np.ndarray:
    """A healthy global grad norm: high for the first steps, settling, then drifting up to 2x as runs do;
    log-normal batch noise."""
    t = np.arange(1, n + 1, dtype=float)
    base = rng.uniform(0.2, 3.0)
    trend = base * (1.0 + 3.0 * np.exp(-t / rng.uniform(20, 100))) * (1.0 + rng.uniform(0.0, 1.0) * t / n)
    return trend * np.exp((sigma or rng.uniform(0.1, 0.4)) * rng.standard_normal(n))


def gpt_long(seed: int) -> Curve:
    """A 124M-GPT-like run: logged every 10 steps (nanoGPT), from ln(50257) down a cliff, then a long
    power law that keeps falling (4.5 -> 3.3 from a tenth of the run to its end): never converged early."""
    rng = np.random.default_rng(seed)
    stride, total = 10, int(rng.choice([6000, 12000, 19000]))
    n = total // stride
    t = np.arange(1, n + 1, dtype=float) * stride
    start, floor = math.log(50257), rng.uniform(2.6, 3.0)
    trend = floor + (start - floor) * (1.0 + t / rng.uniform(20, 60)) ** -rng.uniform(0.45, 0.6)
    warmup = int(rng.choice([100, 200, 700]))
    lr = _cosine_lr(total, warmup, 6e-4)[stride - 1 :: stride]
    loss = trend * _noise(rng, n, rng.uniform(0.005, 0.02))
    val = {int(s): float(trend[int(s) // stride - 1] * 1.01) for s in range(250, total + 1, 250)}
    grads = _grad_norms(rng, n)
    rows = _rows(loss, val, lr, grad_norm=grads, stride=stride, grad_every=stride)
    return Curve("gpt_long", seed, rows, warmup_steps=warmup, max_steps=total)


def gan_oscillation(seed: int) -> Curve:
    """A bounded oscillation (a GAN's losses, a cyclic schedule): a first fall, then a level that swings
    5-25 % with a period of 50-400 steps: healthy, neither a divergence nor a stall."""
    rng = np.random.default_rng(seed)
    n = 3000
    t = np.arange(1, n + 1, dtype=float)
    start = rng.uniform(1.0, 3.0)
    level = start * rng.uniform(0.4, 0.65)
    trend = level + (start - level) * np.exp(-t / rng.uniform(30, 100))
    period, amplitude = rng.uniform(50, 400), rng.uniform(0.05, 0.25)
    swing = 1.0 + amplitude * np.sin(2 * math.pi * t / period + rng.uniform(0, 2 * math.pi)) * (1 - np.exp(-t / 100))
    loss = trend * swing * _noise(rng, n, rng.uniform(0.02, 0.06))
    return Curve("gan_oscillation", seed, _rows(loss, _val(rng, trend * swing, cv=0.02)), max_steps=n)


def amp_isolated_skips(seed: int) -> Curve:
    """Mixed precision: GradScaler's calibration skips at the start, then one skip (a non-finite gradient,
    the loss finite) each time it grows its scale, about every 2000 steps: counted, not alarmed."""
    rng = np.random.default_rng(seed)
    n = 6000
    trend = _power_law(rng, n)
    grads = _grad_norms(rng, n)
    grads[: int(rng.integers(2, 7))] = math.inf
    for step in range(int(rng.integers(1500, 2500)), n, 2000):
        grads[step + int(rng.integers(-100, 100))] = math.inf
    rows = _rows(trend * _noise(rng, n, 0.03), _val(rng, trend), grad_norm=grads, grad_every=1)
    return Curve("amp_isolated_skips", seed, rows, max_steps=n)


def healthy_grad_norms(seed: int) -> Curve:
    """A warm-up-cosine run whose global grad norm settles, drifts up to 2x and is noisy (log-normal):
    the grad-norm tracker's false-alarm check."""
    rng = np.random.default_rng(seed)
    warmup = int(rng.integers(50, 300))
    lr = _cosine_lr(STEPS, warmup)
    progress = np.cumsum(lr) / lr.max()
    start = rng.uniform(1.5, 3.0)
    floor = start * rng.uniform(0.05, 0.4)
    trend = floor + (start - floor) * (1.0 + progress / rng.uniform(10, 50)) ** -rng.uniform(0.4, 0.9)
    grads = _grad_norms(rng, STEPS, rng.uniform(0.2, 0.6))
    rows = _rows(trend * _noise(rng, STEPS, 0.05), _val(rng, trend), lr, grad_norm=grads, grad_every=1)
    return Curve("healthy_grad_norms", seed, rows, warmup_steps=warmup, max_steps=STEPS)


def finetune_few_evals(seed: int) -> Curve:
    """A fine-tune with 5 evaluations whose validation loss falls, then wobbles by a percent or two."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    final = rng.uniform(0.2, 1.0)
    trend = final * (1.0 + rng.uniform(1.0, 5.0) * np.exp(-t / rng.uniform(50, 200)))
    loss = trend * _noise(rng, STEPS, 0.05)
    val_level = final * rng.uniform(1.05, 1.3)
    val = {
        s: float(val_level * (1.0 + 0.3 * math.exp(-s / 300) + 0.015 * rng.standard_normal()))
        for s in (400, 800, 1200, 1600, 2000)
    }
    return Curve("finetune_few_evals", seed, _rows(loss, val, np.full(STEPS, 2e-5)), max_steps=STEPS)


def sparse_healthy_lm(seed: int) -> Curve:
    """A language model logged every 50 steps that learns (7.7 -> 5.5 over 11k steps): not a stall."""
    rng = np.random.default_rng(seed)
    stride, total = 50, 11000
    n = total // stride
    t = np.arange(1, n + 1, dtype=float) * stride
    start, end = 7.7, rng.uniform(5.0, 6.0)
    trend = end + (start - end) * (1.0 - np.log1p(t / 100.0) / math.log1p(total / 100.0))
    loss = trend * _noise(rng, n, rng.uniform(0.003, 0.01))
    return Curve("sparse_healthy_lm", seed, _rows(loss, None, stride=stride), max_steps=total)


def frozen_layer(seed: int) -> Curve:
    """A fine-tune with a frozen layer: its gradient exactly 0 from the first measurement (not a dead layer)."""
    curve = power_law(0.03)(seed)
    rng = np.random.default_rng(seed + 10_000)
    for row in curve.rows:
        if row["step"] % MEASURE_EVERY == 0:
            norms = {f"block{j}": float(rng.uniform(0.05, 1.0)) for j in range(4)}
            row["layer_grad_norm"] = {"embed": 0.0, **norms}
            row["grad_norm"] = float(math.sqrt(sum(v * v for v in norms.values())))
    return Curve("frozen_layer", seed, curve.rows)


def linear_decay_to_zero(seed: int) -> Curve:
    """A schedule that decays linearly to exactly 0 at its planned end (max_steps known): not a bug."""
    rng = np.random.default_rng(seed)
    warmup = int(rng.integers(20, 200))
    t = np.arange(1, STEPS + 1, dtype=float)
    lr = 1e-3 * np.where(t <= warmup, t / warmup, np.clip((STEPS - t) / (STEPS - warmup), 0.0, None))
    progress = np.cumsum(lr) / lr.max()
    start = rng.uniform(1.5, 3.0)
    floor = start * rng.uniform(0.05, 0.4)
    trend = floor + (start - floor) * (1.0 + progress / rng.uniform(10, 50)) ** -rng.uniform(0.4, 0.9)
    rows = _rows(trend * _noise(rng, STEPS, 0.04), _val(rng, trend), lr)
    return Curve("linear_decay_to_zero", seed, rows, warmup_steps=warmup, max_steps=STEPS)


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
    "gpt_long": gpt_long,
    "gan_oscillation": gan_oscillation,
    "amp_isolated_skips": amp_isolated_skips,
    "healthy_grad_norms": healthy_grad_norms,
    "finetune_few_evals": finetune_few_evals,
    "sparse_healthy_lm": sparse_healthy_lm,
    "frozen_layer": frozen_layer,
    "linear_decay_to_zero": linear_decay_to_zero,
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


def dead_run(seed: int) -> Curve:
    """From some step on the loss is bit-identical: nothing moves (the parameters frozen, one batch)."""
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    loss = trend * noise
    loss[onset - 1 :] = loss[onset - 1]
    return Curve("dead_run", seed, _rows(loss, _val(rng, trend)), onset, max_steps=STEPS)


def lr_drops_to_zero(seed: int) -> Curve:
    """A warm-up-cosine schedule planned for the run whose logged lr falls to 0 mid-run (a scheduler
    stepped per batch but sized in epochs): the loss goes flat at whatever level it had."""
    rng = np.random.default_rng(seed)
    warmup = int(rng.integers(50, 200))
    lr = _cosine_lr(STEPS, warmup)
    onset = int(rng.integers(500, 1300))
    lr[onset - 1 :] = 0.0
    progress = np.cumsum(lr) / lr.max()
    start = rng.uniform(1.5, 3.0)
    floor = start * rng.uniform(0.05, 0.4)
    trend = floor + (start - floor) * (1.0 + progress / rng.uniform(10, 50)) ** -rng.uniform(0.4, 0.9)
    rows = _rows(trend * _noise(rng, STEPS, 0.04), _val(rng, trend), lr)
    return Curve("lr_drops_to_zero", seed, rows, onset, warmup_steps=warmup, max_steps=STEPS)


def creeping_divergence(seed: int) -> Curve:
    """After it had fallen, the loss creeps up 30-60 % over 3000 steps (a learning rate slightly too high
    for the later phase, a data-order bug): no 2x jump, no rise above the start."""
    rng = np.random.default_rng(seed)
    n = 6000
    trend = _power_law(rng, n)
    onset = int(rng.integers(1500, 2500))
    t = np.arange(1, n + 1)
    rise = rng.uniform(0.3, 0.6)
    trend = trend * (1.0 + rise * np.clip(t - onset, 0, None) / 3000.0)
    loss = trend * _noise(rng, n, rng.uniform(0.02, 0.05))
    return Curve("creeping_divergence", seed, _rows(loss, _val(rng, trend)), onset, max_steps=n)


def grad_norm_growth_100x(seed: int) -> Curve:
    """The global grad norm grows geometrically, 100x over 1000-2000 steps, while the loss still looks
    fine: the precursor of most blow-ups."""
    rng = np.random.default_rng(seed)
    n = 4000
    trend = _power_law(rng, n)
    grads = _grad_norms(rng, n, 0.2)
    onset = int(rng.integers(1000, 1800))
    t = np.arange(1, n + 1)
    grads = grads * np.exp(math.log(100.0) * np.clip(t - onset, 0, None) / rng.uniform(1000, 2000))
    rows = _rows(trend * _noise(rng, n, 0.03), _val(rng, trend), grad_norm=grads, grad_every=1)
    return Curve("grad_norm_growth_100x", seed, rows, onset, max_steps=n)


def finetune_overfit_few_evals(seed: int) -> Curve:
    """A fine-tune evaluated 5 times: the train loss falls to 2e-4 while the eval loss rises from its
    best (0.31 -> 0.47 in the real run) after the first or second evaluation."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, STEPS + 1, dtype=float)
    start = rng.uniform(0.5, 2.0)
    trend = start * np.exp(-t / rng.uniform(100, 300)) + 2e-4
    loss = trend * _noise(rng, STEPS, 0.1, skewed=True)
    evals = [400, 800, 1200, 1600, 2000]
    best_at = int(rng.integers(0, 2))
    best = rng.uniform(0.2, 0.5)
    growth = rng.uniform(0.08, 0.15)  # each evaluation this much above the one before
    val = {
        s: float(best * (1.0 + growth * max(0, k - best_at)) * (1 + 0.005 * rng.standard_normal()))
        for k, s in enumerate(evals)
    }
    if best_at:
        val[evals[0]] = float(best * rng.uniform(1.1, 1.4))
    return Curve("finetune_overfit_few_evals", seed, _rows(loss, val), evals[best_at + 1], max_steps=STEPS)


def sparse_stalled_lm(seed: int) -> Curve:
    """A language model logged every 50 steps that barely learns: 7.68 -> 7.58 over 11k steps."""
    rng = np.random.default_rng(seed)
    stride, total = 50, 11000
    n = total // stride
    t = np.arange(1, n + 1, dtype=float) * stride
    start = rng.uniform(7.0, 8.0)
    trend = start * (1.0 - rng.uniform(0.005, 0.02) * t / total)
    loss = trend * _noise(rng, n, rng.uniform(0.002, 0.01))
    return Curve("sparse_stalled_lm", seed, _rows(loss, None, stride=stride), onset=stride, max_steps=total)


def recurring_growing_spikes(seed: int) -> Curve:
    """Spikes that come back every few hundred steps, each larger (2x, 3x, 4.5x ...): an unstable run."""
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    loss = trend * noise
    step, size = onset, rng.uniform(1.8, 2.5)
    while step <= STEPS:
        loss[step - 1] = trend[step - 1] * size
        step += int(rng.integers(100, 300))
        size *= rng.uniform(1.3, 1.6)
    return Curve("recurring_growing_spikes", seed, _rows(loss, _val(rng, trend)), onset, max_steps=STEPS)


def frequent_amp_skips(seed: int) -> Curve:
    """Mixed precision gone wrong: from some step on, a skipped (non-finite gradient) step every 20-80."""
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    grads = _grad_norms(rng, STEPS)
    every = int(rng.integers(20, 80))
    grads[onset - 1 :: every] = math.inf
    rows = _rows(trend * noise, _val(rng, trend), grad_norm=grads, grad_every=1)
    return Curve("frequent_amp_skips", seed, rows, onset, max_steps=STEPS)


def dead_layers(seed: int) -> Curve:
    """After a learning rate far too high, most layers' gradients are exactly 0 (dead ReLUs): the model
    predicts the mean and the loss is flat at the label variance."""
    rng = np.random.default_rng(seed)
    trend, noise, onset = _healthy_base(rng)
    onset -= onset % MEASURE_EVERY
    level = trend[onset - 1]
    trend[onset - 1 :] = level
    loss = trend * noise
    rows = _rows(loss, _val(rng, trend))
    dead = int(rng.integers(2, 5))
    for row in rows:
        if row["step"] % MEASURE_EVERY == 0:
            norms = {f"layer{j}": float(rng.uniform(0.05, 1.0)) for j in range(5)}
            if row["step"] >= onset:
                norms.update({f"layer{j}": 0.0 for j in range(dead)})
            row["layer_grad_norm"] = norms
            row["grad_norm"] = float(math.sqrt(sum(v * v for v in norms.values())))
    return Curve("dead_layers", seed, rows, onset)


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
    "dead_run": dead_run,
    "lr_drops_to_zero": lr_drops_to_zero,
    "creeping_divergence": creeping_divergence,
    "grad_norm_growth_100x": grad_norm_growth_100x,
    "finetune_overfit_few_evals": finetune_overfit_few_evals,
    "sparse_stalled_lm": sparse_stalled_lm,
    "recurring_growing_spikes": recurring_growing_spikes,
    "frequent_amp_skips": frequent_amp_skips,
    "dead_layers": dead_layers,
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
    "dead_run": ("dead_run", "TrainingStalled"),
    "lr_drops_to_zero": ("lr_schedule", "TrainingStalled"),
    "creeping_divergence": ("divergence", "TrainingDiverging"),
    "grad_norm_growth_100x": ("grad_norm_growth", "GradNormGrowing"),
    "finetune_overfit_few_evals": ("overfitting", "TrainingOverfitting"),
    "sparse_stalled_lm": ("plateau", "TrainingStalled"),
    "recurring_growing_spikes": ("divergence", "TrainingDiverging"),
    "frequent_amp_skips": ("nonfinite", "TrainingLossNonFinite"),
    "dead_layers": ("vanishing_gradients", "VanishingGradients"),
}


# ------------------------------------------------------------------ real public logs
REAL_DIR = Path(__file__).resolve().parent / "data" / "real"
_COLUMNS = ("loss", "val_loss", "lr", "grad_norm")


@dataclass
class RealLog:
    """One public log and its label: `onset` None for a healthy run, else the detector `kind` must fire
    at or after it and within `within` steps."""

    curve: Curve
    file: str
    repo: str
    commit: str
    kind: str | None = None
    within: int | None = None


def _read_real(path: Path) -> list[dict]:
    import csv

    rows = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict = {"step": int(raw["step"])}
            row.update({k: float(raw[k]) for k in _COLUMNS if raw.get(k)})
            rows.append(row)
    return rows


def real_logs(directory: Path = REAL_DIR) -> list[RealLog]:
    """Every log of `directory`/logs.json, read and labelled."""
    manifest = directory / "logs.json"
    try:
        entries = json.loads(manifest.read_text())["logs"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{manifest}: cannot read the real logs' list ({exc}); it must be JSON with a `logs` list"
        ) from None
    out = []
    for seed, entry in enumerate(entries):
        missing = {"file", "family", "repo", "commit", "max_steps", "warmup_steps", "onset"} - set(entry)
        if missing:
            raise ValueError(f"{manifest}: entry {seed} ({entry.get('file')}) lacks {sorted(missing)}")
        if entry["onset"] is not None and not {"kind", "within"} <= set(entry):
            raise ValueError(f"{manifest}: {entry['file']} has an onset, so it needs `kind` and `within` too")
        rows = _read_real(directory / entry["file"])
        curve = Curve(entry["family"], seed, rows, entry["onset"], entry["warmup_steps"], entry["max_steps"])
        out.append(
            RealLog(curve, entry["file"], entry["repo"], entry["commit"], entry.get("kind"), entry.get("within"))
        )
    return out


# What each real unhealthy family must be caught by, as MEANT_FOR.
REAL_MEANT_FOR: dict[str, tuple[str, str]] = {
    "real_overfit_logs": ("overfitting", "TrainingOverfitting"),
    "real_mild_overfit_logs": ("overfitting", "TrainingOverfitting"),
    "real_diverged_logs": ("divergence", "TrainingDiverging"),
}
