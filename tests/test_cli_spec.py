"""`gradwatch validate` and `gradwatch schema` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import EXAMPLES, REPO, small_spec


def gradwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_validate_ok():
    out = gradwatch("validate", str(EXAMPLES / "digits-mlp.yaml"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK digits-mlp")


def test_validate_prints_every_error_and_exits_2(tmp_path):
    bad = small_spec(optimizer={"lr": -1}, scaling={"num_workers": 0})
    bad["optimiser"] = {"name": "sgd"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = gradwatch("validate", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "optimizer.lr: Input should be greater than 0 (got -1)" in lines
    assert "scaling.num_workers: Input should be greater than or equal to 1 (got 0)" in lines
    assert "optimiser: unknown field (not allowed here; check its spelling)" in lines
    assert len(lines) == 3


def test_validate_missing_file(tmp_path):
    out = gradwatch("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "cannot read" in out.stderr


def test_schema_prints_json():
    out = gradwatch("schema")
    assert out.returncode == 0
    assert json.loads(out.stdout)["title"] == "gradwatch JobSpec"
