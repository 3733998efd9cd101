"""The framework examples as a user runs them: `python examples/...py` in a process of its own, scraped by a
real Prometheus (file_sd, as `gradwatch up` finds endpoints), its run directory read by the report and
the replay, each report drawn in Chromium; 2-rank DDP runs of both frameworks under torchrun with a NaN on one rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradwatch.status import read_result, read_status
from tests.conftest import EXAMPLES, REPO
from tests.promstack import free_port, query, start_prometheus, wait_for
from tests.service.test_report import assert_every_chart_drew, browser, open_report

pytest.importorskip("transformers")
pytest.importorskip("lightning")

__all__ = ["browser"]  # the Chromium fixture, shared with tests/service/test_report.py

HERE = Path(__file__).resolve().parent


def _prometheus_config(sd_dir: Path) -> str:
    return f"""
global:
  scrape_interval: 500ms
  scrape_timeout: 400ms
scrape_configs:
  - job_name: gradwatch
    honor_labels: true
    file_sd_configs:
      - files: ["{sd_dir}/*.json"]
        refresh_interval: 1s
"""


def _value(url: str, promql: str) -> float | None:
    found = query(url, promql)
    return float(found[0]["value"][1]) if found else None


STEPS = 400
# An example end to end (its start, STEPS steps, its scrape grace): about 70 s alone on 2 cores, twice that
# with the rest of the suite beside it; the limit leaves room for a loaded machine.
EXAMPLE_TIMEOUT_S = 300


@dataclass
class ExampleRun:
    """One example's process as a user runs it, what Prometheus scraped from it, and its run directory."""

    job_id: str
    run_dir: Path
    sd_dir: Path
    stderr: str
    last_step: float | None
    layers: list[dict]
    epoch: float | None


@pytest.fixture(scope="module", params=["hf_trainer.py", "lightning_fit.py"])
def example_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ExampleRun:
    """Each example run once for the module: the scrape test and the Chromium test share its run directory."""
    example = request.param
    tmp_path = tmp_path_factory.mktemp(Path(example).stem)
    job_id = f"example-{Path(example).stem.replace('_', '-')}"
    sd_dir, storage = tmp_path / "sd", tmp_path / "runs"
    sd_dir.mkdir()
    with start_prometheus(_prometheus_config(sd_dir), tmp_path) as prom:
        command = [sys.executable, str(EXAMPLES / example), "--steps", str(STEPS), "--job-id", job_id]
        command += ["--prometheus-sd-dir", str(sd_dir), "--grace-seconds", "30"]
        env = {**os.environ, "GRADWATCH_STORAGE_PATH": str(storage), "PYTHONPATH": str(REPO)}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-4000:]
        # The grace period after the last step let Prometheus scrape the final values.
        last = f'max_over_time(gradwatch_step{{job_id="{job_id}",rank="0"}}[10m])'
        wait_for(lambda: _value(prom.url, last) == STEPS, timeout=15, what=f"{last} == {STEPS}")
        return ExampleRun(
            job_id=job_id,
            run_dir=storage / job_id,
            sd_dir=sd_dir,
            stderr=done.stderr,
            last_step=_value(prom.url, last),
            layers=query(prom.url, f'last_over_time(gradwatch_layer_grad_norm{{job_id="{job_id}"}}[10m])'),
            epoch=_value(prom.url, f'max_over_time(gradwatch_epoch{{job_id="{job_id}"}}[10m])'),
        )


@pytest.mark.prometheus
def test_an_example_is_scraped_and_leaves_a_run_directory_for_report_and_replay(example_run: ExampleRun) -> None:
    from service.report.report import load_run, render_report
    from workers.replay import replay_file

    job_id, run_dir, steps = example_run.job_id, example_run.run_dir, STEPS
    lines = [line for line in example_run.stderr.splitlines() if line.startswith(f"gradwatch: job {job_id} ")]
    assert len(lines) == 1 and "metrics http://127.0.0.1:" in lines[0] and str(run_dir) in lines[0], lines
    assert example_run.last_step == steps
    layers = example_run.layers
    assert len(layers) >= 2 and all(float(s["value"][1]) > 0 for s in layers), layers
    # the framework's epoch: both examples run past their first
    assert example_run.epoch is not None and example_run.epoch >= 1

    result, status = read_result(run_dir), read_status(run_dir)
    assert result is not None and result.state == "succeeded" and result.steps == steps, result
    assert status is not None and status.state == "succeeded" and status.step == steps
    assert result.val_loss is not None and result.first_val_loss is not None and result.val_loss < result.first_val_loss
    assert not list(example_run.sd_dir.glob("*.json"))  # the endpoint's file_sd entry went with the endpoint
    assert (run_dir / "steps-rank0.jsonl").stat().st_size > 0
    assert replay_file(run_dir / "history.jsonl").steps == steps
    page = render_report(load_run(run_dir))
    assert job_id in page and "<html" in page.lower()


# What each example's header names: the Trainer's AdamW with its linear warm-up (a LambdaLR), the module's Adam.
OPTIMIZERS = {"example-hf-trainer": "AdamW lr 0.003, LambdaLR schedule", "example-lightning-fit": "Adam lr 0.01"}

# What a one-process callback run draws: no noise scale (one rank has no second gradient to compare).
CALLBACK_CHARTS = {"loss", "lr", "norms", "layer-grad", "update-ratio", "step-time"}


@pytest.mark.prometheus
def test_an_example_report_draws_every_chart_in_chromium(example_run: ExampleRun, browser, tmp_path: Path) -> None:
    """The example's run directory rendered and opened in headless Chromium: every chart has drawn data
    (a line, points or the heatmap's image), offline, with no error in the page."""
    from service.report.report import load_run, render_report

    path = tmp_path / "report.html"
    path.write_text(render_report(load_run(example_run.run_dir)))
    page, problems, requests = open_report(browser, path)
    assert problems == []
    assert requests == [path.resolve().as_uri()], "the page must not fetch anything"
    charts = assert_every_chart_drew(page, CALLBACK_CHARTS)
    assert any(c["id"].startswith("val-") or c["id"] == "loss" for c in charts)
    header = page.inner_text("header")
    assert example_run.job_id in header and "succeeded" in header
    # the optimizer (and schedule) the training code made, recorded by run.watch() in optimizer.json
    assert OPTIMIZERS[example_run.job_id] in header, header
    page.close()


def _torchrun_with_a_nan_on_rank_1(tmp_path: Path, script: str, job_id: str, steps: int, timeout: float) -> Path:
    """Run `script` on 2 ranks under torchrun (rank 1 alone gets a NaN gradient at step 5) and check what both
    ranks saw: the update skipped on both, the replicas equal afterwards, both ranks in one run directory."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(free_port()), str(HERE / script), str(out), job_id, str(steps)]
    env = {**os.environ, "GRADWATCH_STORAGE_PATH": str(runs), "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["step"] == steps and rank["finite"], ranks
        assert rank["unchanged"] and rank["skipped"] == 1, ranks  # the NaN step was skipped on both ranks
    assert ranks[0]["hash"] == ranks[1]["hash"]  # the replicas are equal afterwards
    assert [p.name for p in runs.iterdir()] == [job_id]  # one run directory for both ranks
    result = read_result(runs / job_id)
    assert result is not None and result.state == "succeeded" and result.world_size == 2
    assert [(r.rank, r.steps, r.skipped_steps) for r in result.ranks] == [(0, steps, 1), (1, steps, 1)]
    assert result.ranks[0].param_hash is not None and result.ranks[0].param_hash == result.ranks[1].param_hash
    assert (runs / job_id / "steps-rank1.jsonl").exists()
    return runs / job_id


def test_lightning_ddp_under_torchrun_skips_a_nan_on_one_rank_on_both(tmp_path: Path) -> None:
    """torchrun starts both ranks, Lightning makes the gloo group, no Ray: rank 1 alone gets a NaN gradient
    at step 5, the guard's decision (all-reduced) skips that update on both ranks, and the replicas stay equal."""
    _torchrun_with_a_nan_on_rank_1(tmp_path, "lightning_ddp_nan.py", "ddp-nan", steps=20, timeout=90)


def test_the_hf_trainer_under_torchrun_skips_a_nan_on_one_rank_on_both(tmp_path: Path) -> None:
    """examples/hf_trainer.py's Trainer on 2 CPU ranks under torchrun (gloo), no Ray: rank 1 alone gets a NaN
    gradient at step 5; the guard's decision (all-reduced) drops that update's gradients on both ranks, as
    docs/training-api.md says of the transformers callback; both ranks' metrics land in one run directory."""
    run_dir = _torchrun_with_a_nan_on_rank_1(tmp_path, "hf_ddp_nan.py", "hf-ddp-nan", steps=20, timeout=120)
    for r in range(2):
        records = [json.loads(line) for line in (run_dir / f"steps-rank{r}.jsonl").open()]
        assert records and max(rec["step"] for rec in records) == 20, records[-3:]


@pytest.mark.ray
def test_the_lightning_callback_inside_a_gradwatch_job_feeds_the_job_and_skips_a_nan_on_both_ranks(
    tmp_path: Path,
) -> None:
    """`train.entrypoint` on a real 2-worker Ray Train: the callback joins the job's run (its id, spec,
    board and run directory) instead of making one, and the job's driver writes the result."""
    import yaml

    from tests.stack import gradwatch_run, run_to_end

    spec = {
        "name": "lightning-in-a-job",
        "train": {
            "entrypoint": "tests.integrations.job_code:train_lightning",
            "config": {"steps": 30, "nan_at_step": 5},
        },
        "max_steps": 30,
        "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "telemetry": {"interval": 5, "grace_seconds": 0},
    }
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    proc = gradwatch_run(spec_file, tmp_path / "runs")
    out, err = run_to_end(proc, timeout=240)
    assert proc.returncode == 0, err[-4000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["state"] == "succeeded" and result["steps"] == 30 and result["world_size"] == 2, result
    ranks = result["ranks"]
    assert [r["skipped_steps"] for r in ranks] == [1, 1] and all(r["params_finite"] for r in ranks), ranks
    assert ranks[0]["param_hash"] == ranks[1]["param_hash"], "the replicas drifted apart"
    run_dir = Path(result["run_dir"])
    assert run_dir.parent == (tmp_path / "runs").resolve()  # the job's run directory, not the callback's own
    assert len(list((tmp_path / "runs").iterdir())) == 1
    history = [json.loads(line) for line in (run_dir / "history.jsonl").open()]
    assert any(r.get("val_loss") is not None for r in history) and max(r["step"] for r in history) == 30
