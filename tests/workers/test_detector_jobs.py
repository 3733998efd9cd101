"""Issue 25 on real runs: a learning rate 100x too high on a real 2-worker job is named and not a clean
success; a run that diverges again right after each rollback ends failed after `max_rollbacks`."""

from __future__ import annotations

import re

import pytest
import yaml

from gradwatch.spec import load_spec
from tests.conftest import EXAMPLES, small_spec
from workers.driver import run_job, unhealthy_ending
from workers.loop import DivergenceStop, Trainer
from workers.session import LocalSession

# adamw's usual 1e-3 times 100 on a 4-hidden-layer ReLU MLP: most layers die (their gradient exactly 0)
LR_100X = small_spec(
    model={"name": "mlp", "hidden": [64, 64, 64, 64]},
    optimizer={"name": "adamw", "lr": 0.1},
    max_steps=300,
    checkpoint={"every_steps": 300, "keep": 1},
)


@pytest.mark.ray
def test_a_real_two_worker_job_at_100x_the_learning_rate_names_its_dead_layers_and_warns(local_ray, tmp_path):
    result = run_job(load_spec(LR_100X), storage_path=tmp_path)
    raised = {a.kind for a in result.anomalies}
    assert "vanishing_gradients" in raised, result.anomalies  # the dead layers, named
    assert result.state == "failed" or result.warning, (result.state, result.warning)
    if result.state == "succeeded":
        assert "vanishing_gradients" in result.warning or "stalled" in result.warning, result.warning
    assert result.phases[-1].phase != "converged", result.phases
    assert result.world_size == 2


def test_a_run_ending_with_dead_layers_or_stalled_is_no_plain_success():
    held = {"final": {"train_loss": 0.9}, "progress": {"anomalies": {"vanishing_gradients": True}, "phase": "stalled"}}
    assert unhealthy_ending(held) == "it ended with vanishing_gradients held"
    flat = {"final": {"train_loss": 0.9}, "progress": {"anomalies": {"plateau": True}, "phase": "stalled"}}
    assert unhealthy_ending(flat) == "it ended stalled (the loss flat without learning)"
    assert unhealthy_ending({"final": {"train_loss": 0.1}, "progress": {"anomalies": {}, "phase": "converged"}}) is None


def test_a_run_that_diverges_again_after_each_rollback_ends_failed_after_max_rollbacks(tmp_path):
    data = yaml.safe_load((EXAMPLES / "diverging.yaml").read_text())
    # the learning rate barely lowered at each rollback: the run blows up again each time
    data.update(
        {
            "scaling": {"num_workers": 1},
            "max_steps": 2000,
            "on_divergence": "rollback",
            "rollback": {"max_rollbacks": 2, "lr_factor": 0.99},
        }
    )
    trainer = Trainer(load_spec(data), LocalSession(tmp_path / "ckpt"), run_dir=tmp_path)
    with pytest.raises(DivergenceStop) as stopped:
        trainer.train()
    assert re.fullmatch(
        r"training diverged again at step \d+ after 2 rollbacks \(rollback\.max_rollbacks\)", str(stopped.value)
    ), str(stopped.value)
    assert trainer.run.rollbacks == 2
    assert trainer.step < 2000
