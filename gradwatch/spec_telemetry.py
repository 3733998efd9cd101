"""The `telemetry` section of a job spec: cadence, cardinality and detector thresholds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DetectorSpec(BaseModel):
    """Thresholds of the online detectors (workers/detectors.py). Defaults suit most runs.

    Windows count observed steps. An anomaly holds while its condition holds and clears once the
    condition has been false for `anomaly_clear_steps` steps.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    ema_alpha: float = Field(0.1, gt=0.0, le=1.0, description="Smoothing of the train loss EMA.")
    warmup_steps: int = Field(20, ge=0, description="Steps before any detector may fire (a non-finite loss "
                                                    "or gradient fires at once).")
    spike_z: float = Field(6.0, gt=0.0, description="Loss spike: robust z-score (median/MAD) above this.")
    spike_window: int = Field(64, ge=8, description="Recent losses the spike z-score is measured against.")
    divergence_factor: float = Field(3.0, gt=1.0,
                                     description="Divergence: loss EMA above this many times its best.")
    plateau_window: int = Field(100, ge=4, description="Steps over which a plateau is judged.")
    plateau_rel_improvement: float = Field(0.01, ge=0.0, lt=1.0,
                                           description="Plateau: relative EMA improvement over the window "
                                                       "below this; it ends once clearly above twice this.")
    converged_loss: float | None = Field(None, ge=0.0,
                                         description="A loss EMA at or below this counts as converged.")
    converged_fraction: float = Field(0.1, gt=0.0, lt=1.0,
                                      description="A flat loss EMA at or below this fraction of the initial "
                                                  "loss counts as converged.")
    stalled_fraction: float = Field(0.5, gt=0.0, le=1.0,
                                    description="A flat loss EMA above this fraction of the initial loss "
                                                "counts as stalled (it has not learned much).")
    phase_window: int = Field(20, ge=2, description="Steps over which the loss EMA slope is measured.")
    rapid_slope_fraction: float = Field(0.3, gt=0.0, lt=1.0,
                                        description="Rapid learning while the EMA falls at least this "
                                                    "fraction of its steepest rate so far.")
    phase_patience: int = Field(10, ge=1, description="Steps a new phase must hold before it is reported "
                                                      "(diverging is reported at once).")
    anomaly_clear_steps: int = Field(10, ge=0, description="An anomaly clears after its condition has been "
                                                           "false this many steps.")
    overfit_evals: int = Field(3, ge=2, description="Overfitting: val loss rising this many evaluations "
                                                   "in a row while train loss falls.")
    vanishing_grad_norm: float = Field(1e-6, gt=0.0,
                                       description="Vanishing: a layer's grad norm below this.")
    vanishing_layer_ratio: float = Field(1e-4, gt=0.0, lt=1.0,
                                         description="Vanishing: smallest over largest layer grad norm "
                                                     "below this.")
    vanishing_update_ratio: float = Field(1e-7, gt=0.0,
                                          description="Vanishing: a layer's (non-zero) update ratio "
                                                      "below this.")
    exploding_grad_norm: float = Field(1e3, gt=0.0, description="Exploding: global grad norm above this.")
    exploding_update_ratio: float = Field(0.5, gt=0.0,
                                          description="Exploding: a layer's update ratio above this.")

    @model_validator(mode="after")
    def _fractions_ordered(self) -> DetectorSpec:
        if self.converged_fraction >= self.stalled_fraction:
            raise ValueError(f"telemetry.detectors.converged_fraction ({self.converged_fraction}) must be "
                             f"below stalled_fraction ({self.stalled_fraction}).")
        if self.vanishing_update_ratio >= self.exploding_update_ratio:
            raise ValueError(f"telemetry.detectors.vanishing_update_ratio ({self.vanishing_update_ratio}) "
                             f"must be below exploding_update_ratio ({self.exploding_update_ratio}).")
        return self


class TelemetrySpec(BaseModel):
    """What each worker measures and exports to Prometheus."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(True, description="Export metrics at all.")
    interval: int = Field(10, ge=1, le=100_000,
                          description="Gradient, weight and per-layer statistics every this many steps.")
    max_layers: int = Field(32, ge=1, le=1024,
                            description="Cap on per-layer series; larger models are grouped by module path.")
    grace_seconds: float = Field(15.0, ge=0.0, le=3600,
                                 description="Endpoints stay up this long after the last step.")
    gns_ema: float = Field(0.95, ge=0.0, lt=1.0,
                           description="EMA decay, per measurement, of the gradient noise scale estimates.")
    detectors: DetectorSpec = Field(default_factory=DetectorSpec)
