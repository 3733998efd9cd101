"""A local gradwatch stack for integration tests: a Ray head and `gradwatch up` (service/scheduler/local_ray.py
and service/stack/supervisor.py, configured for the tests), the API under uvicorn in a thread, and
`gradwatch run` in a subprocess.

The head runs as `ray start --block` in its own session on free ports and is stopped by
signalling that process, not `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.scheduler.local_ray import private_ray_head
from service.stack.supervisor import ServiceProcess, free_port, wait_for

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TOKEN = "integration-token"
POLL_INTERVAL = "0.5"  # GRADWATCH_POLL_INTERVAL of the tests' service: seconds between its looks at Ray
KILLED_OUTPUT_S = 10.0  # run_to_end: the output a killed process left, read for at most this long


def checkout_on_path() -> str:
    """PYTHONPATH with the checkout first: jobs may name user code from it (tests/, examples/)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@contextmanager
def ray_head(cpus: int = 2) -> Iterator[str]:
    """A private Ray head for the tests (service/scheduler/local_ray.py), with the checkout on its path."""
    with private_ray_head(cpus, env={**os.environ, "PYTHONPATH": checkout_on_path()}) as address:
        yield address


class Service(ServiceProcess):
    """`gradwatch up` in a subprocess that the tests can SIGKILL and start again (service/stack/supervisor.py's
    ServiceProcess), on the Ray at `ray_address`, with the tests' token and a short poll interval.

    Without Prometheus and Alertmanager unless `args` says otherwise (the default is `--no-monitoring`).
    """

    def __init__(self, ray_address: str, data_dir: Path, args: Sequence[str] = ("--no-monitoring",)):
        env = {**os.environ, "RAY_ADDRESS": ray_address, "GRADWATCH_POLL_INTERVAL": POLL_INTERVAL}
        super().__init__(data_dir, args, env=env, token=TOKEN)


@contextmanager
def serve_app(app) -> Iterator[str]:
    """A FastAPI app under uvicorn in a thread on a free 127.0.0.1 port: its base URL, healthy."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, timeout=20, what="uvicorn")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def launch(args: Sequence[str], cwd: Path = REPO, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """`python ARGS` on a fresh local Ray of its own (RAY_ADDRESS left out), the checkout on its
    PYTHONPATH; stdout (and stderr, unless `stderr` says otherwise) piped as text."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = checkout_on_path()
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def gradwatch_run(spec_file: Path, storage_path: Path, sd_file: Path | None = None) -> subprocess.Popen[str]:
    """`gradwatch run SPEC --json` (as `python -m service.cli.main`) with its runs under `storage_path` and,
    given `sd_file`, its ranks' scrape targets written there; the result is stdout's last line."""
    sd = ["--prometheus-sd-file", str(sd_file)] if sd_file else []
    return launch(["-m", "service.cli.main", "run", str(spec_file), "--json", *sd, "--storage-path", str(storage_path)])


def run_to_end(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of `proc` once it has exited; killed and reaped whatever happens, and after
    `timeout` seconds a TimeoutError with the end of its stderr."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            _, err = proc.communicate(timeout=KILLED_OUTPUT_S)
        except subprocess.TimeoutExpired:  # a child of its own still holds the pipes
            err = ""
        raise TimeoutError(
            f"{proc.args!r} still ran after {timeout:.0f} s and was killed; its stderr ends:\n{(err or '')[-3000:]}"
        ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
