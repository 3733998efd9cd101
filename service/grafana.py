"""Push dashboards and alert rules to an existing Grafana."""

import typer


def register(app: typer.Typer) -> None:
    """Add `gradwatch grafana ...` to the CLI."""
