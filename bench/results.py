"""`bench/RESULTS.md`: one section per bench, rewritten by the bench that measured it.

Each bench calls `write_section(name, title, body)` with the markdown it printed; the section is
stamped with the date, the machine and the command that made it, and replaces that bench's previous
section in place, so the file always holds the latest run of every bench and nothing written by hand.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_HEADER = (
    "# Benchmark results\n\n"
    "Written by the benches themselves (`make bench`, or one bench alone); do not edit by hand.\n"
    "Each section says when, on what machine and by which command it was measured.\n"
)
_BEGIN = "<!-- bench:{name} -->"
_END = "<!-- /bench:{name} -->"


def machine() -> str:
    """The machine in words: CPU count, memory, GPU if torch sees one, OS."""
    cores = os.cpu_count() or 0
    memory = ""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * page_size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpu = "no GPU"
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    return f"{cores} cores{memory}, {gpu}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def write_section(name: str, title: str, body: str, *, path: Path = RESULTS, command: str | None = None) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body` under `title`."""
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"section name {name!r}: use lower-case letters, digits, '_' and '-'")
    command = command or "python " + " ".join(shlex.quote(a) for a in [_relative(sys.argv[0]), *sys.argv[1:]])
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"{_BEGIN.format(name=name)}\n## {title}\n\n"
        f"Measured {stamp} on {machine()} by `{command}`.\n\n{body.strip()}\n{_END.format(name=name)}\n"
    )
    text = path.read_text() if path.exists() else _HEADER
    begin, end = _BEGIN.format(name=name), _END.format(name=name)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def _relative(script: str) -> str:
    try:
        return str(Path(script).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return script
