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
    """Every model of the spec: unknown keys refused, defaults validated, and a number never given as
    `true`/`false` (pydantic alone would read `true` as 1)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

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
    """Thresholds of the online detectors (workers/detectors.py). Defaults suit most runs.

    Windows count observed steps. Every comparison is made against the curve's own noise, measured
    as it goes, so the defaults hold from clean full-batch curves to small-batch noise; the README's
    detector-quality table shows their false-alarm and detection rates. An anomaly holds while its
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
        5,
        ge=1,
        le=1000,
        description="Overfitting: val loss above its best (beyond "
        "noise and overfit_min_rise) this many "
        "evaluations in a row while train loss falls.",
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
    grace_seconds: float = Field(15.0, ge=0.0, le=3600, description="Endpoints stay up this long after the last step.")
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
    detectors: DetectorSpec = Field(default_factory=DetectorSpec)
