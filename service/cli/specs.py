"""Reading a job spec on the command line: the spec, or every error on stderr and exit status 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from gradwatch.spec import JobSpec, SpecError, load_spec


def load_or_exit(spec_file: Path, user_code: str = "import") -> JobSpec:
    if user_code == "import" and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # user code imports from here, as on the local Ray's workers
    try:
        return load_spec(spec_file, user_code=user_code)
    except SpecError as exc:
        for line in exc.errors:
            typer.echo(f"{spec_file}: {line}" if line.startswith("<spec>") else line, err=True)
        raise typer.Exit(2) from None
