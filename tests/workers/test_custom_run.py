"""`gradwatch run` runs a spec's own training function on a real 2-worker Ray: telemetry and the guard as
for built-in jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.conftest import EXAMPLES, REPO
from tests.contract import PER_RANK, RANK0_ONLY, samples, value
from tests.promstack import wait_for
from tests.stack import gradwatch_run


@pytest.mark.parametrize(
    ("module", "body", "expected"),
    [
        ("no_such_training_module", None, "run from the folder that holds 'no_such_training_module'"),
        ("needs_a_package", "import no_such_dependency_pkg\n", "it imports 'no_such_dependency_pkg', which is not"),
    ],
)
def test_gradwatch_run_names_an_entrypoint_it_cannot_import_and_how_to_fix_it(tmp_path, module, body, expected):
    """The spec is refused before Ray starts (exit 2): the message names the module and what to do."""
    if body is not None:
        (tmp_path / f"{module}.py").write_text(body + "def train(config):\n    pass\n")
    spec = {"name": "missing", "train": {"entrypoint": f"{module}:train"}, "max_steps": 10}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "service.cli.main", "run", str(spec_file), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert f"train.entrypoint: cannot import module '{module}'" in message and expected in message, message
    assert "Traceback" not in done.stderr


@pytest.mark.ray
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
