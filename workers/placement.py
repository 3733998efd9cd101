"""Where a job's workers run: the placement check before a start, and the nodes they ran on and lost.

`scaling.placement` is a Ray placement group strategy for the worker group (one bundle per worker).
`check_placement` refuses, with numbers, a job the cluster's live nodes can never place, before Ray
Train would wait for it forever. `NodeWatch` (driver side) follows which node each rank runs on and
notices when one of those nodes leaves the cluster, so a restart or a failure can name it.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from gradwatch.spec import JobSpec

STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
NODE_CHECK_SECONDS = 1.0  # how often the driver asks Ray which nodes are alive


class PlacementImpossible(RuntimeError):
    """The live nodes can never hold the worker group as the spec places it."""


def strategy(spec: JobSpec) -> str:
    return STRATEGIES[spec.scaling.placement]


def worker_bundle(spec: JobSpec) -> dict[str, float]:
    """What one worker asks of its node (one placement group bundle)."""
    bundle = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        bundle["GPU"] = spec.scaling.gpus_per_worker
    return bundle


def _fits(bundle: dict[str, float], resources: dict[str, float], times: int = 1) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v * times for k, v in bundle.items())


def _workers_on(bundle: dict[str, float], resources: dict[str, float]) -> int:
    return min(int((resources.get(k, 0.0) + 1e-9) // v) for k, v in bundle.items())


def _describe(bundle: dict[str, float]) -> str:
    return " and ".join(f"{v:g} {k}{'' if v == 1 else 's'}" for k, v in bundle.items())


def check_placement(spec: JobSpec, nodes: list[dict[str, Any]]) -> None:
    """Raise PlacementImpossible when the live `nodes` (as `ray.nodes()` lists them) can never place the job."""
    alive = [n for n in nodes if n.get("Alive")]
    bundle, workers = worker_bundle(spec), spec.scaling.num_workers
    room = [_workers_on(bundle, n.get("Resources") or {}) for n in alive]
    hosts = sum(1 for r in room if r >= 1)
    if hosts == 0:
        raise PlacementImpossible(
            f"no node of the Ray cluster ({len(alive)} alive) has room for one worker ({_describe(bundle)}): "
            "lower scaling.cpus_per_worker/gpus_per_worker, or add a larger node"
        )
    if spec.scaling.placement == "strict_spread" and hosts < workers:
        raise PlacementImpossible(
            f"scaling.placement strict_spread puts each of the {workers} workers on a node of its own, but only "
            f"{hosts} of the cluster's {len(alive)} alive nodes have room for one worker ({_describe(bundle)}): "
            f"lower scaling.num_workers to {hosts}, use placement spread or pack, or add nodes"
        )
    if sum(room) < workers:
        raise PlacementImpossible(
            f"the cluster's {len(alive)} alive nodes hold {sum(room)} workers of {_describe(bundle)} each, "
            f"the job needs {workers}: lower scaling.num_workers or resources per worker, or add nodes"
        )


class NodeWatch:
    """Driver side: the node of each rank, and the nodes that left while they held ranks."""

    def __init__(self, spec: JobSpec, list_nodes: Any = None):
        self.spec = spec
        self._list_nodes = list_nodes or _ray_nodes
        self.ranks_on: dict[str, set[int]] = {}  # node id -> ranks that ever ran there
        self.where: dict[int, str] = {}  # rank -> node id, latest start
        self.addresses: dict[str, str] = {}
        self.lost: list[dict[str, Any]] = []
        self.waiting: str | None = None
        self._checked = 0.0

    def update(self, nodes_by_rank: dict[Any, Any], step: int | None, restarts: int) -> None:
        for rank, node in nodes_by_rank.items():
            if node:
                self.where[int(rank)] = str(node)
                self.ranks_on.setdefault(str(node), set()).add(int(rank))
        now = time.monotonic()
        if now - self._checked < NODE_CHECK_SECONDS:
            return
        self._checked = now
        try:
            nodes = self._list_nodes()
        except Exception:  # Ray busy or restarting: look again at the next tick
            return
        for n in nodes:
            self.addresses[n["NodeID"]] = n.get("NodeManagerAddress", "")
        alive = {n["NodeID"] for n in nodes if n.get("Alive")}
        gone = {n["NodeID"] for n in nodes if not n.get("Alive")}
        lost_ids = {e["node"] for e in self.lost}
        for node, ranks in self.ranks_on.items():
            if node in gone and node not in lost_ids:
                self.lost.append(
                    {
                        "node": node,
                        "address": self.addresses.get(node, ""),
                        "ranks": sorted(r for r, n in self.where.items() if n == node) or sorted(ranks),
                        "step": step,
                        "at": time.time(),
                        "restarts_before": restarts,
                    }
                )
        self.waiting = None
        if self.lost and restarts <= self.lost[-1]["restarts_before"]:
            # The worker group is down and not back yet: say what it waits for, if it can be placed at all.
            last = self.lost[-1]
            try:
                check_placement(self.spec, [n for n in nodes if n["NodeID"] in alive])
                self.waiting = f"restarting after node {last['node']} was lost"
            except PlacementImpossible as exc:
                self.waiting = (
                    f"cannot place the workers since node {last['node']} was lost ({exc}); waiting for a node to join"
                )

    def confirm_loss(self, step: int | None, restarts: int) -> None:
        """After a failure: record nodes that held ranks and are gone, before Ray's health checks say so.

        Ray marks a node dead only after several missed health checks (seconds to tens of seconds); a
        raylet that no longer accepts connections on its port is gone already.
        """
        self._checked = 0.0
        self.update({}, step, restarts)
        try:
            nodes = {n["NodeID"]: n for n in self._list_nodes()}
        except Exception:
            return
        lost_ids = {e["node"] for e in self.lost}
        for node in self.ranks_on:
            info = nodes.get(node)
            if node in lost_ids or info is None or _listening(info):
                continue
            self.lost.append(
                {
                    "node": node,
                    "address": info.get("NodeManagerAddress", ""),
                    "ranks": sorted(r for r, n in self.where.items() if n == node),
                    "step": step,
                    "at": time.time(),
                    "restarts_before": restarts,
                }
            )

    def status(self) -> dict[str, Any]:
        return {
            "nodes": {str(r): n for r, n in sorted(self.where.items())},
            "lost_nodes": [{k: v for k, v in e.items() if k != "restarts_before"} for e in self.lost],
            "waiting": self.waiting,
        }

    def explain(self, reason: str) -> str:
        """A failure's reason, led by the node loss that most likely caused it."""
        if not self.lost:
            return reason
        last = self.lost[-1]
        ranks = ", ".join(str(r) for r in last["ranks"])
        where = f" ({last['address']})" if last["address"] else ""
        return f"node {last['node']}{where} was lost at step {last['step']} (it ran rank {ranks}); {reason}"


def _listening(node: dict[str, Any], timeout: float = 2.0) -> bool:
    """Whether the node's raylet still accepts connections."""
    if not node.get("Alive"):
        return False
    try:
        with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout):
            return True
    except (OSError, KeyError, ValueError):
        return False


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()
