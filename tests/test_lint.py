"""The code passes the project's ruff rules, is laid out by its formatter (pyproject.toml [tool.ruff]) and
type-checks under mypy (pyproject.toml [tool.mypy])."""

import subprocess
import sys

from tests.conftest import REPO, mypy_run

PACKAGES = ["gradwatch", "service", "workers", "dashboards", "deploy", "tests", "bench", "examples"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PACKAGES], cwd=REPO, capture_output=True, text=True)


def test_ruff_is_clean():
    out = _ruff("check")
    assert out.returncode == 0, out.stdout[-4000:]


def test_code_is_formatted():
    out = _ruff("format", "--check")
    assert out.returncode == 0, (
        "run `make format`; these files differ from the formatter's layout:\n" + out.stdout[-4000:]
    )


def test_types_are_clean():
    # The packages and options come from pyproject.toml; .mypy_cache keeps a second run to seconds. It
    # started with the session (tests/conftest.py), beside the first tests.
    mypy = mypy_run()
    report, _ = mypy.communicate(timeout=600)
    assert mypy.returncode == 0, "run `make typecheck`; mypy reports:\n" + report[-6000:]
