"""The wheel, installed in a fresh venv outside the checkout, ships what `gradwatch grafana push`
and the config renderers read: dashboards, rules, Grafana provisioning, Prometheus and Alertmanager configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.service.test_grafana_push import TOKEN, FakeGrafana, fake_grafana  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(600)
SOURCES = ["gradwatch", "service", "workers", "dashboards", "deploy", "pyproject.toml", "README.md"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the checkout with the wheel built from it (the test venv's packages as its dependencies)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building in the checkout would leave build/ behind there
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(
            REPO / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(source),
        ],
        check=True,
        cwd=tmp,
    )
    wheel = next((tmp / "dist").glob("gradwatch-*.whl"))
    venv = tmp / "venv"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True
    )
    site = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies (torch, ray, ...) from the test venv, as a plain path: its editable gradwatch stays out.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "-q",
            str(wheel),
        ],
        check=True,
        cwd=tmp,
    )
    shutil.rmtree(source)
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    out = run(
        installed,
        "python",
        "-c",
        "import gradwatch, service.stack.grafana as g, deploy.render as r, json; "
        "print(json.dumps([gradwatch.__file__, str(g.default_dashboards_dir()), str(r.RULE_FILE)]))",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    package, dashboards, rules = (Path(p) for p in json.loads(out.stdout))
    for path in (package, dashboards, rules):
        assert path.is_relative_to(installed) and not path.is_relative_to(REPO), path
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["fleet.json", "ranks.json", "run.json"]
    assert rules.is_file()


def test_grafana_push_works_from_the_installed_package(installed, tmp_path, fake_grafana: FakeGrafana):  # noqa: F811
    token_file = tmp_path / "grafana.token"
    token_file.write_text(TOKEN)
    out = run(
        installed,
        "gradwatch",
        "grafana",
        "push",
        "--url",
        fake_grafana.url,
        "--token-file",
        str(token_file),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(fake_grafana.dashboards) == {"gradwatch-fleet", "gradwatch-run", "gradwatch-ranks"}
    assert fake_grafana.rules, "no alert rules pushed from the packaged provisioning file"


def test_configs_render_from_the_installed_package(installed, tmp_path):
    code = (
        "from deploy.render import render_prometheus_config, render_alertmanager_config; "
        "print(render_prometheus_config()); print(render_alertmanager_config())"
    )
    out = run(installed, "python", "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "gradwatch-workers" in out.stdout and "/v1/alerts" in out.stdout
