"""`gradwatch run` runs a spec's own training function on a real 2-worker Ray: telemetry and the guard as
for built-in jobs."""

from __future__ import annotations

import json

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.contract import PER_RANK, RANK0_ONLY, samples, value
from tests.promstack import wait_for
from tests.stack import gradwatch_run

pytestmark = pytest.mark.ray


def test_gradwatch_run_runs_the_custom_example_and_skips_a_nan_on_both_ranks(tmp_path):
    spec = yaml.safe_load((EXAMPLES / "custom" / "autoencoder.yaml").read_text())
    spec["train"]["config"].update(nan_at_step=7, rank1_step_delay=0.005)
    spec.update(max_steps=600, telemetry={"interval": 5, "grace_seconds": 3}, validation={"every_steps": 100})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    sd_file = tmp_path / "targets.json"
    proc = gradwatch_run(spec_file, tmp_path / "runs", sd_file)
    try:

        def both_ranks_past_validation():
            groups = json.loads(sd_file.read_text()) if sd_file.exists() else []
            if len(groups) != 2:
                return None
            texts = {
                g["labels"]["rank"]: httpx.get(f"http://{g['targets'][0]}/metrics", timeout=5).text for g in groups
            }
            fams = {rank: samples(text) for rank, text in texts.items()}
            ok = all(value(f, "gradwatch_step") >= 100 for f in fams.values())
            return fams if ok else None

        fams = wait_for(both_ranks_past_validation, timeout=240, interval=0.5, what="both ranks past step 100")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    for rank in ("0", "1"):
        assert all(fams[rank].get(name) for name in PER_RANK), rank
        assert {s.labels["term"] for s in fams[rank]["gradwatch_loss_term"]} == {"reconstruction", "regularisation"}
    assert all(fams["0"].get(n) and not fams["1"].get(n) for n in RANK0_ONLY if n != "gradwatch_gradient_noise_scale")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["state"] == "succeeded" and result["steps"] == 600 and result["world_size"] == 2
    ranks = result["ranks"]
    assert ranks[0]["param_hash"] == ranks[1]["param_hash"], "the replicas drifted apart"
    assert [r["skipped_steps"] for r in ranks] == [1, 1] and all(r["params_finite"] for r in ranks)
    assert result["val_loss"] < result["first_val_loss"]
    history = [json.loads(line) for line in (tmp_path / "runs" / result["job_id"] / "history.jsonl").open()]
    assert any(r.get("nonfinite") and r["step"] == 7 for r in history)
