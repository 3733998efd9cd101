"""The example specs that show dynamics on purpose raise what they show, on real 2-worker runs."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from gradwatch.spec import load_spec
from gradwatch.status import RunResult
from tests.conftest import DIVERGED, EXAMPLES
from workers.driver import run_job

pytestmark = pytest.mark.ray


def example(name: str, **overrides):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["telemetry"] = {**data.get("telemetry", {}), "grace_seconds": 0}
    data.update(overrides)
    return load_spec(data)


def kinds(result: RunResult) -> set[str]:
    return {a.kind for a in result.anomalies}


def phases(result: RunResult) -> set[str]:
    return {p.phase for p in result.phases}


@pytest.mark.parametrize(
    "name,expect_anomaly,expect_phase",
    [
        ("stalled", "plateau", "stalled"),
        ("overfitting", "overfitting", None),
        ("vanishing", "vanishing_gradients", None),
    ],
)
def test_example_raises_what_it_shows(local_ray, tmp_path, name, expect_anomaly, expect_phase):
    # the examples run long enough for Prometheus alerts; the detectors need only the first steps
    overrides = {"max_steps": 400} if name == "stalled" else {}
    result = run_job(example(name, **overrides), storage_path=tmp_path)
    assert result.state == "succeeded", result.error
    assert result.warning is None
    assert expect_anomaly in kinds(result), result.anomalies
    if expect_phase:
        assert expect_phase in phases(result), result.phases
    assert "divergence" not in kinds(result)


def test_the_diverging_example_ends_failed_once_its_updates_are_all_skipped(local_ray, tmp_path):
    spec = example("diverging")
    result = run_job(spec, storage_path=tmp_path)
    assert result.state == "failed"
    reason = DIVERGED.fullmatch(result.error)
    assert reason and int(reason["steps"] or reason["of"]) == spec.max_skipped_steps, result.error
    history = [json.loads(line) for line in (tmp_path / result.job_id / "history.jsonl").read_text().splitlines()]
    first_nonfinite = min(r["step"] for r in history if r.get("nonfinite"))
    assert int(reason["since"]) == first_nonfinite and int(reason["last"]) == first_nonfinite - 1
    assert math.isfinite(float(reason["loss"]))
    assert result.steps == first_nonfinite + spec.max_skipped_steps - 1 < spec.max_steps
    assert "diverging" in phases(result) and "divergence" in kinds(result)  # the detectors saw it coming
