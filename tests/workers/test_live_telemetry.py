"""A real 2-worker job exports the metrics contract; a real Prometheus scrapes it through file_sd.

The job is the session's `live_demo` (tests/conftest.py): the demo with every-5-step telemetry, through
`gradwatch run --prometheus-sd-file`; the report tests draw the same run."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.contract import PER_RANK, RANK0_ONLY, samples, value
from tests.promstack import PROMTOOL, require

pytestmark = [pytest.mark.ray, pytest.mark.prometheus]


def test_both_ranks_export_the_per_rank_contract(live_demo):
    for rank, text in live_demo["texts"].items():
        fams = samples(text)
        for name in PER_RANK:
            assert name in fams and fams[name], f"rank {rank} lacks {name}"
            assert all(
                s.labels["job_id"] == live_demo["result"]["job_id"] and s.labels["rank"] == rank for s in fams[name]
            ), name
        assert math.isfinite(value(fams, "gradwatch_loss", split="train"))
        assert math.isfinite(value(fams, "gradwatch_loss_ema"))
        assert value(fams, "gradwatch_local_grad_norm") > 0
        assert value(fams, "gradwatch_samples", "gradwatch_samples_total") >= 100 * 64
        assert value(fams, "gradwatch_nonfinite", "gradwatch_nonfinite_total", kind="loss") == 0
        assert live_demo["scraped_at"] - value(fams, "gradwatch_last_step_timestamp_seconds") < 60
        assert value(fams, "gradwatch_step_duration_seconds", "gradwatch_step_duration_seconds_count") >= 100
        for label in ("job", "instance"):
            assert not any(label in s.labels for f in fams.values() for s in f)


def test_rank0_only_series_are_only_on_rank0(live_demo):
    rank0, rank1 = samples(live_demo["texts"]["0"]), samples(live_demo["texts"]["1"])
    for name in RANK0_ONLY:
        assert rank0.get(name), f"rank 0 lacks {name}"
        assert not rank1.get(name), f"rank 1 exports {name}"


def test_values_are_sane(live_demo):
    fams = samples(live_demo["texts"]["0"])
    assert value(fams, "gradwatch_grad_norm") > 0
    assert value(fams, "gradwatch_weight_norm") > 0
    assert 0 < value(fams, "gradwatch_learning_rate") <= 3e-3
    ratios = [s.value for s in fams["gradwatch_layer_update_ratio"]]
    assert ratios and all(0 < r < 1 for r in ratios)
    layers = {s.labels["layer"] for s in fams["gradwatch_layer_grad_norm"]}
    assert layers == {"net.1", "net.3", "net.5"}
    gns = value(fams, "gradwatch_gradient_noise_scale")
    assert math.isfinite(gns) and gns > 0
    assert value(fams, "gradwatch_global_batch_size") == 128
    phases = {s.labels["phase"]: s.value for s in fams["gradwatch_phase"]}
    assert sum(phases.values()) == 1 and phases["diverging"] == 0
    assert value(fams, "gradwatch_job_info", name="gradwatch_job_info", world_size="2", team="vision") == 1
    assert 0 < value(fams, "gradwatch_accuracy_ratio", split="val") <= 1


def test_series_count_matches_the_documented_formula(live_demo):
    from workers.metrics import series_per_job

    total = sum(len(s) for text in live_demo["texts"].values() for s in samples(text).values())
    assert total == series_per_job(world_size=2, layers=3) == 51 * 2 + 34 + 3 * 3


def test_promtool_check_metrics_is_clean_on_a_live_endpoint(live_demo):
    promtool = require(PROMTOOL)
    for rank, text in live_demo["texts"].items():
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (rank, out)


def test_prometheus_scraped_both_ranks_with_job_id(live_demo):
    series = live_demo["prometheus"]
    assert {s["metric"]["rank"] for s in series} == {"0", "1"}
    assert {s["metric"]["job_id"] for s in series} == {live_demo["result"]["job_id"]}


def test_run_json_summary_and_history(live_demo):
    result = live_demo["result"]
    steps = live_demo["spec"]["max_steps"]
    assert result["state"] == "succeeded" and result["steps"] == steps and result["world_size"] == 2
    assert result["val_accuracy"] >= 0.93
    assert {"job_id", "train_loss", "val_loss", "wall_seconds", "run_dir", "phases", "anomalies"} <= set(result)
    assert [p["phase"] for p in result["phases"]][:2] == ["warmup", "rapid_learning"]
    assert result["anomalies"] == [], "a healthy run raised anomalies"
    assert live_demo["after_end"] == [], "endpoints of a finished job stay in the file_sd file"
    history = Path(result["run_dir"]) / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    measured = [r for r in records if "layer_grad_norm" in r]
    assert len(measured) >= steps // 5 and measured[-1]["step"] == steps
