"""Real DDP with two workers on a real local Ray, through Ray Train's TorchTrainer."""

from __future__ import annotations

import json
import threading

import pytest

from gradwatch.spec import load_spec
from gradwatch.status import RunStatus
from tests.conftest import small_spec
from workers.driver import run_job

pytestmark = pytest.mark.ray


def test_two_worker_ddp_job(local_ray, tmp_path):
    spec = load_spec(small_spec(max_steps=120, validation={"every_steps": 30}))
    seen: list[RunStatus] = []
    result = run_job(spec, storage_path=tmp_path, listeners=[lambda status, events: seen.append(status)])

    assert result.state == "succeeded", result.error
    assert result.world_size == 2 and result.steps == 120
    ranks = result.ranks
    assert [r.rank for r in ranks] == [0, 1]
    # each rank trained on its own shard: no example seen by both in the first epoch
    shard0, shard1 = set(ranks[0].first_epoch_indices or []), set(ranks[1].first_epoch_indices or [])
    assert shard0 and shard1 and not shard0 & shard1
    # DDP kept the replicas identical
    assert ranks[0].param_hash is not None and ranks[0].param_hash == ranks[1].param_hash
    assert ranks[0].param_sum == ranks[1].param_sum
    # and the model learned
    assert result.val_loss < 0.5 * result.first_val_loss
    assert result.val_accuracy > 0.85
    # the driver kept status.json and the watchers informed while it ran
    status = json.loads((tmp_path / result.job_id / "status.json").read_text())
    assert status["state"] == "succeeded" and status["step"] == 120 and status["endpoints"] == []
    assert any(status.state == "running" and status.endpoints for status in seen)
    assert (tmp_path / result.job_id / "result.json").exists()
    assert list((tmp_path / result.job_id).glob("checkpoint_*")), "Ray Train kept a checkpoint"


def test_a_job_larger_than_the_cluster_fails_at_once(local_ray, tmp_path):
    spec = load_spec(small_spec(scaling={"num_workers": 64}))
    result = run_job(spec, storage_path=tmp_path)
    assert result.state == "failed"
    assert "needs 64 CPUs" in result.error and "lower scaling.num_workers" in result.error
    assert result.wall_seconds < 30

    gpu = load_spec(small_spec(scaling={"num_workers": 1, "use_gpu": True}))
    result = run_job(gpu, storage_path=tmp_path)
    assert result.state == "failed" and "GPUs" in result.error


DELAY = 0.05  # seconds rank 1 sleeps in each forward (tests/workers/user_code.py)


def test_a_slow_rank_shows_in_its_own_step_time(local_ray, tmp_path):
    """Step time leaves out the wait at the all-reduce, so the straggler, not its peers, looks slow."""
    spec = load_spec(
        small_spec(
            model={"name": "tests.workers.user_code:build", "options": {"delay": DELAY}},
            max_steps=60,
            telemetry={"interval": 10, "grace_seconds": 0},
        )
    )
    result = run_job(spec, storage_path=tmp_path)
    assert result.state == "succeeded", result.error
    fast, slow = (result.ranks[r].mean_step_seconds for r in (0, 1))
    # the delay shows on the straggler alone: were the wait at the all-reduce counted, both would carry it
    # (a busy machine slows both ranks' own compute alike, so the gap, not a ratio, is the measure)
    assert slow > DELAY and slow - fast > 0.5 * DELAY, (fast, slow)


def test_a_data_factory_that_raises_fails_fast(local_ray, tmp_path):
    spec = load_spec(small_spec(data={"name": "tests.workers.user_code:broken_data"}, max_failures=0))
    result = run_job(spec, storage_path=tmp_path)
    assert result.state == "failed"
    assert "FileNotFoundError: no such data file: /data/missing.npz" in result.error
    assert result.wall_seconds < 90


def test_user_code_that_crashes_fails_with_its_traceback(local_ray, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "class Boom(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.l = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n        raise ValueError('shape mismatch in my layer')\n"
        "def build(data_info):\n    return Boom()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import ray

    ray.shutdown()
    monkeypatch.chdir(tmp_path)  # the local cluster puts the working directory on the workers' path
    from workers.driver import init_ray

    init_ray()
    try:
        spec = load_spec(small_spec(model={"name": "mymodels:build"}, scaling={"num_workers": 1}))
        result = run_job(spec, storage_path=tmp_path / "runs")
    finally:  # the module's next tests get a cluster whose workers start in the checkout again
        ray.shutdown()
        monkeypatch.undo()
        init_ray(quiet=True)
    assert result.state == "failed"
    assert "ValueError: shape mismatch in my layer" in result.error


def test_a_timeout_ends_the_job_and_leaves_no_worker_training(local_ray, tmp_path):
    # rank 1 sleeps 50 ms a step: 100,000 steps would take hours
    spec = load_spec(
        small_spec(
            model={"name": "tests.workers.user_code:build", "options": {"delay": 0.05}},
            max_steps=100_000,
            timeout="20s",
            telemetry={"grace_seconds": 0},
        )
    )
    result = run_job(spec, storage_path=tmp_path)
    assert (result.state, result.error) == ("timed_out", "ran longer than its timeout of 20s")
    assert 20 <= result.wall_seconds and result.steps < spec.max_steps
    # the trainer was stopped before the result was written: no fit thread, no Ray left running
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fit-") and t.is_alive()]
    assert not local_ray.is_initialized()
    status = json.loads((tmp_path / result.job_id / "status.json").read_text())
    assert status["state"] == "timed_out" and status["endpoints"] == []
