"""Service settings: one pydantic-settings object, read from GRADWATCH_* environment variables."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gradwatch.names import DEFAULT_SERVICE_PORT


def default_data_dir() -> Path:
    """~/.gradwatch, or ./.gradwatch where the home folder is not writable."""
    home = Path.home()
    if (home / ".gradwatch").is_dir() or os.access(home, os.W_OK):
        return home / ".gradwatch"
    return Path.cwd() / ".gradwatch"


class Settings(BaseSettings):
    """Everything the service reads from its environment. Unset paths derive from `data_dir`."""

    model_config = SettingsConfigDict(env_prefix="GRADWATCH_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Job store, spec files, saved logs and the API token live here.",
    )
    database_url: str = Field("", description="Any SQLAlchemy URL; default: a SQLite file in data_dir.")
    host: str = Field("127.0.0.1", description="Address the API binds; non-loopback needs a token.")
    port: int = Field(DEFAULT_SERVICE_PORT, ge=0, le=65535)
    token: str | None = Field(None, description="The operator's (admin) bearer token (GRADWATCH_TOKEN).")
    token_file: Path | None = Field(None, description="File with the admin token; default data_dir/token.")
    prometheus_token: str | None = Field(None, description="Prometheus' token (scope targets:read).")
    prometheus_token_file: Path | None = Field(None, description="Default data_dir/prometheus.token.")
    alertmanager_token: str | None = Field(None, description="Alertmanager's token (scope alerts:write).")
    alertmanager_token_file: Path | None = Field(None, description="Default data_dir/alertmanager.token.")
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names the API answers to besides loopback ones and `host` "
        "(e.g. gradwatch.example,10.0.0.5); '*' allows any. Other Host headers get 403 (DNS rebinding).",
    )
    data_roots: str = Field(
        "",
        description="Folders (separated by ':') that specs may read `data.path` from when user code is "
        "off; empty: no data.path at all.",
    )
    max_priority: int = Field(10, ge=-100, le=100, description="Highest priority a non-admin may ask for.")
    max_queued_per_user: int = Field(100, ge=1, description="A user's queued jobs; more get 429.")
    max_queued_jobs: int = Field(1000, ge=1, description="Queued jobs of everyone; more get 429.")
    max_running_per_user: int = Field(16, ge=1, description="A user's running jobs; more wait queued.")
    max_log_followers: int = Field(32, ge=1, description="Open `logs?follow=true` streams of everyone; more get 429.")
    max_log_followers_per_user: int = Field(
        4, ge=1, description="Open `logs?follow=true` streams of one user; more get 429 (the others' share stays)."
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds a connection may take to send a request's headers (the first, or the next on a "
        "kept-alive connection); then it is closed.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Open connections and requests in flight together; past it new requests get 503.",
    )
    worker_memory_bytes: int = Field(
        8 * 1024**3,
        ge=64 * 1024**2,
        description="Memory a worker may use: specs whose model and data are estimated above it are refused.",
    )
    allow_user_code: bool = Field(
        False,
        description="Accept user code in specs: `module:factory` models and data, "
        "and `train.entrypoint` training functions.",
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("GRADWATCH_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray dashboard (Jobs API) address, e.g. http://127.0.0.1:8265.",
    )
    ray_auth_token: str | None = Field(
        None,
        validation_alias=AliasChoices("GRADWATCH_RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN"),
        description="Ray token; default: the file ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH).",
    )
    storage_path: Path | None = Field(None, description="Where drivers write runs; default data_dir/runs.")
    ray_storage_path: str | None = Field(
        None,
        description="The run folder as the Ray nodes see it (a shared filesystem or cloud URI for "
        "checkpoints), when it is not the service's storage_path; drivers push progress over HTTP, so "
        "the service needs no view of it.",
    )
    push_url: str | None = Field(
        None,
        description="The API's address as drivers on the Ray nodes reach it; default the address it binds.",
    )
    poll_interval: float = Field(1.0, gt=0.0, le=60.0, description="Seconds between scheduler passes.")
    scheduler_enabled: bool = Field(True, description="False: accept and store jobs but start none.")
    python: str = Field(sys.executable, description="Interpreter of the Ray job entrypoint (the venv's).")
    driver_module: str = Field("workers.driver", description="Module the entrypoint runs with -m.")
    job_overhead_cpus: float = Field(
        0.0,
        ge=0.0,
        description="CPUs a job needs beyond its workers. Ray Train V2's controller and a job's "
        "entrypoint both ask for 0 CPUs, so the default is 0.",
    )
    terminal_metric_seconds: float = Field(
        600.0, ge=0.0, description="Ended jobs stay in gradwatch_job_state this long."
    )
    stop_grace_seconds: float = Field(30.0, gt=0.0, description="Time a stopped job's workers have to exit.")

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        for root in self.data_root_paths:
            if not root.is_absolute():
                raise ValueError(f"data_roots: {root} is not an absolute path (write e.g. /srv/corpora)")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'gradwatch.db'}"
        if self.storage_path is None:
            self.storage_path = self.data_dir / "runs"
        self.storage_path = self.storage_path.expanduser()
        if self.ray_address in ("auto", "local"):  # ray.init's words for "this machine's cluster"
            self.ray_address = None
        if self.ray_address and "://" not in self.ray_address:
            self.ray_address = f"http://{self.ray_address}"
        return self

    @property
    def runs_dir(self) -> Path:
        assert self.storage_path is not None
        return self.storage_path

    @property
    def driver_storage(self) -> str:
        """The storage path the drivers are given."""
        return self.ray_storage_path or str(self.runs_dir)

    @property
    def driver_url(self) -> str:
        """Where drivers push progress: push_url, else this API's address (0.0.0.0 reached as loopback)."""
        if self.push_url:
            return self.push_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        host = host if ":" not in host else f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def jobs_dir(self) -> Path:
        """Per-job service files: the spec the driver reads and the saved driver log."""
        return self.data_dir / "jobs"

    def token_file_of(self, consumer: str) -> Path:
        """Where `consumer`'s (admin, prometheus, alertmanager) token file is."""
        given = {
            "admin": self.token_file,
            "prometheus": self.prometheus_token_file,
            "alertmanager": self.alertmanager_token_file,
        }[consumer]
        default = self.data_dir / ("token" if consumer == "admin" else f"{consumer}.token")
        return (given or default).expanduser()

    def token_of(self, consumer: str, *, read_file: bool = True) -> str | None:
        """`consumer`'s token: from the environment, else (read_file) from its token file."""
        given = {"admin": self.token, "prometheus": self.prometheus_token, "alertmanager": self.alertmanager_token}[
            consumer
        ]
        if given or not read_file:
            return given or None
        try:
            return self.token_file_of(consumer).read_text().strip() or None
        except OSError:
            return None

    @property
    def host_names(self) -> frozenset[str]:
        """Host header names the API answers to ('*' in it: any)."""
        names = {"127.0.0.1", "localhost", "::1"}
        if self.host not in ("0.0.0.0", "::", ""):
            names.add(self.host.strip("[]").lower())
        for entry in self.allowed_hosts.split(","):
            entry = entry.strip().lower()
            if entry.startswith("["):  # [::1] or [::1]:8765
                entry = entry[1 : entry.find("]")] if "]" in entry else entry
            elif entry.count(":") == 1:  # name:port: the name is what is checked
                entry = entry.split(":")[0]
            if entry:
                names.add(entry)
        return frozenset(names)

    @property
    def data_root_paths(self) -> list[Path]:
        return [Path(p).expanduser() for p in self.data_roots.split(os.pathsep) if p.strip()]

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(settings: Settings) -> None:
    """Refuse an address no allowed Host name can reach: binding beyond loopback needs GRADWATCH_ALLOWED_HOSTS."""
    wildcard = settings.host in ("0.0.0.0", "::", "")
    if wildcard and settings.host_names <= {"127.0.0.1", "localhost", "::1"}:
        raise ValueError(
            f"refusing to bind {settings.host or 'every address'} while only loopback names are allowed: set "
            "GRADWATCH_ALLOWED_HOSTS to the names clients use to reach the API (e.g. "
            "gradwatch.example,10.0.0.5), or bind 127.0.0.1"
        )
