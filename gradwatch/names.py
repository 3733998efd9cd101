"""Names that the service, the workers, the rules and the dashboards must spell alike.

Standard library only: every side imports this cheaply.
"""

from __future__ import annotations

from typing import Literal

# ---- jobs
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "timed_out"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "timed_out")
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timed_out"})

# ---- alerts (Alertmanager's statuses)
AlertStatus = Literal["firing", "resolved"]

# ---- training dynamics (the detectors' vocabulary, exported as metric labels)
PHASES: tuple[str, ...] = ("warmup", "rapid_learning", "refinement", "converged", "stalled", "diverging")
ANOMALIES: tuple[str, ...] = (
    "nonfinite",
    "loss_spike",
    "divergence",
    "plateau",
    "overfitting",
    "vanishing_gradients",
    "exploding_gradients",
    "lr_too_low",
)
NONFINITE_KINDS: tuple[str, ...] = ("loss", "grad")

# ---- where things are by default
DEFAULT_SERVICE_URL = "http://127.0.0.1:8765"
DEFAULT_SERVICE_PORT = 8765
DEFAULT_RAY_DASHBOARD = "http://127.0.0.1:8265"
DEFAULT_RAY_DASHBOARD_PORT = 8265
DATASOURCE_UID = "gradwatch-prometheus"  # the Grafana datasource uid that dashboards and rules are written against
