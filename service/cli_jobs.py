"""Service commands of the CLI (up, submit, jobs, status, logs, cancel, alerts)."""

import typer


def register(app: typer.Typer) -> None:
    """Add the service commands to the gradwatch CLI."""
