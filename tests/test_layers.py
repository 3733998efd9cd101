"""Dependencies run one way (gradwatch/ARCHITECTURE.md): read off the imports of every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shared contract: what every side imports, so it imports none of them.
CONTRACT = (
    "gradwatch/spec.py",
    "gradwatch/spec_telemetry.py",
    "gradwatch/names.py",
    "gradwatch/ids.py",
    "gradwatch/status.py",
)
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, at module level?) of every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_workers_never_import_the_service():
    offenders = [str(p.relative_to(REPO)) for p in modules("workers") if any(m == "service" for m, _ in imports(p))]
    assert offenders == []


def test_the_service_reaches_workers_only_to_run_and_replay_a_job():
    reached = {
        str(p.relative_to(REPO)): at_top for p in modules("service") for m, at_top in imports(p) if m == "workers"
    }
    # `gradwatch run` (the driver) and `gradwatch replay` (the detectors), each inside its command
    assert reached == {"service/cli.py": False, "service/cli_replay.py": False}


def test_the_contract_imports_only_pydantic_yaml_and_itself():
    for name in CONTRACT:
        found = {m for m, _ in imports(REPO / name)} - STDLIB - {"__future__"}
        assert found <= {"pydantic", "pydantic_core", "yaml", "gradwatch"}, (name, found)


def test_the_service_never_loads_torch():
    probe = "import sys, service.api, service.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
