"""The ranks' own output: `[rank N] line` from what a training function prints, Ray's noise left out.

The unit tests hold the line tagging of a rank (workers/rank_output.RankLines) and the driver's filter
of the forwarded worker output (workers/driver.WorkerOutput); the Ray test runs `gradwatch run` on a
real 2-worker job whose training function prints a marker on every rank.
"""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest
import yaml

from tests.conftest import small_spec
from tests.stack import gradwatch_run, run_to_end
from workers.driver import WorkerOutput
from workers.rank_output import RankLines

MARKER = "rank-output-marker"


def print_spec(marker: str = MARKER) -> dict:
    """A 2-worker job of tests/print_entrypoint.py: a few steps, no grace at the end."""
    return {
        "name": "print-ranks",
        "train": {"entrypoint": "tests.print_entrypoint:train_func", "config": {"marker": marker}},
        "max_steps": 3,
        "scaling": {"num_workers": 2},
        "telemetry": {"interval": 5, "grace_seconds": 0},
    }


def test_a_rank_s_lines_get_its_prefix_and_logging_goes_through_unchanged():
    sink = io.TextIOWrapper(io.BytesIO(), write_through=True)
    tagged = RankLines(sink, 3)

    def written() -> str:
        return sink.buffer.getvalue().decode()

    print("one", file=tagged)
    tagged.write("two\nthr")
    tagged.write("ee\n")
    handler = logging.StreamHandler(tagged)
    logger = logging.getLogger("test_rank_output")
    logger.addHandler(handler)
    try:
        logger.warning("a log line")
    finally:
        logger.removeHandler(handler)
    tagged.buffer.write(b"raw bytes\n")  # the stream's own buffer: untagged
    tagged.write("no newline")
    assert written() == "[rank 3] one\n[rank 3] two\n[rank 3] three\na log line\nraw bytes\n"
    tagged.finish()
    assert written().endswith("a log line\nraw bytes\n[rank 3] no newline\n")


def forwarded(lines: list[str], is_err: bool = False) -> dict:
    """A batch of one worker's lines as Ray's log monitor hands it to the driver."""
    return {"ip": "10.0.0.1", "pid": 4242, "actor_name": "RayTrainWorker", "is_err": is_err, "lines": lines}


@pytest.mark.parametrize("verbose", [False, True])
def test_the_driver_shows_the_ranks_lines_and_ray_s_only_when_verbose(capsys, verbose):
    output = WorkerOutput()
    output.verbose = verbose
    passed: list[list[str]] = []
    output.ray_printer = lambda data: passed.append(data["lines"])
    output(forwarded(["gradwatch-output-begin gw-1 0", "[rank 0] hello", "Setting up process group"]))
    output(forwarded(["[rank 0] oops", "Failed to query Ray Train Controller actor state."], is_err=True))
    captured = capsys.readouterr()
    assert captured.out == "[rank 0] hello\n" and captured.err == "[rank 0] oops\n"
    ray_lines = [["Setting up process group"], ["Failed to query Ray Train Controller actor state."]]
    assert passed == (ray_lines if verbose else [])


def test_the_driver_waits_for_the_last_lines_of_every_rank_that_began():
    output = WorkerOutput()
    output.ray_printer = None
    output(forwarded(["gradwatch-output-begin gw-2 0", "gradwatch-output-begin gw-2 1"]))
    output(forwarded(["gradwatch-output-end gw-2 0"]))
    output(forwarded(["gradwatch-output-end gw-2 0"], is_err=True))
    assert not output.wait("gw-2", 2, 0.05)  # rank 1's end not seen yet
    output(forwarded(["gradwatch-output-begin gw-3 0", "gradwatch-output-begin gw-3 1"]))
    output(forwarded(["gradwatch-output-end gw-3 0", "gradwatch-output-end gw-3 1"]))
    stderr_ends = forwarded(["gradwatch-output-end gw-3 0", "gradwatch-output-end gw-3 1"], is_err=True)
    late = threading.Timer(0.2, output, [stderr_ends])
    late.start()
    assert output.wait("gw-3", 2, 10)
    late.join()
    assert output.wait("gw-4", None, 0.05)  # a failed job none of whose ranks began waits for nothing
    assert not output.wait("gw-5", 2, 0.05)  # a finished one waits for all its ranks


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gradwatch_run_shows_each_rank_s_prints_and_not_ray_s_noise(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(print_spec()))
    proc = gradwatch_run(spec_file, tmp_path / "runs")
    out, err = run_to_end(proc, timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("\n") == 1, out  # --json: stdout holds the summary alone
    lines = err.splitlines()
    for rank in (0, 1):
        assert f"[rank {rank}] {MARKER}" in lines, err[-3000:]
        assert f"[rank {rank}] {MARKER} (stderr)" in lines, err[-3000:]
        # the last line, written without a newline just before the function returned
        assert f"[rank {rank}] {MARKER} done at step 3" in lines, err[-3000:]
    for noise in ("PlacementGroupCleaner", "RayTrainWorker", "TrainController", "gradwatch-output-"):
        assert noise not in err, err[-3000:]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_built_in_job_s_rank_0_line_is_shown_with_its_rank(tmp_path):
    spec = small_spec(max_steps=4, validation={"every_steps": 4}, checkpoint={"every_steps": 4, "keep": 1})
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    proc = gradwatch_run(spec_file, tmp_path / "runs")
    out, err = run_to_end(proc, timeout=240)
    assert proc.returncode == 0, err[-3000:]
    job_id = json.loads(out)["job_id"]
    started = [line for line in err.splitlines() if f"gradwatch: job {job_id} metrics" in line]
    # gradwatch.start() prints it on rank 0 only (docs/training-api.md)
    assert len(started) == 1 and started[0].startswith(f"[rank 0] gradwatch: job {job_id} metrics"), err[-3000:]
    assert "PlacementGroupCleaner" not in err, err[-3000:]
