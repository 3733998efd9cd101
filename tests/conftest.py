"""Shared fixtures: a real local Ray for the tests that need one, and small specs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gradwatch.names import TEST_REPORTS_ENV

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# Every Ray process the tests start inherits the test hook: the ranks' final reports carry the
# parameter fingerprints and first-epoch indices the tests check.
os.environ[TEST_REPORTS_ENV] = "1"
# The reason a run ends failed once its updates were skipped max_skipped_steps steps (workers/loop.py).
DIVERGED = re.compile(
    r"diverged: (?:(?P<steps>\d+) consecutive non-finite steps|(?P<skipped>\d+) of the "
    r"(?P<of>\d+) steps) since step (?P<since>\d+)(?: were non-finite, never \d+ finite in a row)?; "
    r"last finite loss(?: before them)? (?P<loss>\S+) at step (?P<last>\d+)"
)


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module (started in-process, shut down after)."""
    import ray

    from workers.driver import init_ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    init_ray(quiet=True)
    yield ray
    ray.shutdown()


def small_spec(**overrides) -> dict:
    """A quick job on the real digits data; override any field."""
    spec = {
        "name": "test-job",
        "model": {"name": "mlp", "hidden": [32]},
        "data": {"name": "digits"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "batch_size": 32,
        "max_steps": 60,
        "scaling": {"num_workers": 2},
        "validation": {"every_steps": 20},
        "telemetry": {"interval": 5, "grace_seconds": 0},
        "checkpoint": {"every_steps": 30, "keep": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key not in ("model", "data"):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head (2 logical CPUs) for every module that runs jobs through the service."""
    from tests.stack import ray_head as start_head

    with start_head(cpus=2) as address:
        yield address


@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL server (initdb in a temporary folder, a free port) for the whole run."""
    from tests.pgcluster import postgres_cluster

    with postgres_cluster() as cluster:
        yield cluster


# The four examples that show dynamics on purpose, with the steps their detectors need (the shipped specs
# run longer so that Prometheus alerts fire), and the demo.
DYNAMICS_EXAMPLES = ("diverging", "stalled", "overfitting", "vanishing")
EXAMPLE_MAX_STEPS = {"diverging": 300, "stalled": 400}


def example_spec_file(name: str, folder: Path) -> Path:
    """examples/NAME.yaml for a test: no scrape grace at the end, and only the steps the detectors need."""
    import yaml

    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["telemetry"] = {**data.get("telemetry", {}), "grace_seconds": 0}
    if name in EXAMPLE_MAX_STEPS:
        data["max_steps"] = EXAMPLE_MAX_STEPS[name]
    if name == "diverging":
        data["max_skipped_steps"] = None  # it runs on through its non-finite steps to show them all
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="session")
def example_runs(tmp_path_factory):
    """name -> (run directory, the run's `--json` result) for the demo and the four dynamics examples, run
    once per session: the demo through `gradwatch run --json`, the others through `run_job` (what that
    command calls and prints) on one local Ray, shut down before the fixture returns."""
    import json
    import subprocess
    import sys

    import ray

    from gradwatch.spec import load_spec
    from workers.driver import init_ray, run_job

    tmp = tmp_path_factory.mktemp("example-runs")
    made = {}
    gradwatch = Path(sys.executable).parent / "gradwatch"
    out = subprocess.run(
        [
            str(gradwatch),
            "run",
            str(example_spec_file("digits-mlp", tmp)),
            "--json",
            "--storage-path",
            str(tmp / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    made["digits-mlp"] = (Path(result["run_dir"]), result)
    if ray.is_initialized():
        ray.shutdown()
    init_ray(quiet=True)
    try:
        for name in DYNAMICS_EXAMPLES:
            result = run_job(load_spec(example_spec_file(name, tmp)), storage_path=tmp / "runs")
            made[name] = (Path(result.run_dir), result.model_dump(mode="json"))
    finally:
        ray.shutdown()
    return made
