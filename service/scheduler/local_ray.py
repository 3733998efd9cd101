"""The Ray cluster on this machine and its token: what `gradwatch up` starts and reuses, and a private head
(free ports, its own session and folder, stopped by a signal) for the tests and the benches.

`ray_token()` is the one place the cluster token is read; `ray_environment()` is what a head started
here may see of the caller's environment (never the service's own tokens).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from gradwatch.names import DEFAULT_RAY_DASHBOARD_PORT
from service.settings import Settings
from service.stack.supervisor import free_port

# What a local Ray head gets from the service's environment: what Ray, Python and the GPUs need,
# never the service's own tokens.
RAY_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "TZ",
        "TMPDIR",
        "TERM",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "OMP_NUM_THREADS",
    }
)
RAY_ENV_PREFIXES = ("RAY_", "LC_", "CUDA_", "NVIDIA_", "NCCL_", "GLOO_", "TORCH_")


def ray_token(settings: Settings | None = None) -> str | None:
    """The Ray cluster token: setting/RAY_AUTH_TOKEN, else RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if settings is not None and settings.ray_auth_token:
        return settings.ray_auth_token
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def dashboard_alive(address: str, token: str | None) -> bool:
    return probe_dashboard(address, token)[0] == "ours"


def probe_dashboard(address: str, token: str | None) -> tuple[str, str]:
    """("ours", ""), ("foreign", Ray's answer) when it refuses `token`, or ("none", "") when nothing answers."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(f"{address.rstrip('/')}/api/version", headers=headers, timeout=3)
    except httpx.HTTPError:
        return "none", ""
    if response.status_code in (401, 403):
        return "foreign", response.text.strip()[:200]
    return ("ours", "") if response.status_code == 200 else ("none", "")


def ray_token_source() -> str:
    """Where ray_token() reads the token, in the user's words."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def foreign_ray_error(where: str, answer: str = "", local: bool = True) -> str:
    """The error for a Ray cluster that runs but does not take our token, with the ways out."""
    ours = f"the token in {ray_token_source()}" if ray_token() else f"no token ({ray_token_source()} is missing)"
    answer = f" ({answer})" if answer else ""
    return f"a Ray cluster already runs {where} and refused {ours}{answer}. Either " + _ways_out(local)


def _ways_out(local: bool, address: str = "") -> str:
    use = f"RAY_ADDRESS={address} " if address else ""
    ways = f"reuse it: {use}RAY_AUTH_TOKEN=<its token> gradwatch up (or write its token to {ray_token_source()})"
    if local:
        ways += (
            ", or stop it: `ray stop` (it ends every Ray cluster of this user on this machine), then "
            "`gradwatch up` starts a new one"
        )
    return ways


def ray_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of `environ` a local Ray head (and every job it runs) may see: RAY_ENV_NAMES and
    RAY_ENV_PREFIXES, so the service's tokens and other secrets stay out of it."""
    return {k: v for k, v in environ.items() if k in RAY_ENV_NAMES or k.startswith(RAY_ENV_PREFIXES)}


def local_ray_address(dashboard_port: int = DEFAULT_RAY_DASHBOARD_PORT) -> str:
    """The dashboard address of a Ray head on this machine."""
    return f"http://127.0.0.1:{dashboard_port}"


def start_local_ray(
    log_file: Path,
    *,
    dashboard_port: int = DEFAULT_RAY_DASHBOARD_PORT,
    num_cpus: int | None = None,
    wait_s: float = 90.0,
) -> str:
    """`ray start --head` on this machine with token auth; returns the dashboard address.

    The cluster outlives the service on purpose: a restarted service finds its jobs still running.
    """
    address = local_ray_address(dashboard_port)
    env = {**ray_environment(os.environ), "RAY_AUTH_MODE": "token"}
    ray_bin = _ray_bin()
    _ensure_token(ray_bin, env)
    command = [
        ray_bin,
        "start",
        "--head",
        "--dashboard-host",
        "127.0.0.1",
        "--disable-usage-stats",
        "--dashboard-port",
        str(dashboard_port),
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        offset = out.tell()
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log_file, "rb") as f:
            f.seek(offset)
            running = re.search(r"but is already running at (\S+?)\.?\s", f.read().decode(errors="replace"))
        if running:
            raise RuntimeError(
                f"a Ray cluster already runs on this machine (GCS {running[1]}) without a dashboard at "
                f"{address}. Either " + _ways_out(True, "http://127.0.0.1:<its dashboard port>")
            )
        raise RuntimeError(f"`ray start` failed (exit {done.returncode}); see {log_file}")
    deadline = time.time() + wait_s
    while time.time() < deadline:
        if dashboard_alive(address, ray_token()):
            return address
        time.sleep(1.0)
    raise RuntimeError(f"Ray's dashboard did not answer at {address} within {wait_s:.0f} s; see {log_file}")


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ensure_token(ray_bin: str, env: Mapping[str, str]) -> None:
    """Generate the cluster token (`ray get-auth-token --generate`) when there is none yet."""
    if ray_token() is None:
        subprocess.run(
            [ray_bin, "get-auth-token", "--generate"],
            env=dict(env),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


@contextmanager
def private_ray_head(
    cpus: int,
    *,
    env: Mapping[str, str] | None = None,
    prefix: str = "gwray-",
    ready_s: float = 120.0,
    stop_s: float = 90.0,
) -> Iterator[str]:
    """`ray start --head --block` with token auth on free ports, in its own session and temporary folder;
    yields its dashboard address once the head reports its nodes' load, and stops it by signalling it
    (never `ray stop`, which would end every Ray cluster of this user). `env`: the head's environment
    (default this process's), with token auth and usage stats off added, and no drain on SIGTERM unless
    `env` sets RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S."""
    head_env = {
        # On SIGTERM a head drains first, up to 30 s by default (Ray 2.60): a private head has nothing to drain.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        **(os.environ if env is None else env),
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray_bin = _ray_bin()
    _ensure_token(ray_bin, head_env)
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray's socket paths must stay short
    dashboard_port = free_port()
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [
                ray_bin,
                "start",
                "--head",
                "--block",
                f"--num-cpus={cpus}",
                "--disable-usage-stats",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}",
                f"--port={free_port()}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--temp-dir={temp_dir}",
            ],
            env=head_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        address = local_ray_address(dashboard_port)
        headers = {"Authorization": f"Bearer {ray_token()}"}
        try:
            deadline = time.monotonic() + ready_s
            while True:
                if head.poll() is not None:
                    raise RuntimeError(f"ray start exited {head.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    body = httpx.get(f"{address}/api/cluster_status", headers=headers, timeout=5).json()
                except (OSError, httpx.HTTPError, ValueError):
                    body = {}
                if ((body.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport"):
                    break
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the Ray head did not report its nodes within {ready_s:.0f} s; see {log_path}")
                time.sleep(0.5)
            yield address
        finally:
            head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
            try:
                head.wait(timeout=stop_s)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()


__all__ = [
    "RAY_ENV_NAMES",
    "RAY_ENV_PREFIXES",
    "dashboard_alive",
    "foreign_ray_error",
    "local_ray_address",
    "private_ray_head",
    "probe_dashboard",
    "ray_environment",
    "ray_token",
    "ray_token_source",
    "start_local_ray",
]
