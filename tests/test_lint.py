"""The code passes the project's ruff rules and is laid out by its formatter (pyproject.toml [tool.ruff])."""

import subprocess
import sys

from tests.conftest import REPO

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
