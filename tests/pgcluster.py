"""A private PostgreSQL for tests: `initdb` into a temporary folder, served on a free port on 127.0.0.1.

    with postgres_cluster() as pg:
        url = pg.new_database()          # a fresh, empty database per test

The binaries come from Debian's `postgresql` package (`make tools` installs it). PostgreSQL refuses
to run as root, so under root the cluster belongs to the `postgres` system user (`runuser`). A missing
server skips the tests that need it, except under CI=true where it fails them.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.promstack import free_port, wait_for

SYSTEM_USER = "postgres"


def bin_dir() -> Path | None:
    """The newest installed server's binaries (Debian keeps them out of PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def require_bin_dir() -> Path:
    found = bin_dir()
    if found is not None:
        return found
    import pytest  # only reached from tests

    message = "PostgreSQL is not installed: apt-get install -y postgresql (or `make tools`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI=true: a missing server fails instead of skipping)")
    pytest.skip(message)


class PostgresCluster:
    def __init__(self, bindir: Path, root: Path, port: int, as_user: list[str]):
        self.bindir, self.root, self.port, self.as_user = bindir, root, port, as_user
        self.data = root / "data"
        self._names = itertools.count()

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            check=check,
            cwd=self.root,
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SYSTEM_USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"gw_test_{os.getpid()}_{next(self._names)}"
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SYSTEM_USER, name)
        return self.url(name)

    def ready(self) -> bool:
        probe = self.run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q", check=False)
        return probe.returncode == 0


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    bindir = require_bin_dir()
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="gwpg-", dir="/tmp"))  # the socket path must stay short
    if os.geteuid() == 0:
        shutil.chown(root, SYSTEM_USER)
        as_user = ["runuser", "-u", SYSTEM_USER, "--"]
    cluster = PostgresCluster(bindir, root, free_port(), as_user)
    try:
        cluster.run(
            "initdb",
            "-D",
            str(cluster.data),
            "-U",
            SYSTEM_USER,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        )
        started = cluster.run(
            "pg_ctl",
            "-D",
            str(cluster.data),
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {cluster.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            check=False,
        )
        if started.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start exited {started.returncode}: {started.stderr}{log}")
        wait_for(cluster.ready, timeout=60, interval=0.2, what="PostgreSQL")
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster.run("pg_ctl", "-D", str(cluster.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
