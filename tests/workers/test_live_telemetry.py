"""A real 2-worker job exports the metrics contract; a real Prometheus scrapes it through file_sd."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.contract import PER_RANK, RANK0_ONLY, samples, value
from tests.promstack import PROMTOOL, query, require, start_prometheus, wait_for
from tests.stack import gradwatch_run

pytestmark = [pytest.mark.ray, pytest.mark.prometheus]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """Run digits-mlp (longer, every-5-step telemetry) with --prometheus-sd-file and a Prometheus on it."""
    tmp = tmp_path_factory.mktemp("live")
    spec = yaml.safe_load((EXAMPLES / "digits-mlp.yaml").read_text())
    spec.update(max_steps=1500, telemetry={"interval": 5, "grace_seconds": 6}, checkpoint={"every_steps": 500})
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    sd_file = tmp / "targets.json"
    sd_file.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "gradwatch-workers",
                "scrape_interval": "1s",
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
            }
        ],
    }
    with start_prometheus(yaml.safe_dump(config), tmp) as prom:
        proc = gradwatch_run(spec_file, tmp / "runs", sd_file)
        try:

            def two_targets():
                groups = json.loads(sd_file.read_text() or "[]")
                return groups if len(groups) == 2 else None

            groups = wait_for(two_targets, timeout=180, interval=0.5, what="both ranks in the file_sd file")
            urls = {g["labels"]["rank"]: f"http://{g['targets'][0]}/metrics" for g in groups}

            def scraped_after_warmup():
                texts = {rank: httpx.get(url, timeout=5).text for rank, url in urls.items()}
                fams = samples(texts["0"])
                ok = (
                    value(fams, "gradwatch_step") >= 100
                    and "gradwatch_gradient_noise_scale" in fams
                    and fams["gradwatch_gradient_noise_scale"]
                    and any(s.labels.get("split") == "val" for s in fams["gradwatch_loss"])
                )
                return texts if ok else None

            texts = wait_for(scraped_after_warmup, timeout=120, interval=0.5, what="step 100 on rank 0")
            in_prometheus = wait_for(
                lambda: len(query(prom.url, "gradwatch_step")) == 2 and query(prom.url, "gradwatch_step"),
                timeout=30,
                what="both ranks scraped",
            )
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        after_end = json.loads(sd_file.read_text())
        yield {
            "texts": texts,
            "prometheus": in_prometheus,
            "result": json.loads(out.strip().splitlines()[-1]),
            "after_end": after_end,
            "tmp": tmp,
        }


def test_both_ranks_export_the_per_rank_contract(live_run):
    for rank, text in live_run["texts"].items():
        fams = samples(text)
        for name in PER_RANK:
            assert name in fams and fams[name], f"rank {rank} lacks {name}"
            assert all(
                s.labels["job_id"] == live_run["result"]["job_id"] and s.labels["rank"] == rank for s in fams[name]
            ), name
        assert math.isfinite(value(fams, "gradwatch_loss", split="train"))
        assert math.isfinite(value(fams, "gradwatch_loss_ema"))
        assert value(fams, "gradwatch_local_grad_norm") > 0
        assert value(fams, "gradwatch_samples", "gradwatch_samples_total") >= 100 * 64
        assert value(fams, "gradwatch_nonfinite", "gradwatch_nonfinite_total", kind="loss") == 0
        assert time.time() - value(fams, "gradwatch_last_step_timestamp_seconds") < 60
        assert value(fams, "gradwatch_step_duration_seconds", "gradwatch_step_duration_seconds_count") >= 100
        for label in ("job", "instance"):
            assert not any(label in s.labels for f in fams.values() for s in f)


def test_rank0_only_series_are_only_on_rank0(live_run):
    rank0, rank1 = samples(live_run["texts"]["0"]), samples(live_run["texts"]["1"])
    for name in RANK0_ONLY:
        assert rank0.get(name), f"rank 0 lacks {name}"
        assert not rank1.get(name), f"rank 1 exports {name}"


def test_values_are_sane(live_run):
    fams = samples(live_run["texts"]["0"])
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


def test_series_count_matches_the_documented_formula(live_run):
    from workers.metrics import series_per_job

    total = sum(len(s) for text in live_run["texts"].values() for s in samples(text).values())
    assert total == series_per_job(world_size=2, layers=3) == 32 * 2 + 28 + 3 * 3


def test_promtool_check_metrics_is_clean_on_a_live_endpoint(live_run):
    promtool = require(PROMTOOL)
    for rank, text in live_run["texts"].items():
        out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (rank, out)


def test_prometheus_scraped_both_ranks_with_job_id(live_run):
    series = live_run["prometheus"]
    assert {s["metric"]["rank"] for s in series} == {"0", "1"}
    assert {s["metric"]["job_id"] for s in series} == {live_run["result"]["job_id"]}


def test_run_json_summary_and_history(live_run):
    result = live_run["result"]
    assert result["state"] == "succeeded" and result["steps"] == 1500 and result["world_size"] == 2
    assert result["val_accuracy"] >= 0.93
    assert {"job_id", "train_loss", "val_loss", "wall_seconds", "run_dir", "phases", "anomalies"} <= set(result)
    assert [p["phase"] for p in result["phases"]][:2] == ["warmup", "rapid_learning"]
    assert result["anomalies"] == [], "a healthy run raised anomalies"
    assert live_run["after_end"] == [], "endpoints of a finished job stay in the file_sd file"
    history = Path(result["run_dir"]) / "history.jsonl"
    records = [json.loads(line) for line in history.read_text().splitlines()]
    measured = [r for r in records if "layer_grad_norm" in r]
    assert len(measured) >= 1500 // 5 and measured[-1]["step"] == 1500
