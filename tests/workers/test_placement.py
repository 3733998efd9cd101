"""Placement checks and node tracking, against node lists shaped like `ray.nodes()` (no Ray needed)."""

from __future__ import annotations

import socket

import pytest

from gradwatch.spec import load_spec
from tests.conftest import small_spec
from workers.placement import NodeWatch, PlacementImpossible, check_placement, strategy


def node(node_id: str, cpus: float, alive: bool = True, port: int = 1) -> dict:
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "127.0.0.1",
        "NodeManagerPort": port,
        "Resources": {"CPU": cpus} if cpus else {},
    }


def spec(workers: int = 2, placement: str = "pack", cpus: float = 1.0):
    return load_spec(small_spec(scaling={"num_workers": workers, "cpus_per_worker": cpus, "placement": placement}))


def test_each_placement_maps_to_its_ray_strategy_and_a_wrong_one_is_refused():
    assert [strategy(spec(placement=p)) for p in ("pack", "spread", "strict_spread")] == [
        "PACK",
        "SPREAD",
        "STRICT_SPREAD",
    ]
    with pytest.raises(Exception, match="scaling.placement: Input should be 'pack', 'spread' or 'strict_spread'"):
        spec(placement="scatter")


def test_strict_spread_needs_a_node_per_worker_and_says_how_many_are_missing():
    two_nodes = [node("head", 0), node("a", 2), node("b", 2), node("gone", 8, alive=False)]
    check_placement(spec(2, "strict_spread"), two_nodes)
    with pytest.raises(PlacementImpossible) as refused:
        check_placement(spec(3, "strict_spread", cpus=0.5), two_nodes)
    assert str(refused.value) == (
        "scaling.placement strict_spread puts each of the 3 workers on a node of its own, but only 2 of the "
        "cluster's 3 alive nodes have room for one worker (0.5 CPUs): lower scaling.num_workers to 2, use "
        "placement spread or pack, or add nodes"
    )
    check_placement(spec(3, "spread", cpus=0.5), two_nodes)  # spread may share a node


def test_workers_must_fit_whole_nodes_not_just_the_total():
    # 3 CPUs in all, but 1.5 on each node: two workers of 2 CPUs cannot be placed anywhere
    with pytest.raises(
        PlacementImpossible,
        match=r"no node of the Ray cluster \(2 alive\) has room for one worker "
        r"\(2 CPUs\)",
    ):
        check_placement(spec(2, cpus=2), [node("a", 1.5), node("b", 1.5)])
    with pytest.raises(
        PlacementImpossible, match="the cluster's 2 alive nodes hold 2 workers of 1 CPU each, the job needs 3"
    ):
        check_placement(spec(3), [node("a", 1.5), node("b", 1.5)])


def test_node_watch_names_the_lost_node_its_ranks_and_what_the_restart_waits_for():
    nodes = [node("head", 0), node("a", 2), node("b", 2)]
    watch = NodeWatch(spec(2, "strict_spread"), list_nodes=lambda: nodes)
    watch.update({0: "a", 1: "b"}, step=10, restarts=0)
    assert watch.status() == {"nodes": {"0": "a", "1": "b"}, "lost_nodes": [], "waiting": None}
    nodes[2] = node("b", 2, alive=False)
    watch._checked = 0.0
    watch.update({}, step=42, restarts=0)
    status = watch.status()
    assert [(n["node"], n["ranks"], n["step"]) for n in status["lost_nodes"]] == [("b", [1], 42)]
    assert status["waiting"].startswith(
        "cannot place the workers since node b was lost (scaling.placement "
        "strict_spread puts each of the 2 workers on a node of its own"
    )
    assert watch.explain("gloo: Connection reset").startswith(
        "node b (127.0.0.1) was lost at step 42 (it ran rank 1); gloo: Connection reset"
    )
    nodes.append(node("c", 2))  # a node joins: the group can be placed again, and then is
    watch._checked = 0.0
    watch.update({}, step=42, restarts=0)
    assert watch.status()["waiting"] == "restarting after node b was lost"
    watch._checked = 0.0
    watch.update({0: "a", 1: "c"}, step=43, restarts=1)
    assert watch.status()["waiting"] is None and watch.status()["nodes"] == {"0": "a", "1": "c"}


def test_after_a_failure_a_raylet_that_stopped_listening_counts_as_lost_before_ray_says_so():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        up = listening.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            down = closed.getsockname()[1]  # bound, never listening: connections are refused
            nodes = [node("a", 2, port=up), node("b", 2, port=down)]
            watch = NodeWatch(spec(), list_nodes=lambda: nodes)
            watch.update({0: "a", 1: "b"}, step=5, restarts=0)
            assert watch.status()["lost_nodes"] == []  # Ray still counts b alive
            watch.confirm_loss(step=7, restarts=0)
    assert [(n["node"], n["ranks"], n["step"]) for n in watch.status()["lost_nodes"]] == [("b", [1], 7)]
    assert watch.explain("boom") == "node b (127.0.0.1) was lost at step 7 (it ran rank 1); boom"
