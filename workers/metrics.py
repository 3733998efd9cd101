"""Every `gradwatch_*` metric a worker exports, in one place: the metrics contract of
gradwatch/ARCHITECTURE.md.

Each worker process owns one `WorkerMetrics` (its own CollectorRegistry), so
tests can build several side by side and read them with `get_sample_value`.
Per-rank series carry `job_id` and `rank`; rank-0-only series are registered
on rank 0 alone, so no other rank can ever export them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from gradwatch.names import ANOMALIES, NONFINITE_KINDS, PHASES
from workers.heartbeat import SERIES_PER_RANK as HEARTBEAT_SERIES

# `*_created` series double the counters and histograms for nothing the rules or boards use.
disable_created_metrics()

SYSTEM_CPU_SERIES = 4  # process CPU, host CPU, resident memory, samples/s: every worker's system series
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def series_per_job(world_size: int, layers: int, system: bool = True) -> int:
    """Series one job exports: 51 per rank (47 without system metrics), plus 34 + 3 per layer on rank 0
    (docs/metrics.md: "Cardinality"). On a GPU, with tokens or with MFU, SystemSeries adds at most 7 per rank."""
    per_rank = 14 + len(STEP_BUCKETS) + 3  # 14 plain series, the histogram's buckets, +Inf, sum and count
    per_rank += HEARTBEAT_SERIES  # the heartbeat's step, phase, stuck time, threshold and time per phase
    per_rank += SYSTEM_CPU_SERIES if system else 0
    rank0 = 5 + len(PHASES) + 2 * len(ANOMALIES) + 1  # global gauges, phases, anomalies held and raised, info
    return per_rank * world_size + rank0 + 3 * layers


class WorkerMetrics:
    """One worker's series: its rank's own, and on rank 0 alone the job's (`job`, None elsewhere)."""

    def __init__(self, job_id: str, rank: int, *, rank0: bool | None = None, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.job_id, self.rank = job_id, str(rank)
        self._declare_rank_series()
        self._label_rank_series()
        on_rank0 = rank == 0 if rank0 is None else rank0
        self.job: JobSeries | None = JobSeries(self.registry, job_id) if on_rank0 else None

    @property
    def rank0(self) -> bool:
        """Whether this worker exports the job's series."""
        return self.job is not None

    def _declare_rank_series(self) -> None:
        r, base = self.registry, ["job_id", "rank"]
        self.step = Gauge("gradwatch_step", "Current optimizer step.", base, registry=r)
        self.epoch = Gauge("gradwatch_epoch", "Current epoch (0-based).", base, registry=r)
        self.loss = Gauge(
            "gradwatch_loss",
            "Last loss: train is this rank's batch, val the full evaluation.",
            [*base, "split"],
            registry=r,
        )
        self.loss_ema = Gauge("gradwatch_loss_ema", "Exponential moving average of the train loss.", base, registry=r)
        self.accuracy = Gauge(
            "gradwatch_accuracy_ratio", "Share of correct predictions (0-1).", [*base, "split"], registry=r
        )
        self.local_grad_norm = Gauge(
            "gradwatch_local_grad_norm", "This rank's gradient L2 norm before the all-reduce.", base, registry=r
        )
        self.step_duration = Histogram(
            "gradwatch_step_duration_seconds",
            "Time this rank spent on one optimizer step, not counting its wait for "
            "slower ranks at the gradient all-reduce.",
            base,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.samples = Counter("gradwatch_samples", "Training examples processed by this rank.", base, registry=r)
        self.nonfinite = Counter(
            "gradwatch_nonfinite", "Steps with a non-finite loss or gradient.", [*base, "kind"], registry=r
        )
        self.heartbeat = Gauge(
            "gradwatch_last_step_timestamp_seconds", "Unix time of the last finished step.", base, registry=r
        )
        self.restarts = Counter(
            "gradwatch_restarts", "Times the worker group restarted from a checkpoint.", base, registry=r
        )
        self.rollbacks = Counter(
            "gradwatch_rollbacks", "Rollbacks to the last good checkpoint after divergence.", base, registry=r
        )
        self.skipped_steps = Counter(
            "gradwatch_skipped_steps", "Optimizer steps skipped because the gradient was not finite.", base, registry=r
        )

    def _label_rank_series(self) -> None:
        """Every per-rank series exists from the start, so the rules see it before its first change."""
        self._base = (self.job_id, self.rank)
        for child in (self.step, self.epoch, self.loss_ema, self.local_grad_norm, self.heartbeat):
            child.labels(*self._base)
        for counter in (self.samples, self.restarts, self.rollbacks, self.skipped_steps):
            counter.labels(*self._base)
        self.loss.labels(*self._base, "train")
        for kind in NONFINITE_KINDS:
            self.nonfinite.labels(*self._base, kind)
        self.step_duration.labels(*self._base)

    @property
    def rewinds(self) -> Counter:
        """`gradwatch_rewinds`: registered by runs that may rewind (on_spike or on_divergence: rewind) alone,
        so other runs' series stay as they are."""
        if not hasattr(self, "_rewinds"):
            self._rewinds = Counter(
                "gradwatch_rewinds",
                "Rewinds to the last good checkpoint that skip the batches fed to a loss spike or divergence.",
                ["job_id", "rank"],
                registry=self.registry,
            )
            self._rewinds.labels(self.job_id, self.rank)
        return self._rewinds

    # ---- series named by user code (the training API): a bounded set, each family registered on first use
    def named(self, kind: str, name: str):
        """The gauge of a named loss term (`kind="term"`: `gradwatch_loss_term{term}`) or a custom scalar
        (`kind="scalar"`: `gradwatch_scalar{name}`) on this rank."""
        if not hasattr(self, "_named_families"):
            self._named_families = {
                "term": Gauge(
                    "gradwatch_loss_term",
                    "A named part of the train loss, as the training code reported it (this rank's batch).",
                    ["job_id", "rank", "term"],
                    registry=self.registry,
                ),
                "scalar": Gauge(
                    "gradwatch_scalar",
                    "A custom scalar the training code reported.",
                    ["job_id", "rank", "name"],
                    registry=self.registry,
                ),
            }
        return self._named_families[kind].labels(self.job_id, self.rank, name)


class JobSeries:
    """The series rank 0 alone exports: values identical on every rank after the all-reduce, the
    detectors' phase and anomalies, and what the job is."""

    def __init__(self, registry: CollectorRegistry, job_id: str):
        self.job_id, r, job = job_id, registry, ["job_id"]
        self.grad_norm = Gauge(
            "gradwatch_grad_norm", "Global gradient L2 norm after the all-reduce, before clipping.", job, registry=r
        )
        self.weight_norm = Gauge("gradwatch_weight_norm", "Global L2 norm of the weights.", job, registry=r)
        self.learning_rate = Gauge("gradwatch_learning_rate", "Learning rate of the last step.", job, registry=r)
        self.layer_grad_norm = Gauge(
            "gradwatch_layer_grad_norm", "Gradient L2 norm per layer.", [*job, "layer"], registry=r
        )
        self.layer_weight_norm = Gauge(
            "gradwatch_layer_weight_norm", "Weight L2 norm per layer.", [*job, "layer"], registry=r
        )
        self.layer_update_ratio = Gauge(
            "gradwatch_layer_update_ratio",
            "||delta w|| / ||w|| of the last step, per layer.",
            [*job, "layer"],
            registry=r,
        )
        self.noise_scale = Gauge(
            "gradwatch_gradient_noise_scale",
            "Simple gradient noise scale B_simple (McCandlish et al. 2018), in examples.",
            job,
            registry=r,
        )
        self.global_batch = Gauge(
            "gradwatch_global_batch_size", "Examples per optimizer step, all ranks.", job, registry=r
        )
        self.phase = Gauge(
            "gradwatch_phase", "1 for the current training phase, 0 for the others.", [*job, "phase"], registry=r
        )
        self.anomaly = Gauge("gradwatch_anomaly", "1 while an online detector holds.", [*job, "kind"], registry=r)
        self.anomaly_raised = Counter(
            "gradwatch_anomaly_raised",
            "Times an online detector raised its anomaly (alerts use increase(): a "
            "spike that clears between two scrapes still counts).",
            [*job, "kind"],
            registry=r,
        )
        self.job_info = Gauge(
            "gradwatch_job_info",
            "Constant 1, labelled with what the job is.",
            ["job_id", "name", "owner", "model", "world_size", "team", "project"],
            registry=r,
        )
        for gauge in (self.grad_norm, self.weight_norm, self.learning_rate, self.global_batch):
            gauge.labels(job_id)
        self.set_phase("warmup")
        self.set_anomalies({})
        for kind in ANOMALIES:
            self.anomaly_raised.labels(job_id, kind)

    def set_info(self, name: str, owner: str, model: str, world_size: int, labels: dict[str, str]) -> None:
        self.job_info.labels(
            self.job_id, name, owner, model, str(world_size), labels.get("team", ""), labels.get("project", "")
        ).set(1)

    def set_phase(self, current: str) -> None:
        for name in PHASES:
            self.phase.labels(self.job_id, name).set(1 if name == current else 0)

    def set_anomalies(self, held: dict[str, bool]) -> None:
        for kind in ANOMALIES:
            self.anomaly.labels(self.job_id, kind).set(1 if held.get(kind) else 0)


class SystemSeries:
    """One worker's system metrics (workers/system.py samples them off the step path), per rank: CPU and
    memory always; throughput in tokens, MFU and the GPU's only where they exist (a GPU, a batch that says
    its tokens, a known FLOPs per sample): at most 11 series per rank."""

    def __init__(self, registry: CollectorRegistry, job_id: str, rank: str, *, gpu: bool, mfu: bool):
        r, base, labels = registry, ["job_id", "rank"], (job_id, rank)
        self.process_cpu = Counter(
            "gradwatch_process_cpu_seconds", "CPU time of this worker's process, all its threads.", base, registry=r
        ).labels(*labels)
        self.host_cpu = Gauge(
            "gradwatch_host_cpu_ratio",
            "Share of the node's CPU time busy (0-1), over the last sample.",
            base,
            registry=r,
        ).labels(*labels)
        self.resident_memory = Gauge(
            "gradwatch_process_resident_memory_bytes", "Resident memory of this worker's process.", base, registry=r
        ).labels(*labels)
        self.samples_per_second = Gauge(
            "gradwatch_samples_per_second",
            "Training examples this rank processed per second, over the last sample.",
            base,
            registry=r,
        ).labels(*labels)
        self._registry, self._labels = r, labels
        self._tokens: tuple[Counter, Gauge] | None = None
        self.mfu = (
            Gauge(
                "gradwatch_model_flops_utilization_ratio",
                "Model FLOPs utilisation (0-1): samples/s x telemetry.flops_per_sample / telemetry.peak_flops.",
                base,
                registry=r,
            ).labels(*labels)
            if mfu
            else None
        )
        self.gpu: tuple[Gauge, ...] | None = None  # utilisation, memory used, temperature, power
        if gpu:
            families = (
                Gauge(
                    "gradwatch_gpu_utilization_ratio", "Share of time the GPU was busy (0-1), NVML.", base, registry=r
                ),
                Gauge("gradwatch_gpu_memory_used_bytes", "GPU memory in use on the device, NVML.", base, registry=r),
                Gauge("gradwatch_gpu_temperature_celsius", "GPU temperature, NVML.", base, registry=r),
                Gauge("gradwatch_gpu_power_watts", "GPU power draw, NVML.", base, registry=r),
            )
            self.gpu = tuple(g.labels(*labels) for g in families)

    def tokens(self) -> tuple[Counter, Gauge]:
        """`gradwatch_tokens` and `gradwatch_tokens_per_second`: registered once a batch says its tokens."""
        if self._tokens is None:
            base = ["job_id", "rank"]
            self._tokens = (
                Counter("gradwatch_tokens", "Tokens this rank trained on.", base, registry=self._registry).labels(
                    *self._labels
                ),
                Gauge(
                    "gradwatch_tokens_per_second",
                    "Tokens this rank trained on per second, over the last sample.",
                    base,
                    registry=self._registry,
                ).labels(*self._labels),
            )
        return self._tokens
