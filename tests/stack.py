"""A local gradwatch stack for integration tests and benchmarks: a Ray head and `gradwatch up`, the API
under uvicorn in a thread, and `gradwatch run` in a subprocess.

The head runs as `ray start --block` in its own session on free ports and is stopped by
signalling that process, not `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.client import Client
from service.scheduler.local_ray import private_ray_head
from tests.promstack import free_port, wait_for

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
TOKEN = "integration-token"


def checkout_on_path() -> str:
    """PYTHONPATH with the checkout first: jobs may name user code from it (tests/, examples/)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


@contextmanager
def ray_head(cpus: int = 2) -> Iterator[str]:
    """A private Ray head for the tests (service/scheduler/local_ray.py), with the checkout on its path."""
    env = {
        **os.environ,
        "PYTHONPATH": checkout_on_path(),
        # On SIGTERM the head drains first, up to 30 s by default (Ray 2.60): nothing here needs draining.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    with private_ray_head(cpus, env=env) as address:
        yield address


class Service:
    """`gradwatch up` in a subprocess that the tests can SIGKILL and start again.

    Without Prometheus and Alertmanager unless `args` says otherwise (the default is `--no-monitoring`).
    """

    def __init__(self, ray_address: str, data_dir: Path, args: Sequence[str] = ("--no-monitoring",)):
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "service.log"
        self.env = {
            **os.environ,
            "RAY_ADDRESS": ray_address,
            "GRADWATCH_TOKEN": TOKEN,
            "GRADWATCH_DATA_DIR": str(data_dir),
            "GRADWATCH_PORT": str(self.port),
            "GRADWATCH_POLL_INTERVAL": "0.5",
        }
        self.process: subprocess.Popen | None = None
        self.client = Client(self.url, TOKEN)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [str(BIN / "gradwatch"), "up", *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200,
            timeout=60,
            what="gradwatch up",
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


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
