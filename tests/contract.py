"""The metrics contract (gradwatch/ARCHITECTURE.md, "Contracts"), written out by hand so that neither a
worker nor a dashboard can quietly change a name: the live telemetry tests check that workers export
these families, the dashboard tests that the boards ask for nothing else."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# Metric families every rank exports, and those only rank 0 exports.
PER_RANK = [
    "gradwatch_step",
    "gradwatch_epoch",
    "gradwatch_loss",
    "gradwatch_loss_ema",
    "gradwatch_local_grad_norm",
    "gradwatch_step_duration_seconds",
    "gradwatch_samples",
    "gradwatch_nonfinite",
    "gradwatch_last_step_timestamp_seconds",
]
RANK0_ONLY = [
    "gradwatch_grad_norm",
    "gradwatch_weight_norm",
    "gradwatch_learning_rate",
    "gradwatch_layer_grad_norm",
    "gradwatch_layer_weight_norm",
    "gradwatch_layer_update_ratio",
    "gradwatch_gradient_noise_scale",
    "gradwatch_phase",
    "gradwatch_anomaly",
    "gradwatch_job_info",
]
# Per rank too, for a model that measures accuracy.
ACCURACY = "gradwatch_accuracy_ratio"
# The service's own families, and what workers/metrics.py exports beyond the contract for the boards.
SERVICE = ["gradwatch_jobs", "gradwatch_job_state"]
FOR_THE_BOARDS = [
    "gradwatch_global_batch_size",
    "gradwatch_restarts_total",
    "gradwatch_rollbacks_total",
    "gradwatch_skipped_steps_total",
]
# Every rank's system metrics (workers/system.py), and those that exist only where they are known:
# tokens (a batch that says them), MFU (FLOPs per sample and a peak given) and a GPU's (NVML).
SYSTEM = [
    "gradwatch_process_cpu_seconds",
    "gradwatch_host_cpu_ratio",
    "gradwatch_process_resident_memory_bytes",
    "gradwatch_samples_per_second",
]
SYSTEM_WHERE_KNOWN = [
    "gradwatch_tokens",
    "gradwatch_tokens_per_second",
    "gradwatch_model_flops_utilization_ratio",
    "gradwatch_gpu_utilization_ratio",
    "gradwatch_gpu_memory_used_bytes",
    "gradwatch_gpu_temperature_celsius",
    "gradwatch_gpu_power_watts",
]
# Every rank's heartbeat (workers/heartbeat.py), exported by the training API's runs.
HEARTBEAT = [
    "gradwatch_rank_step",
    "gradwatch_rank_step_phase",
    "gradwatch_rank_stuck_seconds",
    "gradwatch_rank_hang_after_seconds",
    "gradwatch_step_phase_seconds",
]
# The series names Prometheus stores for the families that are not plain gauges.
SERIES = {
    "gradwatch_step_phase_seconds": ["gradwatch_step_phase_seconds_total"],
    "gradwatch_process_cpu_seconds": ["gradwatch_process_cpu_seconds_total"],
    "gradwatch_tokens": ["gradwatch_tokens_total"],
    "gradwatch_step_duration_seconds": [
        "gradwatch_step_duration_seconds_bucket",
        "gradwatch_step_duration_seconds_sum",
        "gradwatch_step_duration_seconds_count",
    ],
    "gradwatch_samples": ["gradwatch_samples_total"],
    "gradwatch_nonfinite": ["gradwatch_nonfinite_total"],
}


def series_names() -> set[str]:
    """Every series name a query may use: the contract's families as Prometheus stores them."""
    families = [*PER_RANK, ACCURACY, *RANK0_ONLY, *SERVICE, *FOR_THE_BOARDS, *SYSTEM, *SYSTEM_WHERE_KNOWN, *HEARTBEAT]
    return {name for family in families for name in SERIES.get(family, [family])}


def samples(text: str) -> dict[str, list]:
    """family name -> its samples, from an exposition text."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(fams, family, name=None, **labels) -> float:
    """The first sample of `family` (named `name`, if given) with these labels."""
    for s in fams[family]:
        if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{family} {labels}")
