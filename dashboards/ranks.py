"""Ranks board: the DDP workers of one run side by side, to find a slow or stuck rank."""

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard, heatmap, timeseries
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.heatmap import HeatmapColorMode, HeatmapColorScale

from dashboards.style import (
    RANKS_UID,
    label_variable,
    new_dashboard,
    promql,
    styled,
    thresholds,
    timeseries_panel,
)

JOB = 'job_id="$job_id"'
# Every series keeps the Ray node its rank ran on (a label of the scrape target), so a slow node shows.
BY_RANK_NODE = "rank {{rank}} on {{node}}"


def mean_step_seconds(window: str) -> str:
    """Each rank's mean step time over `window`: rate of the histogram's sum over rate of its count."""
    return (
        f"sum by (rank, node) (rate(gradwatch_step_duration_seconds_sum{{{JOB}}}[{window}]))"
        f" / sum by (rank, node) (rate(gradwatch_step_duration_seconds_count{{{JOB}}}[{window}]))"
    )


def step_time_quantiles() -> timeseries.Panel:
    def quantile(q: float) -> str:
        return (
            f"histogram_quantile({q}, sum by (rank, node, le) "
            f"(rate(gradwatch_step_duration_seconds_bucket{{{JOB}}}[$__rate_interval])))"
        )

    return timeseries_panel(
        "Step time p50 and p90 per rank",
        "Median and 90th percentile of each rank's optimizer step time, from the "
        "gradwatch_step_duration_seconds "
        "histogram.",
        "s",
    ).targets(
        [
            promql(quantile(0.5), "rank {{rank}} on {{node}} p50", ref_id="A"),
            promql(quantile(0.9), "rank {{rank}} on {{node}} p90", ref_id="B"),
        ]
    )


def mean_step_time() -> timeseries.Panel:
    return timeseries_panel(
        "Mean step time per rank",
        "Each rank's mean step time: rate(sum) / rate(count) of gradwatch_step_duration_seconds.",
        "s",
    ).with_target(promql(mean_step_seconds("$__rate_interval"), BY_RANK_NODE))


def step_time_heatmap() -> heatmap.Panel:
    panel = (
        heatmap.Panel()
        .calculate(False)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .cell_gap(1)
    )
    return styled(
        panel,
        "Step time distribution, all ranks",
        "How many steps per second fell into each step-time bucket, all ranks together "
        "(gradwatch_step_duration_seconds_bucket). Two bands mean two speeds of rank.",
        "s",
        width=24,
        height=8,
    ).with_target(
        promql(
            f"sum by (le) (rate(gradwatch_step_duration_seconds_bucket{{{JOB}}}[$__rate_interval]))",
            "{{le}}",
            as_heatmap=True,
        )
    )


def throughput_per_rank() -> timeseries.Panel:
    return timeseries_panel(
        "Throughput per rank",
        "Samples per second each rank trains (rate of gradwatch_samples_total over 1m).",
        "suffix: samples/s",
    ).with_target(promql(f"sum by (rank, node) (rate(gradwatch_samples_total{{{JOB}}}[1m]))", BY_RANK_NODE))


def local_grad_norms() -> timeseries.Panel:
    return timeseries_panel(
        "Local grad norm per rank",
        "Each rank's gradient L2 norm before the all-reduce (gradwatch_local_grad_norm), with the global "
        "all-reduced norm for reference. Their spread feeds the gradient noise scale; one rank far off "
        "points at its data shard.",
        "none",
        log_scale=True,
    ).targets(
        [
            promql(f"max by (rank, node) (gradwatch_local_grad_norm{{{JOB}}})", BY_RANK_NODE, ref_id="A"),
            promql(f"max(gradwatch_grad_norm{{{JOB}}})", "global (all-reduced)", ref_id="B"),
        ]
    )


def straggler_ratio() -> timeseries.Panel:
    mean = mean_step_seconds("1m")
    return (
        timeseries_panel(
            "Straggler ratio",
            "Each rank's mean step time over the job's median rank (1m windows). DDP waits for the slowest "
            "rank, so one rank well above 1 slows every rank.",
            "none",
        )
        .thresholds(thresholds((None, "green"), (1.5, "orange"), (2, "red")))
        .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        .with_target(promql(f"({mean}) / on () group_left () quantile(0.5, {mean})", BY_RANK_NODE))
    )


def heartbeat_age() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Heartbeat age per rank",
            "Seconds since each rank finished its last step (time() - "
            "gradwatch_last_step_timestamp_seconds). "
            "A rank whose line climbs is stuck or hung.",
            "s",
        )
        .thresholds(thresholds((None, "green"), (60, "orange"), (300, "red")))
        .thresholds_style(common_builder.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        .with_target(
            promql(f"time() - max by (rank, node) (gradwatch_last_step_timestamp_seconds{{{JOB}}})", BY_RANK_NODE)
        )
    )


def time_in_step_phase() -> timeseries.Panel:
    return timeseries_panel(
        "Time in the current step phase per rank",
        "Seconds each rank has been in the phase of its step it is in now (gradwatch_rank_stuck_seconds, "
        "from its heartbeat), with its hang threshold (telemetry.hang_after, or 10 median step times) dashed. "
        "A line that climbs past its threshold is a hung rank: TrainingHang names it.",
        "s",
    ).targets(
        [
            promql(f"max by (rank, node) (gradwatch_rank_stuck_seconds{{{JOB}}})", BY_RANK_NODE, ref_id="A"),
            promql(
                f"max by (rank, node) (gradwatch_rank_hang_after_seconds{{{JOB}}})",
                "rank {{rank}} hang threshold",
                ref_id="B",
            ),
        ]
    )


def step_phase_shares() -> timeseries.Panel:
    return timeseries_panel(
        "Where each rank's time goes",
        "Share of wall time each rank spends in each phase of its steps (rate of "
        "gradwatch_step_phase_seconds_total): data loading, forward, backward, the gradient all-reduce, the "
        "optimizer, checkpoints. A straggler spends more in data or compute; the others wait in the all-reduce.",
        "percentunit",
    ).with_target(
        promql(
            f"sum by (rank, node, step_phase) (rate(gradwatch_step_phase_seconds_total{{{JOB}}}[$__rate_interval]))",
            "rank {{rank}} {{step_phase}}",
        )
    )


# Said by each GPU panel (workers/system.py exports the GPU's series only where NVML sees one).
ON_GPU_ONLY = (
    " No data on CPU workers, or where the workers lack the gpu extra (pip install 'gradwatch[gpu]': "
    "nvidia-ml-py, NVML): that is expected, not a fault."
)


def cpu_per_rank() -> timeseries.Panel:
    return timeseries_panel(
        "CPU per rank and its node",
        "CPU cores each rank's worker process keeps busy (rate of gradwatch_process_cpu_seconds_total over 1m), "
        "and the share of its node's CPU time that is busy, 0 to 1 (gradwatch_host_cpu_ratio). A straggler on a "
        "busy node is short of CPU, not slow itself.",
        "suffix: cores",
    ).targets(
        [
            promql(
                f"sum by (rank, node) (rate(gradwatch_process_cpu_seconds_total{{{JOB}}}[1m]))",
                BY_RANK_NODE,
                ref_id="A",
            ),
            promql(f"max by (rank, node) (gradwatch_host_cpu_ratio{{{JOB}}})", "{{node}} busy (0-1)", ref_id="B"),
        ]
    )


def memory_per_rank() -> timeseries.Panel:
    return timeseries_panel(
        "Resident memory per rank",
        "Resident memory of each rank's worker process (gradwatch_process_resident_memory_bytes). One rank far "
        "above the others holds something they do not (rank 0's history, a cache).",
        "bytes",
    ).with_target(promql(f"max by (rank, node) (gradwatch_process_resident_memory_bytes{{{JOB}}})", BY_RANK_NODE))


def gpu_utilization_per_rank() -> timeseries.Panel:
    return (
        timeseries_panel(
            "GPU utilisation per rank",
            "Share of time each rank's GPU was busy (gradwatch_gpu_utilization_ratio, NVML). The rank the others "
            "wait for is busy while they idle in the all-reduce." + ON_GPU_ONLY,
            "percentunit",
        )
        .min(0)
        .max(1)
        .with_target(promql(f"max by (rank, node) (gradwatch_gpu_utilization_ratio{{{JOB}}})", BY_RANK_NODE))
    )


def gpu_memory_per_rank() -> timeseries.Panel:
    return timeseries_panel(
        "GPU memory per rank",
        "GPU memory in use on each rank's device (gradwatch_gpu_memory_used_bytes, NVML)." + ON_GPU_ONLY,
        "bytes",
    ).with_target(promql(f"max by (rank, node) (gradwatch_gpu_memory_used_bytes{{{JOB}}})", BY_RANK_NODE))


def ranks() -> dashboard.Dashboard:
    """The ranks board."""
    return (
        new_dashboard(
            RANKS_UID,
            "gradwatch / Ranks",
            "The DDP ranks of one gradwatch run: speed, stragglers, hangs, CPU, memory and GPU.",
        )
        .with_variable(label_variable("job_id", "Job", "label_values(gradwatch_job_info, job_id)", include_all=False))
        .with_row(dashboard.Row("Step time"))
        .with_panel(step_time_quantiles())
        .with_panel(mean_step_time())
        .with_panel(step_time_heatmap())
        .with_row(dashboard.Row("Stragglers and hangs"))
        .with_panel(straggler_ratio())
        .with_panel(heartbeat_age())
        .with_panel(time_in_step_phase())
        .with_panel(step_phase_shares())
        .with_row(dashboard.Row("Throughput and gradients"))
        .with_panel(throughput_per_rank())
        .with_panel(local_grad_norms())
        .with_row(dashboard.Row("System"))
        .with_panel(cpu_per_rank())
        .with_panel(memory_per_rank())
        .with_panel(gpu_utilization_per_rank())
        .with_panel(gpu_memory_per_rank())
    )
