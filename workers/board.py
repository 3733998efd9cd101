"""The job board: where a job's workers post progress, endpoints and events for the driver.

Under Ray it is a named actor (`gradwatch` namespace, one per job) owned by the
driver, so it outlives worker-group restarts and dies with the driver. Without
Ray, the same class is used directly. Workers post fire-and-forget through
`BoardClient`'s typed methods.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "gradwatch"


def board_name(job_id: str) -> str:
    return f"board-{job_id}"


class JobBoard:
    def __init__(self, job_id: str):
        self.job_id = job_id
        self.progress: dict[str, Any] = {}
        self.endpoints: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.ranks: dict[int, dict[str, Any]] = {}
        self.nodes: dict[int, str] = {}  # rank -> Ray node id of its latest start
        self.heartbeats: dict[int, dict[str, Any]] = {}  # rank -> its latest heartbeat (workers/heartbeat.py)
        self.final: dict[str, Any] = {}
        self.starts = 0
        self.rollbacks = 0
        self.updated_at = time.time()
        self.trainer: Any = None  # Ray Train's controller actor once it started (trainer_on_board)

    # ---- written by workers
    def started(self, rank: int, resumed_step: int | None, node: str | None = None) -> None:
        if node:
            self.nodes[rank] = node
        if rank == 0:
            self.starts += 1
            self.progress["resumed_step"] = resumed_step

    def post_progress(self, progress: dict[str, Any]) -> None:
        self.progress.update(progress)
        self.updated_at = time.time()

    def post_heartbeat(self, rank: int, heartbeat: dict[str, Any]) -> None:
        self.heartbeats[rank] = heartbeat

    def post_endpoint(self, rank: int, host: str, port: int, pid: int | None = None) -> None:
        self.endpoints[rank] = {"rank": rank, "host": host, "port": port, "pid": pid}

    def drop_endpoint(self, rank: int) -> None:
        self.endpoints.pop(rank, None)

    def post_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event.get("kind") == "rollback":
            self.rollbacks += 1

    def post_rank_report(self, rank: int, report: dict[str, Any]) -> None:
        self.ranks[rank] = report

    def post_final(self, final: dict[str, Any]) -> None:
        self.final = final

    # ---- written by Ray Train's controller (workers.driver.trainer_on_board), read by the driver
    def set_trainer(self, controller: Any) -> None:
        self.trainer = controller

    def get_trainer(self) -> Any:
        """The controller's actor handle, or None before it started."""
        return self.trainer

    # ---- read by the driver
    def snapshot(self, since_event: int = 0) -> dict[str, Any]:
        return {
            "progress": dict(self.progress),
            "endpoints": [{**self.endpoints[r], "node": self.nodes.get(r)} for r in sorted(self.endpoints)],
            "nodes": dict(self.nodes),
            "heartbeats": {r: dict(h) for r, h in self.heartbeats.items()},
            "events": self.events[since_event:],
            "n_events": len(self.events),
            "restarts": max(0, self.starts - 1),
            "rollbacks": self.rollbacks,
            "final": dict(self.final),
            "ranks": dict(self.ranks),
            "updated_at": self.updated_at,
        }


class BoardClient:
    """What a worker holds: one typed method per board call, sent to the actor without waiting for it."""

    def __init__(self, target: Any, remote: bool):
        self._target, self._remote = target, remote

    @classmethod
    def connect(cls, job_id: str) -> BoardClient | None:
        import ray

        try:
            return cls(ray.get_actor(board_name(job_id), namespace=NAMESPACE), remote=True)
        except ValueError:
            return None

    def _send(self, method: Any, *args: Any) -> None:
        """Call `method` of the board (an actor method: sent, not waited for)."""
        if self._remote:
            method.remote(*args)
        else:
            method(*args)

    def started(self, rank: int, resumed_step: int | None, node: str | None = None) -> None:
        self._send(self._target.started, rank, resumed_step, node)

    def post_progress(self, progress: dict[str, Any]) -> None:
        self._send(self._target.post_progress, progress)

    def post_heartbeat(self, rank: int, heartbeat: dict[str, Any]) -> None:
        self._send(self._target.post_heartbeat, rank, heartbeat)

    def post_endpoint(self, rank: int, host: str, port: int, pid: int | None = None) -> None:
        self._send(self._target.post_endpoint, rank, host, port, pid)

    def drop_endpoint(self, rank: int) -> None:
        self._send(self._target.drop_endpoint, rank)

    def post_event(self, event: dict[str, Any]) -> None:
        self._send(self._target.post_event, event)

    def post_rank_report(self, rank: int, report: dict[str, Any]) -> None:
        self._send(self._target.post_rank_report, rank, report)

    def post_final(self, final: dict[str, Any]) -> None:
        self._send(self._target.post_final, final)


def create_board_actor(job_id: str):
    """Start the board for a job (driver side). Needs a connected Ray."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0)(JobBoard)
    # On the driver's node: the board must outlive the loss of any node that runs workers.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return actor_cls.options(
        name=board_name(job_id), namespace=NAMESPACE, get_if_exists=True, scheduling_strategy=here
    ).remote(job_id)
