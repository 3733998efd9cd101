"""The code passes the project's ruff rules (pyproject.toml [tool.ruff])."""

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "gradwatch", "service", "workers", "dashboards",
                          "deploy", "tests", "bench", "examples"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]
