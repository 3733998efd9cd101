"""Shared fixtures: a real local Ray for the tests that need one, and small specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


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


@pytest.fixture(scope="session")
def ray_cluster():
    """A multi-node Ray on this machine (ray.cluster_utils.Cluster): a head with no CPUs and two worker
    nodes of 2 logical CPUs each. A test that removes nodes puts them back (`restore`) for the next."""
    from tests.raycluster import multi_node_ray

    with multi_node_ray(workers=2, cpus_per_node=2) as cluster:
        yield cluster
