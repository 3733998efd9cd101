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
    token: str | None = Field(None, description="Bearer token the API requires (GRADWATCH_TOKEN).")
    allow_user_code: bool = Field(False, description="Accept user code in specs: `module:factory` models and data, "
                                               "and `train.entrypoint` training functions.")
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
    def jobs_dir(self) -> Path:
        """Per-job service files: the spec the driver reads and the saved driver log."""
        return self.data_dir / "jobs"

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
    """Refuse to expose an API without a token beyond this machine."""
    if not settings.token and not is_loopback(settings.host):
        raise ValueError(
            f"refusing to bind {settings.host} without a token: set GRADWATCH_TOKEN "
            "(anyone who can reach the port could run code on your cluster)"
        )
