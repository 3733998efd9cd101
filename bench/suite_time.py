"""How long the whole test suite takes on a clean clone, against its 900 s goal.

Clones the repository's committed HEAD into a fresh folder, runs `make setup tools` there once (not
timed: the venv, pip and the Debian tools), then `CI=true make test` RUNS times (default 3), each
timed from start to exit. The anchor is the goal itself: 900 s on an idle 2-core machine. Prints
one row per run (seconds, passed/failed counts, the ratio to the goal), the slowest tests of the last
run (from `make test`'s `--durations` list), and writes the `suite-time` section of bench/RESULTS.md.
Run it on an idle machine: anything else running slows the suite.

    python bench/suite_time.py [--runs 3] [--keep DIR]

Last line: `suite_seconds_median=S suite_goal_ratio=R all_passed=yes|no`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results import write_section

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 900.0
_SUMMARY = re.compile(r"=+ (?P<body>.*?) in (?P<secs>[\d.]+)s")
_DURATION = re.compile(r"^(?P<secs>[\d.]+)s (?P<what>call|setup|teardown) +(?P<test>\S+)$", re.M)


def _counts(output: str) -> dict[str, int]:
    """pytest's closing line, e.g. `712 passed, 1 warning in 850.2s`, as {"passed": 712, ...}."""
    found = _SUMMARY.findall(output)
    if not found:
        return {}
    body = found[-1][0]
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (\w+)", body)}


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)], check=True)
    return dest


def run_once(clone_dir: Path) -> tuple[float, int, str]:
    env = {**os.environ, "CI": "true"}
    start = time.monotonic()
    out = subprocess.run(["make", "test"], cwd=clone_dir, env=env, capture_output=True, text=True)
    return time.monotonic() - start, out.returncode, out.stdout + out.stderr


def slowest(output: str, n: int = 10) -> list[tuple[float, str]]:
    rows = [(float(m["secs"]), f"{m['test']} ({m['what']})") for m in _DURATION.finditer(output)]
    return sorted(rows, reverse=True)[:n]


def verdict(seconds: list[float], ok: bool) -> str:
    """Whether the runs meet the goal: every one passed, and every one in under GOAL_S (not only the median)."""
    median, worst = statistics.median(seconds), max(seconds)
    meets = ok and worst < GOAL_S
    return (
        f"Median {median:.0f} s ({median / GOAL_S:.2f} of the goal), slowest {worst:.0f} s "
        f"({worst / GOAL_S:.2f}): it {'meets' if meets else 'misses'} the goal."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="Timed runs of `make test` (default 3).")
    parser.add_argument("--keep", type=Path, help="Clone here and keep it (default: a temporary folder).")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    work = args.keep or Path(tempfile.mkdtemp(prefix="gw-suite-"))
    target = clone(work / "gradwatch")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=target, capture_output=True, text=True)
    setup = subprocess.run(["make", "setup", "tools"], cwd=target, capture_output=True, text=True)
    if setup.returncode:
        print(setup.stdout[-4000:] + setup.stderr[-4000:], file=sys.stderr)
        print(f"make setup tools failed in {target} (exit {setup.returncode})", file=sys.stderr)
        return 1
    rows, seconds, outputs, ok = [], [], [], True
    for i in range(1, args.runs + 1):
        secs, rc, output = run_once(target)
        (work / f"run-{i}.log").write_text(output)  # kept with --keep: what failed, and the durations
        counts = _counts(output)
        passed = rc == 0
        ok &= passed
        seconds.append(secs)
        outputs.append(output)
        counted = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary"
        rows.append(f"| {i} | {secs:.0f} s | {counted} | {'pass' if passed else f'exit {rc}'} | {secs / GOAL_S:.2f} |")
        print(rows[-1], flush=True)
    median = statistics.median(seconds)
    body = [
        f"`CI=true make test` on a clean clone of {head.stdout.strip()}, {args.runs} runs after one untimed "
        f"`make setup tools`; the goal is every run passing in under {GOAL_S:.0f} s. {verdict(seconds, ok)}",
        "",
        "| run | wall | tests | result | wall / goal |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Slowest tests of the last run:",
        "",
        "| seconds | test |",
        "| --- | --- |",
        *(f"| {secs:.1f} | `{test}` |" for secs, test in slowest(outputs[-1])),
    ]
    text = "\n".join(body)
    print(text)
    write_section("suite-time", "How long the whole test suite takes", text)
    print(
        f"suite_seconds_median={median:.0f} suite_goal_ratio={median / GOAL_S:.2f} all_passed={'yes' if ok else 'no'}"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
