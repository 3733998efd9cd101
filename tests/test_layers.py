"""Dependencies run one way (gradwatch/ARCHITECTURE.md): read off the imports of every module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shared contract: every module of gradwatch/, what every side imports, so it imports none of them
# (the training API's re-export in gradwatch/__init__.py loads workers.training by name, on first use).
CONTRACT = tuple(sorted(str(p.relative_to(REPO)) for p in (REPO / "gradwatch").rglob("*.py")))
FIRST_PARTY = ("gradwatch", "workers", "service", "deploy", "dashboards", "bench")
STDLIB = set(sys.stdlib_module_names)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The nodes under `if TYPE_CHECKING:` (read by the type checker alone, never run)."""
    return {
        id(inner)
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }


def imports(path: Path, full: bool = False) -> list[tuple[str, bool]]:
    """(top-level module, or the full dotted name with `full`; at module level?) of every import in the
    file that runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    top_level, typing_only = {id(node) for node in tree.body}, _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if full and isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(f"{node.module}.{alias.name}", id(node) in top_level) for alias in node.names]
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name if full else alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
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
    assert reached == {"service/cli/main.py": False, "service/cli/replay.py": False}


def test_the_contract_imports_only_pydantic_yaml_and_itself():
    assert "gradwatch/spec.py" in CONTRACT and "gradwatch/__init__.py" in CONTRACT
    for name in CONTRACT:
        found = {m for m, _ in imports(REPO / name)} - STDLIB - {"__future__"}
        assert found <= {"pydantic", "pydantic_core", "yaml", "gradwatch"}, (name, found)


def test_the_service_never_loads_torch():
    probe = "import sys, service.api.routes, service.cli.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph(packages: tuple[str, ...] = FIRST_PARTY, lazy: bool = False) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports at module level (what runs on import),
    or with `lazy` every import that runs, those inside functions too."""
    paths = {_module_name(p): p for package in packages for p in modules(package)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for target, at_top in imports(path, full=True):
            if not (at_top or lazy):
                continue
            while target and target not in paths:  # `from a.b import c`: c is a module or a name in a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = _module_graph()
    assert "workers.training" in graph and "service.api.routes" in graph
    assert _cycles(graph) == []


# The service's packages, in the order a request flows; a module at service/'s top (settings, auth, the
# client) is shared by them all and imports none of them.
SERVICE_PACKAGES = ("api", "store", "scheduler", "stack", "cli", "report")


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or parts[-1] in SERVICE_PACKAGES else module


def test_the_service_is_in_packages():
    found = {p.name for p in (REPO / "service").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(SERVICE_PACKAGES)
    flat = {p.stem for p in (REPO / "service").glob("*.py")} - {"__init__"}
    assert flat == {"settings", "auth", "client"}


def test_the_package_graph_finds_a_cycle():
    graph = {"service.api.routes": {"service.store.store"}, "service.store.store": {"service.api.models"}}
    packages = {_package_of(m): {_package_of(t) for t in ts} - {_package_of(m)} for m, ts in graph.items()}
    packages.setdefault("service.api", set())
    assert _cycles(packages) == [["service.api", "service.store"]]


def test_no_import_cycles_in_the_service_counting_imports_inside_functions():
    """Not one module cycle, nor one between the service's packages, even through an import made on
    first use."""
    graph = _module_graph(("service",), lazy=True)
    assert {"service.api.routes", "service.scheduler.launcher", "service.cli.replay"} <= set(graph)
    assert _cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(_package_of(module), set()).update(_package_of(t) for t in targets)
    for package, targets in packages.items():
        targets.discard(package)
        for target in targets:
            packages.setdefault(target, set())
    assert {f"service.{name}" for name in SERVICE_PACKAGES} <= set(packages)
    assert _cycles(packages) == []


# What the product and its benches are made of: none of it may lean on the test suite.
NOT_TESTS = ("gradwatch", "workers", "service", "bench", "deploy", "dashboards", "examples")
# Searched for definitions: the product's folders and the tests (never .venv or a build's copies).
CODE_FOLDERS = (*NOT_TESTS, "tests")
# Local processes have one home (service/stack/supervisor.py): these are defined there alone.
DEFINED_ONCE = ("port_is_free", "free_port", "wait_for", "start_child", "_die_with_parent")


def _code_files(folders: tuple[str, ...]) -> list[Path]:
    found = [p for folder in folders for p in modules(folder)]
    assert found and all(".venv" not in p.parts for p in found)
    return found


def test_nothing_outside_the_tests_imports_them():
    """Not at module level, not inside a function: bench/ and examples/ run without the test suite."""
    files = _code_files(NOT_TESTS)
    assert {p.relative_to(REPO).parts[0] for p in files} == set(NOT_TESTS)  # every folder was read
    offenders = sorted(str(p.relative_to(REPO)) for p in files if any(m == "tests" for m, _ in imports(p)))
    assert offenders == []


def _definitions(paths: list[Path], names: tuple[str, ...], root: Path = REPO) -> dict[str, list[str]]:
    """name -> the files (relative to `root`) that define a function or class of that name, at any depth."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in found:
                found[node.name].append(str(path.relative_to(root)))
    return found


def test_the_definition_scan_finds_a_copy_at_any_depth(tmp_path):
    (tmp_path / "copy.py").write_text(
        "import socket\n\nclass Stack:\n    def free_port(self):\n        return 0\n\n"
        "def outer():\n    async def wait_for():\n        pass\n"
    )
    (tmp_path / "caller.py").write_text("from service.stack.supervisor import free_port\n\nfree_port()\n")
    found = _definitions(sorted(tmp_path.glob("*.py")), ("free_port", "wait_for", "start_child"), tmp_path)
    assert found == {"free_port": ["copy.py"], "wait_for": ["copy.py"], "start_child": []}


def test_local_process_helpers_are_defined_once_in_the_supervisor():
    found = _definitions(_code_files(CODE_FOLDERS), DEFINED_ONCE)
    assert found == {name: ["service/stack/supervisor.py"] for name in DEFINED_ONCE}
