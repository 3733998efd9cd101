"""System metrics of one worker, sampled off the step path by a background thread.

Every `telemetry.system_interval` seconds: this process's CPU time and resident memory, the node's CPU
use (Linux's /proc), the rank's samples/s and tokens/s (from the counters the steps already keep), the
MFU when the model's FLOPs per sample and the device's peak are given, and on a GPU its utilisation,
memory, temperature and power through NVML (`pip install 'gradwatch[gpu]'`: nvidia-ml-py, module
`pynvml`; without it, or without a GPU, the GPU series are simply absent). Each sample also goes to
the rank's `system-rank<N>.jsonl` in the run directory, which the report reads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from workers.metrics import SystemSeries, WorkerMetrics

log = logging.getLogger("gradwatch.system")

MIN_INTERVAL_S = 0.05  # a faster sampler would cost the steps more than it tells


def load_nvml() -> Any:
    """The `pynvml` module (nvidia-ml-py), initialised; None when it is not installed or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - pynvml.NVMLError and its kin: no driver, no GPU
        return None
    return pynvml


def gpu_handle(nvml: Any, cuda_index: int) -> Any:
    """NVML's handle of the GPU that CUDA numbers `cuda_index`: NVML counts every GPU of the node, CUDA only
    those in CUDA_VISIBLE_DEVICES (Ray sets it per worker), by number or by UUID."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        if not entry.isdigit():
            return nvml.nvmlDeviceGetHandleByUUID(entry)
        cuda_index = int(entry)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def read_host_cpu() -> tuple[float, float] | None:
    """(busy, total) CPU time of the node since boot, in clock ticks (/proc/stat); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle and iowait
    return sum(fields) - idle, sum(fields)


def read_resident_bytes() -> int | None:
    """This process's resident memory (/proc/self/statm); None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class SystemSampler:
    """The background thread of one worker. `sample()` is one tick; `start()`/`stop()` run it every interval."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        interval: float,
        *,
        gpu_index: int | None = None,
        flops_per_sample: float | None = None,
        peak_flops: float | None = None,
        log_path: Path | None = None,
        nvml: Any = None,
    ):
        if interval < MIN_INTERVAL_S:
            raise ValueError(
                f"telemetry.system_interval {interval} s: sample at most every {MIN_INTERVAL_S} s, or 0 for none"
            )
        self.metrics, self.interval = metrics, interval
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.nvml: Any = nvml if nvml is not None else (load_nvml() if gpu_index is not None else None)
        self.handle = gpu_handle(self.nvml, gpu_index) if self.nvml and gpu_index is not None else None
        self.series = SystemSeries(
            metrics.registry,
            metrics.job_id,
            metrics.rank,
            gpu=self.handle is not None,
            mfu=flops_per_sample is not None and peak_flops is not None,
        )
        self._samples = metrics.samples.labels(metrics.job_id, metrics.rank)
        self.tokens_total = 0  # added to by the step path (Run.tokens): a plain int, read here
        self._log = log_path.open("a") if log_path else None
        self._last: dict[str, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] = {}

    def _counts(self) -> dict[str, float]:
        host = read_host_cpu()
        times = os.times()
        return {
            "time": time.monotonic(),
            "cpu": times.user + times.system,
            "host_busy": host[0] if host else float("nan"),
            "host_total": host[1] if host else float("nan"),
            "samples": self._samples._value.get(),  # the counter's value, without a registry walk
            "tokens": float(self.tokens_total),
        }

    def sample(self) -> dict[str, Any]:
        """One sample: set the gauges, write the row; returns the row."""
        now, last = self._counts(), self._last
        self._last = now
        s = self.series
        row: dict[str, Any] = {"time": time.time()}
        rss = read_resident_bytes()
        if rss is not None:
            s.resident_memory.set(rss)
            row["rss_bytes"] = rss
        if last is not None:
            seconds = max(now["time"] - last["time"], 1e-9)
            s.process_cpu.inc(max(now["cpu"] - last["cpu"], 0.0))
            row["process_cpu_cores"] = (now["cpu"] - last["cpu"]) / seconds
            total = now["host_total"] - last["host_total"]
            if total > 0:
                row["host_cpu_ratio"] = (now["host_busy"] - last["host_busy"]) / total
                s.host_cpu.set(row["host_cpu_ratio"])
            row["samples_per_second"] = (now["samples"] - last["samples"]) / seconds
            s.samples_per_second.set(row["samples_per_second"])
            if self.tokens_total:
                counter, gauge = s.tokens()
                counter.inc(now["tokens"] - last["tokens"])
                row["tokens_per_second"] = (now["tokens"] - last["tokens"]) / seconds
                gauge.set(row["tokens_per_second"])
            if s.mfu is not None and self.flops_per_sample and self.peak_flops:
                row["mfu_ratio"] = row["samples_per_second"] * self.flops_per_sample / self.peak_flops
                s.mfu.set(row["mfu_ratio"])
        if self.handle is not None and s.gpu is not None:
            row.update(self._gpu(s.gpu))
        if self._log is not None:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()
        self.last = row
        return row

    def _gpu(self, gauges: tuple[Any, ...]) -> dict[str, float]:
        nvml, h = self.nvml, self.handle
        try:
            util = nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0
            memory = float(nvml.nvmlDeviceGetMemoryInfo(h).used)
            temperature = float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
            power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
        except Exception as error:  # noqa: BLE001 - a GPU that stops answering must not stop the sampler
            log.warning("NVML read failed: %s", error)
            return {}
        for gauge, value in zip(gauges, (util, memory, temperature, power), strict=True):
            gauge.set(value)
        return {
            "gpu_utilization_ratio": util,
            "gpu_memory_used_bytes": memory,
            "gpu_temperature_celsius": temperature,
            "gpu_power_watts": power,
        }

    def start(self) -> None:
        self.sample()  # the series exist from the start, with the process's memory
        self._thread = threading.Thread(target=self._run, name="gradwatch-system", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as error:  # noqa: BLE001 - system metrics are a side channel, never the run's end
                log.warning("system metrics sample failed: %s", error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(self.interval, 1.0) + 1.0)
            self._thread = None
        if self._log is not None:
            self._log.close()
            self._log = None
