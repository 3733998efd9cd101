"""The ranks' own output: every job's train function (a `train.entrypoint` and the built-in loop) runs
inside `rank_output`, so what it writes to stdout and stderr reaches the worker's log as
`[rank N] line`, the lines the driver shows (workers/driver.WorkerOutput). What a logging handler
writes there (Ray's, Ray Train's and gradwatch's own logs) stays as it is.

Kept free of torch and Ray Train at import: the driver imports it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

RANK_PREFIX = "[rank {rank}] "
RANK_LINE = re.compile(r"\[rank \d+\] ")
# a rank's first line on stdout, and each stream's last: the driver waits for the last lines of every
# rank that began before it shuts Ray down
OUTPUT_MARK = "gradwatch-output-{what} {job_id} {rank}"
OUTPUT_MARK_LINE = re.compile(r"gradwatch-output-(?P<what>begin|end) (?P<job>\S+) (?P<rank>\d+)")
_LOGGING_SOURCE = logging.__file__


class RankLines(io.TextIOBase):
    """A text stream that writes each complete line to `stream` as `[rank N] line`; what a logging
    handler writes (its caller is logging's own code) goes through unchanged."""

    def __init__(self, stream: TextIO, rank: int):
        super().__init__()
        self.stream, self.prefix = stream, RANK_PREFIX.format(rank=rank)
        self.partial = ""
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if sys._getframe(1).f_code.co_filename == _LOGGING_SOURCE:
            self.stream.write(text)
            return len(text)
        with self.lock:
            lines = (self.partial + text).split("\n")
            self.partial = lines.pop()
            if lines:
                self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        """Write out a last line left without its newline."""
        with self.lock:
            if self.partial:
                self.stream.write(f"{self.prefix}{self.partial}\n")
                self.partial = ""
            self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    def __getattr__(self, name: str) -> Any:  # `buffer` and the like: the stream's own, untagged
        if name == "stream":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


@contextlib.contextmanager
def rank_output(job_id: str, rank: int) -> Iterator[None]:
    """While open, this rank's own stdout and stderr lines are written as `[rank N] line`; before, a
    `begin` line on stdout, at the end an `end` line on each stream (OUTPUT_MARK), the signs for the
    driver of which ranks' output it still waits for."""
    out, err = sys.stdout, sys.stderr
    out.write(OUTPUT_MARK.format(what="begin", job_id=job_id, rank=rank) + "\n")
    out.flush()
    tagged = RankLines(out, rank), RankLines(err, rank)
    sys.stdout, sys.stderr = tagged
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        for stream in tagged:
            stream.finish()
            stream.stream.write(OUTPUT_MARK.format(what="end", job_id=job_id, rank=rank) + "\n")
            stream.stream.flush()


def with_rank_output(per_worker: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """`per_worker` (a job's train function for Ray Train, given the job's config) run inside
    `rank_output`, with the rank Ray Train gives the worker."""

    def train_function(config: dict[str, Any]) -> None:
        import ray.train

        with rank_output(config["job_id"], ray.train.get_context().get_world_rank()):
            per_worker(config)

    return train_function
