"""Run board: how one training run moves (loss, gradients, weights, phase, anomalies) and what its workers use
(CPU, memory, throughput, MFU, GPU)."""

from grafana_foundation_sdk.builders import dashboard, stat, statetimeline, timeseries
from grafana_foundation_sdk.models import common

from dashboards.style import (
    BY_RANK,
    PHASE_COLORS,
    RUN_UID,
    Built,
    PrometheusAnnotation,
    alert_list_panel,
    label_variable,
    new_dashboard,
    promql,
    stat_panel,
    thresholds,
    timeline_panel,
    timeseries_panel,
)

JOB = 'job_id="$job_id"'

ANOMALY_COLORS = {
    "loss_spike": "orange",
    "divergence": "red",
    "plateau": "yellow",
    "overfitting": "purple",
    "vanishing_gradients": "blue",
    "exploding_gradients": "dark-red",
}


def run_info() -> stat.Panel:
    return (
        stat_panel(
            "Run",
            "What this run is: its name, model, world size and owner (gradwatch_job_info).",
            "none",
            width=12,
        )
        .text_mode(common.BigValueTextMode.NAME)
        .with_target(
            promql(
                f"max by (name, model, world_size, owner) (gradwatch_job_info{{{JOB}}})",
                "{{name}} · {{model}} · {{world_size}} workers · {{owner}}",
                instant=True,
            )
        )
    )


def step_and_epoch() -> stat.Panel:
    return stat_panel("Step and epoch", "Current optimizer step and epoch (most advanced rank).", "none").targets(
        [
            promql(f"max(gradwatch_step{{{JOB}}})", "step", instant=True, ref_id="A"),
            promql(f"max(gradwatch_epoch{{{JOB}}})", "epoch", instant=True, ref_id="B"),
        ]
    )


def restarts() -> stat.Panel:
    return (
        stat_panel(
            "Restarts and recoveries",
            "Times Ray Train restarted the worker group from a checkpoint (gradwatch_restarts_total), "
            "rollbacks "
            "to the last good checkpoint after divergence (gradwatch_rollbacks_total) and optimizer steps "
            "skipped for a non-finite gradient (gradwatch_skipped_steps_total).",
            "none",
        )
        .thresholds(thresholds((None, "green"), (1, "orange")))
        .targets(
            [
                promql(f"max(gradwatch_restarts_total{{{JOB}}})", "restarts", instant=True, ref_id="A"),
                promql(f"max(gradwatch_rollbacks_total{{{JOB}}})", "rollbacks", instant=True, ref_id="B"),
                promql(f"max(gradwatch_skipped_steps_total{{{JOB}}})", "skipped steps", instant=True, ref_id="C"),
            ]
        )
    )


def stuck_rank() -> stat.Panel:
    return (
        stat_panel(
            "Longest time in one step phase",
            "The most seconds any rank has spent in the phase of its step it is in now "
            "(gradwatch_rank_stuck_seconds, from the heartbeats), next to the lowest hang threshold of the "
            "ranks (telemetry.hang_after, or 10 median step times). Above it, TrainingHang fires and the "
            "job's hang event names the rank; the ranks board shows each rank.",
            "s",
        )
        .thresholds(thresholds((None, "green"), (60, "red")))
        .targets(
            [
                promql(f"max(gradwatch_rank_stuck_seconds{{{JOB}}})", "in one phase", instant=True, ref_id="A"),
                promql(f"min(gradwatch_rank_hang_after_seconds{{{JOB}}})", "hang after", instant=True, ref_id="B"),
            ]
        )
    )


def loss() -> timeseries.Panel:
    return timeseries_panel(
        "Train and val loss",
        "Last batch loss by split, averaged over ranks (gradwatch_loss), and the smoothed train loss the "
        "detectors and alert rules use (gradwatch_loss_ema).",
        "none",
    ).targets(
        [
            promql(f"avg by (split) (gradwatch_loss{{{JOB}}})", "{{split}} loss", ref_id="A"),
            promql(f"avg(gradwatch_loss_ema{{{JOB}}})", "train loss (EMA)", ref_id="B"),
        ]
    )


def accuracy() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Accuracy",
            "Accuracy by split, averaged over ranks (gradwatch_accuracy_ratio); empty for tasks without accuracy.",
            "percentunit",
        )
        .min(0)
        .max(1)
        .with_target(promql(f"avg by (split) (gradwatch_accuracy_ratio{{{JOB}}})", "{{split}}"))
    )


def learning_rate() -> timeseries.Panel:
    return timeseries_panel(
        "Learning rate",
        "Learning rate the scheduler set for the last step (gradwatch_learning_rate).",
        "none",
        width=8,
    ).with_target(promql(f"max(gradwatch_learning_rate{{{JOB}}})", "learning rate"))


def grad_norm() -> timeseries.Panel:
    return timeseries_panel(
        "Global grad norm",
        "L2 norm of the gradient after DDP's all-reduce (gradwatch_grad_norm). Log scale: spikes and slow "
        "decay both show.",
        "none",
        width=8,
        log_scale=True,
    ).with_target(promql(f"max(gradwatch_grad_norm{{{JOB}}})", "grad norm"))


def weight_norm() -> timeseries.Panel:
    return timeseries_panel(
        "Weight norm", "L2 norm of all parameters (gradwatch_weight_norm).", "none", width=8
    ).with_target(promql(f"max(gradwatch_weight_norm{{{JOB}}})", "weight norm"))


def noise_scale() -> timeseries.Panel:
    return timeseries_panel(
        "Gradient noise scale vs global batch size",
        "Simple gradient noise scale B_simple (McCandlish et al. 2018), estimated from local vs all-reduced "
        "gradient norms (gradwatch_gradient_noise_scale). A global batch far below it wastes steps; far "
        "above "
        "it wastes samples.",
        "short",
        log_scale=True,
    ).targets(
        [
            promql(f"max(gradwatch_gradient_noise_scale{{{JOB}}})", "noise scale (B_simple)", ref_id="A"),
            promql(f"max(gradwatch_global_batch_size{{{JOB}}})", "global batch size", ref_id="B"),
        ]
    )


def nonfinite() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Non-finite losses and gradients",
            "Steps with a NaN or infinite loss or gradient, summed over ranks since the workers last started "
            "(gradwatch_nonfinite_total). Anything above zero is worth a look.",
            "none",
        )
        .thresholds(thresholds((None, "green"), (1, "red")))
        .with_target(promql(f"sum by (kind) (gradwatch_nonfinite_total{{{JOB}}})", "{{kind}}"))
    )


def layer_grad_norm() -> timeseries.Panel:
    return timeseries_panel(
        "Per-layer grad norm",
        "Gradient L2 norm of each layer (gradwatch_layer_grad_norm). Early layers near zero: vanishing "
        "gradients; one layer far above the rest: where an explosion starts.",
        "none",
        log_scale=True,
    ).with_target(promql(f"max by (layer) (gradwatch_layer_grad_norm{{{JOB}}})", "{{layer}}"))


def layer_update_ratio() -> timeseries.Panel:
    return timeseries_panel(
        "Per-layer update ratio",
        "||Δw|| / ||w|| of each layer's last step (gradwatch_layer_update_ratio). Around 1e-3 is the usual "
        "healthy range; far below a layer is not learning, far above it is unstable.",
        "none",
        log_scale=True,
    ).with_target(promql(f"max by (layer) (gradwatch_layer_update_ratio{{{JOB}}})", "{{layer}}"))


def phase() -> statetimeline.Panel:
    return timeline_panel(
        "Phase",
        "Training phase the phase detector assigns over time (gradwatch_phase{phase} is 1 for the current one).",
        states=PHASE_COLORS,
        height=6,
    ).with_target(promql(f"max by (phase) (gradwatch_phase{{{JOB}}})", "{{phase}}"))


def anomalies() -> statetimeline.Panel:
    return timeline_panel(
        "Anomalies",
        "When an online detector held an anomaly (gradwatch_anomaly{kind} is 1 while it holds).",
        states=ANOMALY_COLORS,
        height=7,
    ).with_target(promql(f"max by (kind) (gradwatch_anomaly{{{JOB}}})", "{{kind}}"))


# Said by each panel of a series that exists only where it is known (workers/system.py).
ON_GPU_ONLY = (
    " No data on CPU workers, or where the workers lack the gpu extra (pip install 'gradwatch[gpu]': "
    "nvidia-ml-py, NVML): that is expected, not a fault."
)


def process_cpu() -> timeseries.Panel:
    return timeseries_panel(
        "CPU per rank",
        "CPU cores each rank's worker process keeps busy, all its threads (rate of "
        "gradwatch_process_cpu_seconds_total over 1m). A data-bound rank on CPU sits near its cpus_per_worker.",
        "suffix: cores",
        width=8,
    ).with_target(promql(f"sum by (rank) (rate(gradwatch_process_cpu_seconds_total{{{JOB}}}[1m]))", BY_RANK))


def host_cpu() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Node CPU busy",
            "Share of each rank's node's CPU time that was busy over the last sample (gradwatch_host_cpu_ratio, "
            "from /proc/stat, every telemetry.system_interval s). A node near 1 starves its ranks' data loaders.",
            "percentunit",
            width=8,
        )
        .min(0)
        .max(1)
        .with_target(promql(f"max by (rank) (gradwatch_host_cpu_ratio{{{JOB}}})", BY_RANK))
    )


def resident_memory() -> timeseries.Panel:
    return timeseries_panel(
        "Resident memory per rank",
        "Resident memory of each rank's worker process (gradwatch_process_resident_memory_bytes). A line that "
        "only climbs is a leak (tensors kept across steps, a growing cache).",
        "bytes",
        width=8,
    ).with_target(promql(f"max by (rank) (gradwatch_process_resident_memory_bytes{{{JOB}}})", BY_RANK))


def samples_per_second() -> timeseries.Panel:
    return timeseries_panel(
        "Samples/s per rank",
        "Training examples each rank processed per second over the last sample (gradwatch_samples_per_second), "
        "and all ranks together.",
        "suffix: samples/s",
        width=8,
    ).targets(
        [
            promql(f"max by (rank) (gradwatch_samples_per_second{{{JOB}}})", BY_RANK, ref_id="A"),
            promql(f"sum(gradwatch_samples_per_second{{{JOB}}})", "all ranks", ref_id="B"),
        ]
    )


def tokens_per_second() -> timeseries.Panel:
    return timeseries_panel(
        "Tokens/s per rank",
        "Tokens each rank trained on per second over the last sample (gradwatch_tokens_per_second), and all "
        "ranks together. No data for runs whose batches do not say their tokens: the built-in loop's language "
        "models do, a user's loop by calling run.tokens(n).",
        "suffix: tokens/s",
        width=8,
    ).targets(
        [
            promql(f"max by (rank) (gradwatch_tokens_per_second{{{JOB}}})", BY_RANK, ref_id="A"),
            promql(f"sum(gradwatch_tokens_per_second{{{JOB}}})", "all ranks", ref_id="B"),
        ]
    )


def mfu() -> timeseries.Panel:
    return (
        timeseries_panel(
            "MFU per rank",
            "Model FLOPs utilisation of each rank (gradwatch_model_flops_utilization_ratio): samples/s x "
            "telemetry.flops_per_sample / telemetry.peak_flops. No data unless the spec gives both.",
            "percentunit",
            width=8,
        )
        .min(0)
        .with_target(promql(f"max by (rank) (gradwatch_model_flops_utilization_ratio{{{JOB}}})", BY_RANK))
    )


def gpu_utilization() -> timeseries.Panel:
    return (
        timeseries_panel(
            "GPU utilisation per rank",
            "Share of the last sample period the rank's GPU was busy (gradwatch_gpu_utilization_ratio, NVML). "
            "Low while the others are high: that rank waits for data or for the all-reduce." + ON_GPU_ONLY,
            "percentunit",
            width=6,
        )
        .min(0)
        .max(1)
        .with_target(promql(f"max by (rank) (gradwatch_gpu_utilization_ratio{{{JOB}}})", BY_RANK))
    )


def gpu_memory() -> timeseries.Panel:
    return timeseries_panel(
        "GPU memory per rank",
        "GPU memory in use on each rank's device (gradwatch_gpu_memory_used_bytes, NVML), every process on it."
        + ON_GPU_ONLY,
        "bytes",
        width=6,
    ).with_target(promql(f"max by (rank) (gradwatch_gpu_memory_used_bytes{{{JOB}}})", BY_RANK))


def gpu_temperature() -> timeseries.Panel:
    return timeseries_panel(
        "GPU temperature per rank",
        "Temperature of each rank's GPU (gradwatch_gpu_temperature_celsius, NVML). A hot GPU throttles its "
        "clock and turns its rank into a straggler." + ON_GPU_ONLY,
        "celsius",
        width=6,
    ).with_target(promql(f"max by (rank) (gradwatch_gpu_temperature_celsius{{{JOB}}})", BY_RANK))


def gpu_power() -> timeseries.Panel:
    return timeseries_panel(
        "GPU power per rank",
        "Power draw of each rank's GPU (gradwatch_gpu_power_watts, NVML)." + ON_GPU_ONLY,
        "watt",
        width=6,
    ).with_target(promql(f"max by (rank) (gradwatch_gpu_power_watts{{{JOB}}})", BY_RANK))


def alert_list() -> dashboard.Panel:
    return alert_list_panel(
        "Alerts for this run",
        "Firing and pending alerts from gradwatch's Prometheus rules whose job_id is this run.",
        max_items=20,
        height=6,
        label_filter="{" + JOB + "}",
    )


def alert_annotations() -> PrometheusAnnotation:
    return PrometheusAnnotation(
        "Alerts",
        f'ALERTS{{{JOB}, alertstate="firing"}}',
        title_format="{{alertname}}",
        text_format="{{severity}}",
        tag_keys="alertname,severity",
        color="red",
    )


def run() -> dashboard.Dashboard:
    """The run board."""
    return (
        new_dashboard(
            RUN_UID,
            "gradwatch / Run",
            "One gradwatch training run: loss, gradients, phase, anomalies, and what its workers use.",
        )
        .with_variable(label_variable("job_id", "Job", "label_values(gradwatch_job_info, job_id)", include_all=False))
        .annotation(Built(alert_annotations()))
        .with_row(dashboard.Row("Run"))
        .with_panel(run_info())
        .with_panel(step_and_epoch())
        .with_panel(restarts())
        .with_panel(stuck_rank())
        .with_row(dashboard.Row("Loss"))
        .with_panel(loss())
        .with_panel(accuracy())
        .with_row(dashboard.Row("Optimizer"))
        .with_panel(learning_rate())
        .with_panel(grad_norm())
        .with_panel(weight_norm())
        .with_panel(noise_scale())
        .with_panel(nonfinite())
        .with_row(dashboard.Row("Layers"))
        .with_panel(layer_grad_norm())
        .with_panel(layer_update_ratio())
        .with_row(dashboard.Row("Phase, anomalies and alerts"))
        .with_panel(phase())
        .with_panel(anomalies())
        .with_panel(alert_list())
        .with_row(dashboard.Row("System per rank"))
        .with_panel(process_cpu())
        .with_panel(host_cpu())
        .with_panel(resident_memory())
        .with_panel(samples_per_second())
        .with_panel(tokens_per_second())
        .with_panel(mfu())
        .with_panel(gpu_utilization())
        .with_panel(gpu_memory())
        .with_panel(gpu_temperature())
        .with_panel(gpu_power())
    )
