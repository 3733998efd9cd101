"""Write gradwatch's Grafana dashboards as JSON, or check that the written ones are current.

    python -m dashboards.build           # writes dashboards/{fleet,run,ranks}.json
    python -m dashboards.build --check   # exits 1 naming every stale or missing file

Also the helpers a live test uses to run every panel's query against a real Prometheus:
`panel_queries(dashboard_json)` lists (panel title, PromQL) and `substitute(expr, variables)`
replaces Grafana's template variables the way Grafana would.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders.dashboard import Dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus

from dashboards.fleet import fleet
from dashboards.ranks import ranks
from dashboards.run import run

HERE = Path(__file__).resolve().parent

BOARDS: dict[str, Callable[[], Dashboard]] = {"fleet.json": fleet, "run.json": run, "ranks.json": ranks}


def render(board: Dashboard) -> str:
    """The dashboard as JSON with sorted keys, panel ids numbered in order and every target given a refId."""
    built = board.build()
    for panel_id, panel in enumerate(built.panels or [], start=1):
        panel.id_val = panel_id
        if isinstance(panel, model.Panel):
            for index, target in enumerate(panel.targets or []):
                if isinstance(target, prometheus.Dataquery) and not target.ref_id:
                    target.ref_id = chr(ord("A") + index)
    data = json.loads(json.dumps(built, cls=JSONEncoder))
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def write_all(out_dir: Path = HERE) -> list[Path]:
    """Write every board into `out_dir`; returns the paths written."""
    written = []
    for file_name, make in BOARDS.items():
        path = out_dir / file_name
        path.write_text(render(make()), encoding="utf-8")
        written.append(path)
    return written


def stale_files(out_dir: Path = HERE) -> list[str]:
    """Names of the board files in `out_dir` that are missing or differ from what the code builds."""
    stale = []
    for file_name, make in BOARDS.items():
        path = out_dir / file_name
        if not path.exists() or path.read_text(encoding="utf-8") != render(make()):
            stale.append(file_name)
    return stale


def panel_queries(dashboard_json: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every PromQL expression of a dashboard as (panel title, expr), in panel order.

    Covers panels inside collapsed rows, and the annotation queries (titled "annotation: NAME").
    Template variables are left as written: pass each expr through `substitute` before running it.
    """
    queries: list[tuple[str, str]] = []

    def visit(panels: list[Mapping[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append((panel.get("title", ""), target["expr"]))
            visit(panel.get("panels", []))

    visit(dashboard_json.get("panels", []))
    for annotation in dashboard_json.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            queries.append((f"annotation: {annotation.get('name', '')}", annotation["expr"]))
    return queries


# What Grafana would put in for its built-in variables and for "All" on gradwatch's filters.
DEFAULT_VARIABLES: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "team": ".*",
    "project": ".*",
    "state": ".*",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w:]+)?\}|\[\[(\w+)(?::[\w:]+)?\]\]|\$(\w+)")


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace $name, ${name}, ${name:format} and [[name]] in `expr`.

    `variables` overrides DEFAULT_VARIABLES; a variable with no value raises KeyError naming it
    (for example $job_id: pass variables={"job_id": "..."}).
    """
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise KeyError(f"{expr!r} uses ${name}: pass variables={{{name!r}: ...}}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a written dashboard is stale or missing")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of the JSON files (default: dashboards/)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print(
                f"stale dashboards in {args.out}: {', '.join(stale)}; run `python -m dashboards.build`",
                file=sys.stderr,
            )
            return 1
        print(f"dashboards in {args.out} are current")
        return 0
    for path in write_all(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
