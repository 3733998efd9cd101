"""The commands and links shown in README.md and docs/*.md hold (`make docs-check`).

Every command in a ```bash or ```sh block is either run here (and must exit 0) or matched by NOT_RUN,
which says why it is not run in a test of seconds. Every `gradwatch` command shown, in a block or in
the text, run or not, must name a real command and only options that command's `--help` lists. Every
job spec (or part of one) in a ```yaml block must pass `gradwatch validate`. Every relative link in the pages
must resolve to a file in the repository (and a `#fragment` to a heading of a Markdown target).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
GRADWATCH = str(Path(sys.executable).parent / "gradwatch")
GROUPS = {"user", "grafana"}  # commands with subcommands of their own

# (pattern on the command, why it is not run here). A command matching none of these is run.
NOT_RUN: list[tuple[str, str]] = [
    (r"^make (demo|test|setup|tools|setup tools)$", "installs packages and runs Ray jobs or the whole suite: minutes"),
    (
        r"^(\.venv/bin/)?gradwatch up\b",
        "a long-running service with Ray, Prometheus and Alertmanager (tests/test_e2e_alerts.py)",
    ),
    (
        r"^(\.venv/bin/)?gradwatch (submit|jobs|status|logs|cancel|alerts)\b",
        "needs a running service (tests/service/test_client_cli.py, tests/test_e2e_alerts.py)",
    ),
    (r"^(\.venv/bin/)?gradwatch run\b", "a Ray Train job of tens of seconds (tests/integrations/test_examples.py)"),
    (r"^gradwatch user add\b", "writes a user into the service's store (tests/service/test_cli_security.py)"),
    (r"^gradwatch report\b", "needs a run directory or a job (tests/service/test_report.py)"),
    (
        r"^gradwatch replay (runs/|last-week/|curve\.jsonl)",
        "a file of the reader's, not shipped (tests/workers/test_replay.py)",
    ),
    (r"^gradwatch grafana push\b", "needs a running Grafana (tests/service/test_grafana_push.py)"),
]
# What a command that is run must print (a part of its output), where the page shows it.
PRINTS = {
    "gradwatch validate examples/digits-mlp.yaml": "OK",
    "gradwatch replay bench/data/real/qwen05_verifier.csv": "24 steps",
}


def shell_commands(page: Path) -> list[str]:
    """Each command of the page's bash/sh blocks: comments dropped, lines joined while a quote is open,
    `;`-separated commands split."""
    commands: list[str] = []
    text = page.read_text()
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:
                shlex.split(pending, comments=True)
            except ValueError:
                continue  # an open quote: the command goes on on the next line
            command = _strip_comment(pending).strip()
            pending = ""
            if command:
                commands += [part.strip() for part in _split_top(command) if part.strip()]
        assert not pending, f"{page.name}: an unterminated quote in a shell block: {pending!r}"
    return commands


def _strip_comment(command: str) -> str:
    """The command without a trailing `# comment` outside quotes."""
    quote = ""
    for i, char in enumerate(command):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i]
    return command


def _split_top(command: str) -> list[str]:
    """`a; b` as [a, b] (only outside quotes)."""
    parts, quote, start = [], "", 0
    for i, char in enumerate(command):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ";":
            parts.append(command[start:i])
            start = i + 1
    return [*parts, command[start:]]


def inline_commands(page: Path) -> list[str]:
    """`gradwatch ...` in the page's text outside code blocks, whitespace joined."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return [" ".join(m.split()) for m in re.findall(r"`((?:\.venv/bin/)?gradwatch [^`]+)`", text)]


def all_commands() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in shell_commands(page)]


def why_not_run(command: str) -> str | None:
    for pattern, reason in NOT_RUN:
        if re.search(pattern, command):
            return reason
    return None


def _gradwatch_args(command: str) -> list[str] | None:
    words = command.split()
    if not words or Path(words[0]).name != "gradwatch":
        return None
    return words[1:]


@cache
def help_text(path: tuple[str, ...]) -> tuple[int, str]:
    done = subprocess.run(
        [GRADWATCH, *path, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env()
    )
    return done.returncode, done.stdout + done.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}


def test_pages_have_commands_and_readme_is_short() -> None:
    commands = all_commands()
    assert len(commands) >= 10, commands
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 300, f"README.md has {lines} lines; keep it at most 300 and move the rest into docs/"


def test_every_gradwatch_command_shown_exists_with_its_options() -> None:
    wrong = []
    inline = [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in inline_commands(page)]
    shown = [(page, c, args) for page, c in all_commands() + inline if (args := _gradwatch_args(c)) is not None]
    paths = set()
    for _, _, args in shown:
        if args and args[0] in GROUPS and len(args) > 1:
            paths.add(tuple(args[:2]))
        elif args and not args[0].startswith("-"):
            paths.add(tuple(args[:1]))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(help_text, sorted(paths)))
    for page, command, args in shown:
        path = tuple(args[:2]) if args and args[0] in GROUPS and len(args) > 1 else tuple(args[:1])
        if not path or path[0].startswith("-"):
            continue
        rc, text = help_text(path)
        if rc != 0:
            wrong.append(f"{page}: `{command}`: `gradwatch {' '.join(path)}` is no command ({text.strip()[-200:]})")
            continue
        for word in args:
            flag = word.strip("[]").split("=")[0]
            if re.fullmatch(r"--?[a-z][\w-]*", flag) and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                wrong.append(f"{page}: `{command}`: `gradwatch {' '.join(path)}` has no option {flag}")
    assert not wrong, "\n".join(wrong)


def test_safe_commands_run() -> None:
    runnable = [(page, c) for page, c in all_commands() if why_not_run(c) is None]
    assert any("replay" in c for _, c in runnable), "no replay of a shipped file is run"

    def run(item: tuple[str, str]) -> str | None:
        page, command = item
        line = re.sub(r"^(\.venv/bin/)?gradwatch\b", shlex.quote(GRADWATCH), command)
        line = re.sub(r"^python\b", shlex.quote(sys.executable), line)
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
        out = done.stdout + done.stderr
        if done.returncode != 0:
            return f"{page}: `{command}` exited {done.returncode}:\n{out[-1500:]}"
        expected = PRINTS.get(command)
        if expected is not None and expected not in out:
            return f"{page}: `{command}` did not print {expected!r}:\n{out[-1500:]}"
        return None

    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(run, runnable) if f]
    assert not failures, "\n\n".join(failures)
    assert PRINTS.keys() <= {c for _, c in runnable}, "PRINTS names a command no page shows"


def test_not_run_reasons_are_used() -> None:
    """Each reason still covers a command shown, so the list does not outgrow the pages."""
    commands = [c for _, c in all_commands()]
    unused = [pattern for pattern, _ in NOT_RUN if not any(re.search(pattern, c) for c in commands)]
    assert not unused, f"NOT_RUN patterns that match no command shown: {unused}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in part.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_yaml_specs_shown_validate(tmp_path: Path) -> None:
    """A ```yaml block with a top-level `name:` is a whole job spec; any other is a part of one, checked
    merged into examples/digits-mlp.yaml. Each must pass `gradwatch validate`."""
    base = yaml.safe_load((ROOT / "examples/digits-mlp.yaml").read_text())
    files = []
    for page in PAGES:
        for i, block in enumerate(re.findall(r"^```yaml\n(.*?)^```", page.read_text(), re.S | re.M)):
            shown = yaml.safe_load(block)
            assert isinstance(shown, dict), f"{page.name}: a yaml block that is no mapping: {block[:80]!r}"
            spec = shown if "name" in shown else _merge(base, shown)
            path = tmp_path / f"{page.stem}-{i}.yaml"
            path.write_text(yaml.safe_dump(spec))
            files.append((page.name, path))
    assert files

    def check(item: tuple[str, Path]) -> str | None:
        page, path = item
        done = subprocess.run([GRADWATCH, "validate", str(path)], capture_output=True, text=True, timeout=60, cwd=ROOT)
        return None if done.returncode == 0 else f"{page}: {path.name}:\n{done.stdout}{done.stderr}"

    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(check, files) if f]
    assert not failures, "\n".join(failures)
