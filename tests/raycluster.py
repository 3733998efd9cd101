"""A Ray cluster of several nodes on this one machine, with Ray's own `ray.cluster_utils.Cluster`.

The head holds no CPUs: drivers, Ray Train's controller and the job boards (0 CPUs each) run
there, and every training worker runs on a worker node. Worker nodes have logical CPUs that the
machine's cores are shared among, so a 2-node job fits a 2-core machine. Each node is its own
raylet with its own processes; `remove_node` kills all of them at once, as when a machine dies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.scheduler.local_ray import ray_token
from tests.promstack import free_port, wait_for

# Workers import the tests' user code (tests/workers/user_code.py) by module path.
NODE_ENV = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_AUTH_MODE": "token"}
# Ray marks a silent node dead after this many missed checks of this period (defaults: 5 x 3 s).
HEALTH_CHECK = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}


class MultiNodeRay:
    """The cluster: `.address` for ray.init, `.dashboard` for the Jobs API (what the service uses)."""

    def __init__(self, cluster: Any, dashboard: str, cpus_per_node: float):
        self.cluster, self.dashboard, self.cpus_per_node = cluster, dashboard, cpus_per_node
        self.address = cluster.address

    @property
    def worker_nodes(self) -> dict[str, Any]:
        """Node id -> Ray's node object, for every worker node now in the cluster."""
        return {node.node_id: node for node in self.cluster.worker_nodes}

    def add_node(self) -> str:
        node = self.cluster.add_node(
            num_cpus=self.cpus_per_node, dashboard_agent_listen_port=free_port(), env_vars=NODE_ENV
        )
        self.wait_alive(len(self.worker_nodes) + 1)
        return node.node_id

    def remove_node(self, node_id: str) -> None:
        """Kill the node's raylet and every process on it without warning (SIGKILL)."""
        self.cluster.remove_node(self.worker_nodes[node_id], allow_graceful=False)

    def alive_nodes(self) -> set[str]:
        """Node ids the cluster's GCS counts alive (the head included)."""
        return {n["NodeID"] for n in self.cluster.global_state.node_table() if n["Alive"]}

    def wait_alive(self, count: int, timeout: float = 60) -> set[str]:
        """Wait until exactly `count` nodes (the head included) are alive."""

        def alive() -> set[str] | None:
            now = self.alive_nodes()
            return now if len(now) == count else None

        return wait_for(alive, timeout=timeout, interval=0.5, what=f"{count} alive Ray nodes")

    def restore(self, workers: int) -> None:
        """Back to `workers` worker nodes after a test removed some."""
        while len(self.worker_nodes) < workers:
            self.add_node()


def _put_back(path: Path, text: str | None) -> None:
    try:
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text)
    except OSError:
        pass


@contextmanager
def multi_node_ray(workers: int = 2, cpus_per_node: float = 2) -> Iterator[MultiNodeRay]:
    """A head (0 CPUs, dashboard and Jobs API on 127.0.0.1) and `workers` worker nodes."""
    import ray._private.utils
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private.authentication import authentication_token_setup as auth

    # Token auth on, as `ray start` turns it on, for every node, driver and client alike; this
    # process caches the mode, so it is switched Ray's way, not by the environment variable alone.
    if ray_token() is None:
        auth.generate_and_save_token()
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    auth._enable_token_auth()
    temp_dir = tempfile.mkdtemp(prefix="gwmn-", dir="/tmp")  # Ray's socket paths must stay short
    dashboard_port = free_port()
    shared = Path(ray._private.utils.get_ray_address_file(None))
    before = shared.read_text() if shared.exists() else None
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "gcs_server_port": free_port(),
                "ray_client_server_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "temp_dir": temp_dir,
                "_system_config": HEALTH_CHECK,
                "env_vars": NODE_ENV,
            },
        )
        # Job drivers find their cluster in `<temp dir>/ray_current_cluster`; Cluster writes only the
        # machine-wide default file, which other Rays on this machine read: write ours, give theirs back.
        ray._private.utils.write_ray_address(cluster.address, temp_dir)
        _put_back(shared, before)
        nodes = MultiNodeRay(cluster, f"http://127.0.0.1:{dashboard_port}", cpus_per_node)
        headers = {"Authorization": f"Bearer {ray_token()}"}

        def dashboard_ready() -> bool:
            body = httpx.get(f"{nodes.dashboard}/api/cluster_status", headers=headers, timeout=5).json()
            return bool(((body.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport"))

        for _ in range(workers):
            nodes.add_node()
        wait_for(dashboard_ready, timeout=120, interval=1, what="the Ray dashboard")
        yield nodes
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved_mode != "token":
            if saved_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = saved_mode
            auth.Config.initialize("")
