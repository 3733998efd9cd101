"""The example specs that show dynamics on purpose raise what they show, on real 2-worker runs.

The runs are the session's `dynamics_runs` (tests/conftest.py): each example once, through `run_job`,
with only the steps its detectors need; the report tests draw the same runs."""

from __future__ import annotations

import json
import math

import pytest

from gradwatch.spec import load_spec
from gradwatch.status import RunResult
from tests.conftest import DIVERGED

pytestmark = pytest.mark.ray


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
def test_example_raises_what_it_shows(dynamics_runs, name, expect_anomaly, expect_phase):
    result = RunResult.model_validate(dynamics_runs[name][1])
    assert result.state == "succeeded", result.error
    if name == "overfitting":
        assert result.warning is None
    else:  # a run that stopped learning reaches its last step, but it is no plain success
        assert result.warning and ("stalled" in result.warning or expect_anomaly in result.warning), result.warning
    assert expect_anomaly in kinds(result), result.anomalies
    if expect_phase:
        assert expect_phase in phases(result), result.phases
    assert "divergence" not in kinds(result)


def test_the_diverging_example_ends_failed_once_its_updates_are_all_skipped(dynamics_runs):
    run_dir, ran = dynamics_runs["diverging"]
    result = RunResult.model_validate(ran)
    spec = load_spec(json.loads((run_dir / "spec.json").read_text()))
    assert result.state == "failed"
    reason = DIVERGED.fullmatch(result.error)
    assert reason and int(reason["steps"] or reason["of"]) == spec.max_skipped_steps, result.error
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    first_nonfinite = min(r["step"] for r in history if r.get("nonfinite"))
    assert int(reason["since"]) == first_nonfinite and int(reason["last"]) == first_nonfinite - 1
    assert math.isfinite(float(reason["loss"]))
    assert result.steps == first_nonfinite + spec.max_skipped_steps - 1 < spec.max_steps
    assert "diverging" in phases(result) and "divergence" in kinds(result)  # the detectors saw it coming
