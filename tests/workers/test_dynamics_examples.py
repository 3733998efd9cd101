"""The example specs that show dynamics on purpose raise what they show, on real 2-worker runs."""

from __future__ import annotations

import pytest
import yaml

from gradwatch.spec import load_spec
from tests.conftest import EXAMPLES
from workers.driver import run_job

pytestmark = pytest.mark.ray


def example(name: str, **overrides):
    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["telemetry"] = {**data.get("telemetry", {}), "grace_seconds": 0}
    data.update(overrides)
    return load_spec(data)


def kinds(result) -> set[str]:
    return {a["kind"] for a in result["anomalies"]}


def phases(result) -> set[str]:
    return {p["phase"] for p in result["phases"]}


@pytest.mark.parametrize("name,expect_anomaly,expect_phase", [
    ("diverging", "divergence", "diverging"),
    ("stalled", "plateau", "stalled"),
    ("overfitting", "overfitting", None),
    ("vanishing", "vanishing_gradients", None),
])
def test_example_raises_what_it_shows(local_ray, tmp_path, name, expect_anomaly, expect_phase):
    # the examples run long enough for Prometheus alerts; the detectors need only the first steps
    overrides = {"max_steps": 400 if name == "stalled" else 300} if name in ("stalled", "diverging") else {}
    result = run_job(example(name, **overrides), storage_path=tmp_path)
    assert result["state"] == "succeeded", result["error"]
    assert expect_anomaly in kinds(result), result["anomalies"]
    if expect_phase:
        assert expect_phase in phases(result), result["phases"]
    if name != "diverging":
        assert "divergence" not in kinds(result)
