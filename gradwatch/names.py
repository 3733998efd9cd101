"""Names that the service, the workers, the rules and the dashboards must spell alike.

Standard library only: every side imports this cheaply.
"""

from __future__ import annotations

from typing import Literal, get_args

# ---- jobs
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled", "timed_out"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
TERMINAL_STATES: frozenset[str] = frozenset(JOB_STATES) - {"queued", "running"}

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
    "dead_run",
    "lr_schedule",
    "grad_norm_growth",
)
NONFINITE_KINDS: tuple[str, ...] = ("loss", "grad")

# ---- where things are by default
DEFAULT_SERVICE_PORT = 8765
DEFAULT_SERVICE_URL = f"http://127.0.0.1:{DEFAULT_SERVICE_PORT}"
DEFAULT_RAY_DASHBOARD_PORT = 8265
DEFAULT_RAY_DASHBOARD = f"http://127.0.0.1:{DEFAULT_RAY_DASHBOARD_PORT}"
DATASOURCE_UID = "gradwatch-prometheus"  # the Grafana datasource uid that dashboards and rules are written against

# ---- Ray Train's settings for every job: in its driver, and (through the job's runtime environment) in
# Ray Train's controller actor. Train's V2 API, and the controller's health check every 0.5 s instead of
# Ray's 2 s: it registers a reported checkpoint, notices a dead worker and a finished run at its next check,
# so a crash right after a checkpoint loses as little as possible and a run ends without idling.
RAY_TRAIN_ENV: dict[str, str] = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

# ---- the test hook: with this set to 1 in the workers' environment each rank's final report also
# carries a fingerprint of its parameters and the built-in loop the sample indices of its first epoch
# (workers.training.reports_for_tests), so the tests can check DDP's replicas and shards
TEST_REPORTS_ENV = "GRADWATCH_TEST_REPORTS"
