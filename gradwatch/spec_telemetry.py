"""The `telemetry` section of a job spec: cadence, cardinality and detector thresholds."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


def _numbers_only(annotation: Any) -> bool:
    """Whether a field takes numbers and nothing else (`int`, `float`, either or none)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    kinds = set(args) - {type(None)}
    return bool(kinds) and kinds <= {int, float}


class Strict(BaseModel):
    """Every model of the spec: unknown keys refused, defaults validated, every float finite (`.inf`,
    `1e999` and `.nan` are refused, bounded or not), and a number never given as `true`/`false`
    (pydantic alone would read `true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name and _numbers_only(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError(
                "number_not_boolean",
                "a number is needed here, not {value}: write the number itself",
                {"value": "true" if value else "false"},
            )
        return value


class DetectorSpec(Strict):
    """Thresholds of the online detectors (workers/detectors/, docs/detectors.md). Defaults suit most runs.

    Windows, patience and warm-up are measured in optimizer steps (a log written every 1, 10 or 50 steps
    gets the same verdict), or as a share of the run's planned length when it is known. Every comparison
    is made against the curve's own noise, measured as it goes, so the defaults hold from clean
    full-batch curves to small-batch noise; bench/detector_quality.py measures their false-alarm and
    detection rates. An anomaly holds while its
    condition holds and clears once the condition has been false for `anomaly_clear_steps` steps.
    """

    ema_alpha: float = Field(0.1, gt=0.0, le=1.0, description="Smoothing of the train loss EMA.")
    warmup_steps: int = Field(
        20,
        ge=0,
        description="Steps before any detector may fire (a non-finite loss "
        "or gradient is reported at once). A learning rate "
        "still rising (the schedule's warm-up) extends it.",
    )
    noise_sigmas: float = Field(
        3.0,
        gt=0.0,
        le=20.0,
        description="How many standard deviations of the curve's own noise a "
        "change must exceed before a detector counts it.",
    )
    spike_z: float = Field(
        8.0,
        gt=0.0,
        description="Loss spike: robust z-score of log(loss) against the median/MAD of the recent window above this.",
    )
    spike_min_ratio: float = Field(
        1.5, gt=1.0, description="Loss spike: and the loss at least this many times the recent median."
    )
    spike_window: int = Field(64, ge=8, le=10_000, description="Recent losses a spike is measured against.")
    divergence_factor: float = Field(
        2.0,
        gt=1.0,
        description="Divergence: loss level above this many times its best level (both with their noise margins).",
    )
    divergence_rise: float = Field(
        0.05,
        gt=0.0,
        description="Divergence: loss level this fraction above where the run "
        "started, for divergence_patience steps past warm-up.",
    )
    divergence_patience: int = Field(
        50, ge=1, le=100_000, description="Steps a loss above its start must last to be a divergence."
    )
    nonfinite_steps: int = Field(
        3,
        ge=1,
        le=100_000,
        description="Divergence: this many non-finite steps in a row (fewer is a `nonfinite` event, the step skipped).",
    )
    plateau_window: int = Field(100, ge=4, le=100_000, description="Steps over which flatness is judged.")
    stalled_improvement: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Stalled: flat, and even the upper bound of how far "
        "the loss fell from its first plateau_window steps to "
        "its latest ones is below this fraction of where it "
        "started.",
    )
    converged_loss: float | None = Field(
        None, ge=0.0, description="A flat loss at or below this counts as converged; above it, flat counts as stalled."
    )
    phase_window: int = Field(20, ge=2, le=100_000, description="Steps over which the loss EMA slope is measured.")
    rapid_slope_fraction: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Rapid learning while the EMA falls at least this fraction of its steepest rate so far.",
    )
    phase_patience: int = Field(
        10, ge=1, description="Steps a new phase must hold before it is reported (diverging is reported at once)."
    )
    anomaly_clear_steps: int = Field(
        10, ge=0, description="An anomaly clears after its condition has been false this many steps."
    )
    overfit_evals: int = Field(
        3,
        ge=1,
        le=1000,
        description="Overfitting: val loss above its best (beyond "
        "noise and overfit_min_rise) this many "
        "evaluations in a row while train loss falls.",
    )
    overfit_few_rise: float = Field(
        0.1,
        gt=0.0,
        le=10.0,
        description="Overfitting before the validation noise can be measured (fewer than 8 evaluations): the "
        "last overfit_evals evaluations each above the one before and the last this fraction above the best.",
    )
    overfit_min_rise: float = Field(
        0.02, ge=0.0, description="Overfitting: val loss at least this fraction above its best."
    )
    vanishing_grad_norm: float = Field(1e-6, gt=0.0, description="Vanishing: a layer's grad norm below this.")
    vanishing_layer_ratio: float = Field(
        1e-4, gt=0.0, lt=1.0, description="Vanishing: smallest over largest layer grad norm below this."
    )
    lr_too_low_update_ratio: float = Field(
        1e-6,
        gt=0.0,
        description="Learning rate too low: the median layer update "
        "ratio ||dw||/||w|| below this while the gradients "
        "are not vanishing and the schedule is not in its "
        "tail.",
    )
    exploding_grad_norm: float = Field(1e3, gt=0.0, description="Exploding: global grad norm above this.")
    grad_explode_factor: float = Field(
        10.0,
        gt=1.0,
        le=1e6,
        description="Exploding: the global grad norm's level (median over grad_norm_window steps) this many "
        "times its own baseline (the lowest such level seen past warm-up).",
    )
    grad_growth_factor: float = Field(
        3.0,
        gt=1.0,
        le=1e6,
        description="grad_norm_growth (an early warning): the global grad norm grew this many times over "
        "grad_growth_horizon steps, rising significantly, and stands this far above its baseline.",
    )
    grad_norm_window: int = Field(
        50, ge=1, le=1_000_000, description="Steps whose grad norms (at least 5) give the norm's current level."
    )
    grad_growth_horizon: int = Field(
        500, ge=10, le=10_000_000, description="Steps over which the grad norm's growth is measured."
    )
    dead_run_steps: int = Field(
        50,
        ge=2,
        le=10_000_000,
        description="Dead run: the loss bit-identical (or every gradient exactly 0) this many steps, over at "
        "least 5 logged values.",
    )
    dead_layer_steps: int = Field(
        50,
        ge=1,
        le=10_000_000,
        description="Vanishing (a dead layer): a layer that had a gradient, then exactly 0 for this many steps "
        "(at least 3 measurements).",
    )
    lr_schedule_fraction: float = Field(
        1e-3,
        gt=0.0,
        lt=1.0,
        description="Learning-rate schedule bug: the logged lr at 0, or below this fraction of its peak (after "
        "the peak), for lr_schedule_steps steps before the schedule's tail.",
    )
    lr_schedule_steps: int = Field(
        20, ge=1, le=10_000_000, description="Steps a learning rate at 0 (or near it) must last to be a bug."
    )
    lr_schedule_tail: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of max_steps at the end of a run where a learning rate near 0 is the schedule's plan.",
    )
    trend_rise: float = Field(
        0.1,
        gt=0.0,
        le=100.0,
        description="Trend divergence: the loss level this fraction above its best level (beyond noise), "
        "rising significantly over trend_horizon steps and twice that.",
    )
    trend_horizon: int = Field(
        500,
        ge=20,
        le=10_000_000,
        description="Trend divergence: the shorter horizon in steps (at least a 40th of max_steps when known).",
    )
    trend_z: float = Field(
        3.0, gt=0.0, le=20.0, description="Trend divergence: the Mann-Kendall z a rise must exceed on each horizon."
    )
    spike_recurrence: int = Field(
        3,
        ge=2,
        le=1000,
        description="Instability (a divergence): this many loss spikes within spike_recurrence_steps, each "
        "larger than the one before.",
    )
    spike_recurrence_steps: int = Field(
        1000, ge=1, le=10_000_000, description="Steps within which recurring spikes are counted."
    )
    nonfinite_skips: int = Field(
        5,
        ge=1,
        le=100_000,
        description="A nonfinite alarm when this many steps with a finite loss but a non-finite gradient "
        "(GradScaler's skips) fall within nonfinite_window steps; fewer are counted, not alarmed.",
    )
    nonfinite_window: int = Field(
        1000, ge=1, le=10_000_000, description="Steps within which skipped non-finite-gradient steps are counted."
    )
    converged_improvement: float = Field(
        0.02,
        ge=0.0,
        lt=1.0,
        description="Converged: over the last half of the run so far the loss fell by at most this fraction "
        "of its level (or by no more than noise), after it had learned.",
    )
    judge_after_share: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="With the run's length known (max_steps), stalled and converged are not judged before "
        "this share of it.",
    )
    exploding_update_ratio: float = Field(0.5, gt=0.0, description="Exploding: a layer's update ratio above this.")

    @model_validator(mode="after")
    def _ratios_ordered(self) -> DetectorSpec:
        if self.lr_too_low_update_ratio >= self.exploding_update_ratio:
            raise ValueError(
                f"telemetry.detectors.lr_too_low_update_ratio ({self.lr_too_low_update_ratio}) "
                f"must be below exploding_update_ratio ({self.exploding_update_ratio})."
            )
        return self


class TelemetrySpec(Strict):
    """What each worker measures and exports to Prometheus."""

    enabled: bool = Field(True, description="Export metrics at all.")
    interval: int = Field(
        10, ge=1, le=100_000, description="Gradient, weight and per-layer statistics every this many steps."
    )
    max_layers: int = Field(
        32, ge=1, le=1024, description="Cap on per-layer series; larger models are grouped by module path."
    )
    grace_seconds: float = Field(
        15.0,
        ge=0.0,
        le=3600,
        description="After the last step, endpoints stay up until scraped again, at most this long.",
    )
    hang_after: float = Field(
        60.0,
        ge=10.0,
        le=86_400.0,
        description="A rank that stays this many seconds (at least 10) in one phase of a step (or 10 of its median "
        "step times, when longer) is hung: the hang event and the TrainingHang alert (docs/hangs.md).",
    )
    gns_ema: float = Field(
        0.95, ge=0.0, lt=1.0, description="EMA decay, per measurement, of the gradient noise scale estimates."
    )
    system_interval: float = Field(
        5.0,
        ge=0.0,
        le=3600.0,
        description="Seconds between samples of each worker's system metrics (CPU, memory, GPU, throughput) by a "
        "background thread, 0.05 at least; 0 turns them off (docs/system-metrics.md).",
        json_schema_extra={"anyOf": [{"const": 0}, {"minimum": 0.05}]},
    )
    flops_per_sample: float | None = Field(
        None,
        gt=0.0,
        description="The model's training FLOPs per sample (forward and backward, about 6 x parameters x tokens "
        "for a transformer): with peak_flops, the model FLOPs utilisation (MFU).",
    )
    peak_flops: float | None = Field(
        None, gt=0.0, description="Peak FLOP/s of one worker's device at the training precision, for MFU."
    )
    detectors: DetectorSpec = Field(default_factory=DetectorSpec)

    @field_validator("system_interval")
    @classmethod
    def _system_interval(cls, value: float) -> float:
        if 0 < value < 0.05:
            raise ValueError(
                "sample system metrics at most every 0.05 s (a faster sampler costs the steps), or 0 for none"
            )
        return value
