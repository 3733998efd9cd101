"""System metrics per worker (workers/system.py): CPU, memory, throughput, MFU, and the GPU's through NVML.

No GPU exists on this machine: the GPU path runs against a stand-in for NVML's functions (FakeNVML,
with the pynvml names the sampler calls), which says what a real pynvml would answer."""

from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from gradwatch.spec import SpecError, load_spec
from tests.conftest import small_spec
from tests.contract import SYSTEM, SYSTEM_WHERE_KNOWN, samples
from tests.promstack import PROMTOOL, require
from workers.loop import Trainer
from workers.metrics import WorkerMetrics
from workers.session import LocalSession
from workers.system import SystemSampler


class FakeNVML:
    """A stand-in for pynvml (no GPU here): the calls the sampler makes, answering like one busy GPU."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.asked: list[tuple[str, object]] = []

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(("index", index))
        return f"gpu{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.asked.append(("uuid", uuid))
        return uuid

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=6 * 1024**3, total=80 * 1024**3)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 71

    def nvmlDeviceGetPowerUsage(self, handle):
        return 312_500  # milliwatts


def _value(metrics: WorkerMetrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"job_id": "gw-sys", "rank": "0"})


def test_cpu_memory_and_throughput_are_sampled_and_no_gpu_series_exist_without_one():
    metrics = WorkerMetrics("gw-sys", 0)
    sampler = SystemSampler(metrics, 1.0, flops_per_sample=1e6, peak_flops=1e9)
    sampler.sample()
    busy = time.process_time() + 0.2
    while time.process_time() < busy:  # CPU time for the process counter to see
        pass
    metrics.samples.labels("gw-sys", "0").inc(640)
    row = sampler.sample()
    assert _value(metrics, "gradwatch_process_cpu_seconds_total") >= 0.15
    assert row["process_cpu_cores"] > 0.3
    assert _value(metrics, "gradwatch_process_resident_memory_bytes") > 50 * 1024**2  # torch alone is more
    assert 0.0 <= _value(metrics, "gradwatch_host_cpu_ratio") <= 1.0
    assert row["samples_per_second"] == pytest.approx(_value(metrics, "gradwatch_samples_per_second"))
    assert row["samples_per_second"] > 0
    assert row["mfu_ratio"] == pytest.approx(row["samples_per_second"] * 1e6 / 1e9)
    names = set(samples(generate_latest(metrics.registry).decode()))
    assert not {n for n in names if n.startswith("gradwatch_gpu_")}  # no GPU: its series are absent
    assert "gradwatch_tokens_per_second" not in names  # nothing said its tokens yet
    sampler.tokens_total += 5000
    assert sampler.sample()["tokens_per_second"] > 0
    assert _value(metrics, "gradwatch_tokens_total") == 5000


def test_gpu_series_come_from_nvml_stand_in_and_follow_cuda_visible_devices(monkeypatch):
    nvml = FakeNVML()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    metrics = WorkerMetrics("gw-sys", 0)
    sampler = SystemSampler(metrics, 1.0, gpu_index=1, nvml=nvml)
    assert nvml.asked == [("index", 5)]  # CUDA's device 1 is the node's GPU 5
    row = sampler.sample()
    assert row["gpu_utilization_ratio"] == pytest.approx(0.87)
    assert _value(metrics, "gradwatch_gpu_memory_used_bytes") == 6 * 1024**3
    assert _value(metrics, "gradwatch_gpu_temperature_celsius") == 71
    assert _value(metrics, "gradwatch_gpu_power_watts") == pytest.approx(312.5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    SystemSampler(WorkerMetrics("gw-sys", 0), 1.0, gpu_index=0, nvml=nvml)
    assert nvml.asked[-1] == ("uuid", "GPU-1234")


def test_every_system_series_is_in_the_contract_bounded_and_promtool_clean():
    metrics = WorkerMetrics("gw-sys", 0)
    sampler = SystemSampler(metrics, 1.0, gpu_index=0, nvml=FakeNVML(), flops_per_sample=1.0, peak_flops=1.0)
    sampler.sample()
    sampler.tokens_total = 10
    sampler.sample()
    text = generate_latest(metrics.registry).decode()
    system = {n for n in samples(text) if n in set(SYSTEM) | set(SYSTEM_WHERE_KNOWN)}
    assert system == set(SYSTEM) | set(SYSTEM_WHERE_KNOWN)
    series = sum(len(s) for n, s in samples(text).items() if n in system)
    assert series == 11  # every one at most once per rank: no label beyond job_id and rank
    out = subprocess.run([require(PROMTOOL), "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_the_sampler_thread_runs_at_its_interval_until_stopped(tmp_path):
    sampler = SystemSampler(WorkerMetrics("gw-sys", 0), 0.05, log_path=tmp_path / "system-rank0.jsonl")
    sampler.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len((tmp_path / "system-rank0.jsonl").read_text().splitlines()) < 4:
        time.sleep(0.02)
    sampler.stop()
    rows = [json.loads(line) for line in (tmp_path / "system-rank0.jsonl").read_text().splitlines()]
    assert len(rows) >= 4 and all(r["rss_bytes"] > 0 for r in rows)
    assert sampler._thread is None
    after = len(rows)
    time.sleep(0.2)  # a stopped sampler writes nothing more (not a synchronisation: checks an absence)
    assert len((tmp_path / "system-rank0.jsonl").read_text().splitlines()) == after


def test_a_run_writes_system_rows_with_tokens_for_a_language_model(tmp_path):
    spec = load_spec(
        small_spec(
            scaling={"num_workers": 1},
            model={"name": "char-transformer", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
            data={"name": "text", "block_size": 32, "max_chars": 20000},
            max_steps=60,
            telemetry={"system_interval": 0.1},
        )
    )
    trainer = Trainer(spec, LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    trainer.train()
    trainer.run.close(0)
    rows = [json.loads(line) for line in (tmp_path / "system-rank0.jsonl").read_text().splitlines()]
    assert len(rows) >= 2
    tokens = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    # a window in which no step ended (a busy machine) counts 0 tokens
    assert tokens and all(t >= 0 for t in tokens) and any(t > 0 for t in tokens)
    assert any(r.get("samples_per_second", 0) > 0 for r in rows)
    assert trainer.run.system is None  # closed with the run


def test_a_system_interval_too_short_is_refused_with_the_fix():
    with pytest.raises(SpecError, match="telemetry.system_interval: .*at most every 0.05 s.*or 0 for none"):
        load_spec(small_spec(telemetry={"system_interval": 0.01}))
