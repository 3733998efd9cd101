"""What telemetry costs a training step: the same job with telemetry off, default and every-step.

One run measures all three side by side, so machine noise hits them alike: every
rank builds three Trainers from one spec (telemetry off, the default interval,
interval 1 = per-layer statistics every step) and calls their `train_step` in
rounds, rotating the order through every permutation (ABC, ACB, BAC, ...).
By default the ranks are 2 Ray Train workers (real DDP over gloo, real comm hook);
each DDP model has its own reducer, so the three share the process group safely.

    python bench/telemetry_overhead.py                      # 2 Ray Train workers on CPU
    python bench/telemetry_overhead.py --local              # this process alone, no Ray
    python bench/telemetry_overhead.py --model transformer  # char-transformer: more layers
    python bench/telemetry_overhead.py --device cuda        # 1 GPU worker (NCCL under Ray)

The user-API path (`--path user`, or `both`, the default) measures a user's own loop the
same way: the loop with `gradwatch.start()`'s `run.backward()` and watched optimizer, at the default
interval and every step, against two baselines: the same loop on the API with telemetry off
(`api_off`, the built-in path's own baseline: guard, detectors, no per-layer statistics, no /metrics)
and the loop in plain PyTorch (`loss.backward()`: everything gradwatch adds). Beside them it measures
`guard_only`: the plain loop with the least an update guard decided on all-reduced values needs,
written by hand and with no telemetry, a floor under any guarded step (`UserLoop`).

The last line is `overhead_default=R1 overhead_every_step=R2 user_overhead_default=R3
user_overhead_every_step=R4 user_guard_only=R5 user_telemetry_default=R6 user_telemetry_every_step=R7`:
median step time against telemetry off (built-in: R1, R2), plain PyTorch (user: R3-R5) or the same
loop on the API with telemetry off (user: R6, R7). Goal: <= 1.02 at the default, <= 1.10 every step.
`--path parts` measures what two parts of the default telemetry cost, the same way: the heartbeat (each
phase mark of a step and the thread that posts it once a second) and the system sampler (its thread, every
telemetry.system_interval s), with and without each and at the sampler's shortest interval. Every parts
config posts to an in-process job board, so only the part differs. Its last line is `heartbeat_cost=R1
system_cost=R2 heartbeat_and_system_cost=R3 system_min_interval_cost=R4` (paired median ratios) and it
writes its section of bench/RESULTS.md; the other paths write the `telemetry-overhead-MODEL` section.
On a busy shared machine, `--clock cpu` (process CPU time) is far steadier than
wall time, but it does not see time spent waiting for other ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not a package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from gradwatch.spec import JobSpec, load_spec  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "off": {"enabled": False},
    "default": {},  # the spec's own default interval
    "every_step": {"interval": 1},
}
EXAMPLE = {"mlp": "digits-mlp.yaml", "transformer": "charlm.yaml"}
# The user path's reference: the cheapest update guard decided on all-reduced values that a loop can do
# by hand, with no telemetry (see UserLoop). What it costs is a floor under any guarded step.
GUARD_ONLY = "guard_only"
# The user path with the training API and telemetry off: the built-in path's own baseline (the guard, the
# loss riding on DDP's all-reduce, the detectors, no per-layer statistics, no /metrics).
API_OFF = "api_off"
GUARD_LOSS_BATCH = 16  # its loss mean: one all-reduce of this many steps' losses
GOALS = {"default": 1.02, "every_step": 1.10}
# --path parts: the default telemetry with and without the heartbeat and the system sampler.
PARTS: dict[str, dict[str, Any]] = {
    "default": {},  # both, at the spec's default system_interval
    "no_heartbeat": {},  # the heartbeat's phase marks made no-ops, its posting thread never started
    "no_system": {"system_interval": 0},
    "neither": {"system_interval": 0},
    "system_min": {"system_interval": 0.05},  # the sampler at its shortest interval (MIN_INTERVAL_S)
}
NO_HEARTBEAT = {"no_heartbeat", "neither"}
# Each cost: (config, the config without that part).
PART_COSTS = {
    "heartbeat_cost": ("default", "no_heartbeat"),
    "system_cost": ("default", "no_system"),
    "heartbeat_and_system_cost": ("default", "neither"),
    "system_min_interval_cost": ("system_min", "no_system"),
}


def base_spec(model: str, rounds: int, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The example job of that model, long enough for the rounds, on `world_size` workers."""
    spec = load_spec(REPO / "examples" / EXAMPLE[model], user_code="skip").model_dump(mode="json")
    spec.update(max_steps=rounds + 1, timeout=None, name=f"bench-{model}")
    spec["schedule"]["warmup_steps"] = min(spec["schedule"]["warmup_steps"], rounds // 2)
    spec["scaling"].update(num_workers=world_size, use_gpu=use_gpu)
    spec["telemetry"]["grace_seconds"] = 0
    return spec


def config_spec(spec: dict[str, Any], name: str, path: str = "builtin") -> JobSpec:
    if path == "parts":
        telemetry = {**spec["telemetry"], **PARTS[name]}
        return JobSpec.model_validate({**spec, "telemetry": telemetry}, context={"user_code": "skip"})
    telemetry = {k: v for k, v in spec["telemetry"].items() if k not in ("enabled", "interval")}
    config = CONFIGS["off" if name in (GUARD_ONLY, API_OFF) else name]
    return JobSpec.model_validate({**spec, "telemetry": {**telemetry, **config}}, context={"user_code": "skip"})


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class UserLoop:
    """A step as a user writes it in their own loop: plain PyTorch ("off"), or the same with the training
    API (`run.backward` instead of `loss.backward()`, the watched optimizer) at the config's cadence
    (API_OFF: the API with telemetry off).

    GUARD_ONLY is plain PyTorch with the least a guard needs, written by hand: DDP's own C++ all-reduce
    (no comm hook), the backward seeded with 1 (NaN when the loss is not finite, so one rank's bad loss
    poisons every rank's reduced gradient and all ranks decide alike), one fused norm of the reduced
    gradient and one copy to the host; the loss mean all-reduced every GUARD_LOSS_BATCH steps. No metrics,
    no detectors, no history.
    """

    def __init__(self, spec: JobSpec, session: Any, name: str):
        from workers.data import build_data
        from workers.models import build_model
        from workers.optim import build_optimizer
        from workers.training import Run

        if spec.model is None or spec.data is None:
            raise ValueError(f"spec {spec.name}: the benchmark's loop needs a model and data section")
        torch.manual_seed(spec.seed)
        data = build_data(spec.data, spec.seed)
        self.task = data.task
        self.model = session.prepare_model(build_model(spec.model, data))
        self.optimizer: Any = build_optimizer(spec.optimizer, self.model.parameters())
        self.run = None
        self.guard_only = name == GUARD_ONLY
        self._losses: list[torch.Tensor] = []
        if name not in ("off", GUARD_ONLY):
            self.run = Run(session, spec, job_id=f"bench-user-{name}", serve_metrics=False)
            self.optimizer = self.run.watch(self.model, self.optimizer)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        from workers.models import loss_and_correct

        loss, _ = loss_and_correct(self.task, self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.guard_only:
            self._guarded_step(loss)
            return
        if self.run is None:
            loss.backward()
        else:
            self.run.backward(loss, samples=len(x))
        self.optimizer.step()

    def _guarded_step(self, loss: torch.Tensor) -> None:
        import torch.distributed as dist

        value = loss.detach()
        loss.backward(value * 0 + 1)
        norms = torch._foreach_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        values = torch.stack([value, *norms]).tolist()
        self._losses.append(value)
        if len(self._losses) == GUARD_LOSS_BATCH and dist.is_initialized():
            dist.all_reduce(torch.stack(self._losses))
            self._losses = []
        if all(math.isfinite(v) for v in values):
            self.optimizer.step()


def measure(
    spec: dict[str, Any], session: Any, rounds: int, warmup: int, clock: str = "wall", path: str = "builtin"
) -> dict[str, list[float]]:
    """Seconds of each config's step, `rounds - warmup` each, interleaved round by round.

    `path` builtin: the built-in loop's `Trainer.train_step`; user: a user's own loop (`UserLoop`); parts:
    the built-in loop with and without the heartbeat and the system sampler (PARTS).
    """
    from workers.loop import Trainer

    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # three trainers' detector events: noise here
    if path == "parts":
        return measure_parts(spec, session, rounds, warmup, clock)
    names = list(CONFIGS) + ([GUARD_ONLY, API_OFF] if path == "user" else [])
    # No board, no metrics server: each Trainer owns its registry, nothing leaves the process.
    trainers: dict[str, Any] = {n: Trainer(config_spec(spec, n), session, job_id=f"bench-{n}") for n in names}
    batches = {n: t.batches() for n, t in trainers.items()}
    if path == "user":
        trainers = {n: UserLoop(config_spec(spec, n), session, n) for n in names}
    return interleave(trainers, batches, session, rounds, warmup, clock)


def interleave(
    trainers: dict[str, Any], batches: dict[str, Any], session: Any, rounds: int, warmup: int, clock: str
) -> dict[str, list[float]]:
    """Each trainer's step times, round by round, the order rotating through every permutation."""
    names = list(trainers)
    device = session.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = CLOCKS[clock]
    orders = list(itertools.permutations(names))  # each config in each slot, after each other, equally often
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in orders[r % len(orders)]:
            x, y, index = next(batches[name])
            x, y = x.to(device), y.to(device)  # Ray's loader already did; LocalSession's does not
            sync()
            t0 = now()
            trainers[name].train_step(x, y, index)
            sync()
            if r >= warmup:
                times[name].append(now() - t0)
    return times


def measure_parts(spec: dict[str, Any], session: Any, rounds: int, warmup: int, clock: str) -> dict[str, list[float]]:
    """The built-in loop's step times with and without the heartbeat and the system sampler (PARTS). Every
    trainer posts to a job board in this process, so the heartbeat's thread runs as it does in a job."""
    from workers.board import BoardClient, JobBoard
    from workers.loop import Trainer

    trainers = {}
    for name in PARTS:
        job_id = f"bench-{name}"
        board = BoardClient(JobBoard(job_id), remote=False)
        trainer = Trainer(config_spec(spec, name, "parts"), session, job_id=job_id, board=board)
        if name in NO_HEARTBEAT:  # the training thread marks no phase and no thread posts
            trainer.run.heartbeat.enter = lambda phase, step=None: None  # type: ignore[method-assign]
            trainer.run.heartbeat.start = lambda board, node, host: None  # type: ignore[method-assign]
        trainers[name] = trainer
    try:
        return interleave(trainers, {n: t.batches() for n, t in trainers.items()}, session, rounds, warmup, clock)
    finally:
        for trainer in trainers.values():
            trainer.run.heartbeat.stop()
            if trainer.run.system is not None:
                trainer.run.system.stop()


def part_costs(times: dict[str, list[float]]) -> dict[str, float]:
    """Each part's cost (PART_COSTS): the paired median ratio of a config's step to the same round's step
    without that part."""
    return {
        cost: statistics.median(a / b for a, b in zip(times[with_], times[without], strict=True))
        for cost, (with_, without) in PART_COSTS.items()
    }


def ray_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: measure, gather every rank's times, rank 0 reports them."""
    import torch.distributed as dist

    from workers.session import RayTrainSession

    session = RayTrainSession()
    by_path = {}
    for path in config["paths"]:
        times = measure(config["spec"], session, config["rounds"], config["warmup"], config["clock"], path)
        ranks: list[Any] = [times]
        if session.world_size > 1:
            ranks = [None] * session.world_size
            dist.all_gather_object(ranks, times)
        by_path[path] = ranks
    out = None
    if session.rank == 0:
        out = Path(tempfile.mkdtemp(prefix="gradwatch-bench-"))
        (out / "times.json").write_text(json.dumps(by_path))
    session.report({"done": 1}, out)


def start_ray() -> None:
    from workers.driver import init_ray

    os.chdir(REPO)  # init_ray hands the working directory to the workers as PYTHONPATH
    init_ray(quiet=True)


def ray_sees_gpus(n: int) -> bool:
    import ray

    start_ray()
    return ray.cluster_resources().get("GPU", 0) >= n


def run_ray(
    spec: dict[str, Any], rounds: int, warmup: int, clock: str, world_size: int, use_gpu: bool, paths: list[str]
) -> dict[str, list[dict[str, list[float]]]]:
    start_ray()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as storage:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={"spec": spec, "rounds": rounds, "warmup": warmup, "clock": clock, "paths": paths},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=world_size,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
            ),
            run_config=RunConfig(name=f"telemetry-overhead-{uuid.uuid4().hex[:8]}", storage_path=storage),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the Ray run ended without the checkpoint that carries its timings (times.json)")
        with result.checkpoint.as_directory() as path:
            return json.loads((Path(path) / "times.json").read_text())


def group_times(ranks: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """A DDP step is done when its slowest rank is: the per-step maximum over ranks."""
    return {n: [max(step) for step in zip(*(r[n] for r in ranks), strict=True)] for n in ranks[0]}


def summarize(
    times: dict[str, list[float]], intervals: dict[str, str], base: str = "off"
) -> tuple[str, dict[str, float]]:
    """The table of one path, and each config's median ratio to `base`.

    Step times here are bimodal (waits on the other rank), so the median alone moves by several percent
    from run to run: the table also gives the 25th percentile and the paired ratio, the median over
    rounds of the config's step over the base's step in the same round.
    """
    ref = times[base]
    ref_median, ref_mean = statistics.median(ref), statistics.fmean(ref)
    ref_p25 = statistics.quantiles(ref, n=4)[0]
    rows = [
        f"{'config':<11} {'telemetry':<12} {'median ms':>9} {'p25 ms':>7} {'p90 ms':>8} {'mean ms':>8} "
        f"{'ratio':>6} {'p25 ratio':>9} {'paired':>6} {'mean ratio':>10}"
    ]
    ratios = {}
    for name, ts in times.items():
        median, mean = statistics.median(ts), statistics.fmean(ts)
        quartile, p90 = statistics.quantiles(ts, n=4)[0], statistics.quantiles(ts, n=10)[-1]
        paired = statistics.median(t / o for t, o in zip(ts, ref, strict=True))
        ratios[name] = median / ref_median
        rows.append(
            f"{name:<11} {intervals[name]:<12} {median * 1e3:9.3f} {quartile * 1e3:7.3f} {p90 * 1e3:8.3f} "
            f"{mean * 1e3:8.3f} {ratios[name]:6.3f} {quartile / ref_p25:9.3f} {paired:6.3f} {mean / ref_mean:10.3f}"
        )
    return "\n".join(rows), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local", action="store_true", help="world size 1 in this process, no Ray")
    parser.add_argument("--model", choices=sorted(EXAMPLE), default="mlp")
    parser.add_argument("--steps", type=int, default=300, help="measured steps per config")
    parser.add_argument("--warmup", type=int, default=12, help="rounds run first and not measured")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: this process's CPU time: blind to other load on a shared machine, "
        "and to time spent waiting for other ranks or a GPU",
    )
    parser.add_argument("--workers", type=int, help="Ray Train workers (default: 2 on CPU, 1 on cuda)")
    parser.add_argument(
        "--path",
        choices=("builtin", "user", "both", "parts"),
        default="both",
        help="builtin: the built-in loop against telemetry off; user: a user's own loop with the "
        "training API against the same loop in plain PyTorch and on the API with telemetry off; parts: "
        "the default telemetry with and without the heartbeat and the system sampler",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="--local: torch threads (1, as in a Ray worker with 1 CPU)"
    )
    args = parser.parse_args(argv)
    if args.steps < 10:
        parser.error("--steps must be at least 10")
    use_gpu = args.device == "cuda"
    if use_gpu and args.clock == "cpu":
        parser.error("--clock cpu does not see GPU time: use --clock wall with --device cuda")
    world_size = 1 if args.local else (args.workers or (1 if use_gpu else 2))
    rounds = args.warmup + args.steps
    spec = base_spec(args.model, rounds, world_size, use_gpu)
    intervals = {}
    for name in CONFIGS:
        telemetry = config_spec(spec, name).telemetry
        intervals[name] = f"interval {telemetry.interval}" if telemetry.enabled else "off"
    intervals[GUARD_ONLY] = "off, guard"
    intervals[API_OFF] = "off, API"
    default_system = config_spec(spec, "default", "parts").telemetry.system_interval
    for name, change in PARTS.items():
        system = change.get("system_interval", default_system)
        parts = ([] if name in NO_HEARTBEAT else ["hb"]) + ([f"sys {system:g}s"] if system else [])
        intervals.setdefault(name, ", ".join(parts) or "neither")

    started = time.time()
    if use_gpu and not args.local and not ray_sees_gpus(world_size):
        print(f"Ray sees fewer than {world_size} GPUs: measuring in this process instead (--local)")
        args.local = True
    if use_gpu and args.local and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU on this machine")
    paths = ["builtin", "user"] if args.path == "both" else [args.path]
    if args.path == "parts":
        intervals["default"] = f"hb, sys {default_system:g}s"
    if args.local:
        from workers.session import LocalSession

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix="gradwatch-bench-") as tmp:
            session = LocalSession(Path(tmp), device=args.device)
            by_path = {p: measure(spec, session, rounds, args.warmup, args.clock, p) for p in paths}
        where = f"local, 1 process, {args.device}"
    else:
        ranks = run_ray(spec, rounds, args.warmup, args.clock, world_size, use_gpu, paths)
        by_path = {p: group_times(ranks[p]) for p in paths}
        where = f"Ray Train, {world_size} workers, {'nccl' if use_gpu else 'gloo'}, {args.device}"
    print(
        f"telemetry overhead: {args.model} ({EXAMPLE[args.model]}), {where}, {args.steps} steps per config "
        f"interleaved, {args.clock} clock, {time.time() - started:.0f} s"
    )
    summary = []
    if "parts" in by_path:
        return report_parts(by_path["parts"], intervals, where, args)
    tables: list[tuple[str, str, dict[str, float]]] = []  # (heading, table, ratios) for RESULTS.md
    for path, times in by_path.items():
        table, ratios = summarize(times, intervals)
        against = "telemetry off" if path == "builtin" else "the same loop in plain PyTorch"
        print(f"{path} path (against {against}):\n{table}")
        tables.append((f"{path} path (against {against})", table, ratios))
        prefix = "" if path == "builtin" else "user_"
        summary.append(
            f"{prefix}overhead_default={ratios['default']:.3f} {prefix}overhead_every_step={ratios['every_step']:.3f}"
        )
        if GUARD_ONLY in ratios:
            summary.append(f"user_guard_only={ratios[GUARD_ONLY]:.3f}")
        if API_OFF in times:  # the built-in figure's baseline: the same loop on the API with telemetry off
            table, ratios = summarize({n: times[n] for n in (API_OFF, "default", "every_step")}, intervals, API_OFF)
            print(f"{path} path (against the same loop on the training API with telemetry off):\n{table}")
            tables.append(
                (f"{path} path (against the same loop on the training API with telemetry off)", table, ratios)
            )
            summary.append(
                f"user_telemetry_default={ratios['default']:.3f} user_telemetry_every_step={ratios['every_step']:.3f}"
            )
    print(f"goal: default <= {GOALS['default']}, every_step <= {GOALS['every_step']} (median ratio)")
    from bench.results import write_section

    write_section(
        f"telemetry-overhead-{args.model}",
        f"What telemetry costs a training step ({args.model})",
        overhead_section(tables, where, args, time.time() - started, " ".join(summary)),
    )
    print(" ".join(summary))
    return 0


def overhead_section(
    tables: list[tuple[str, str, dict[str, float]]], where: str, args: Any, seconds: float, line: str
) -> str:
    """The markdown of a builtin/user run for bench/RESULTS.md: its tables and each goal, met or missed."""
    parts = [
        f"{args.model} ({EXAMPLE[args.model]}), {where}, {args.steps} steps per config interleaved, {args.clock} "
        f"clock, {seconds:.0f} s; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end. "
        "`ratio` is a config's median step time over the baseline's; `paired` is the median over rounds of a "
        "step's time over the same round's step of the baseline."
    ]
    for heading, table, ratios in tables:
        goals = "\n".join(
            f"| {name} | {ratios[name]:.3f} | <= {goal:g}: {'met' if ratios[name] <= goal else 'missed'} |"
            for name, goal in GOALS.items()
            if name in ratios
        )
        parts.append(
            f"{heading}:\n\n```text\n{table}\n```\n\n| config | median ratio | goal |\n| --- | --- | --- |\n{goals}"
        )
    return "\n\n".join([*parts, f"`{line}`"])


def report_parts(times: dict[str, list[float]], intervals: dict[str, str], where: str, args: Any) -> int:
    """Print the parts' table and costs, and write their section of bench/RESULTS.md."""
    from bench.results import write_section

    table, _ = summarize(times, {n: intervals[n] for n in times}, base="neither")
    costs = part_costs(times)
    line = " ".join(f"{name}={value:.3f}" for name, value in costs.items())
    print(f"parts path (hb: heartbeat, sys: system sampler and its interval):\n{table}")
    print(line)
    body = (
        f"The built-in loop's step ({args.model}, {where}, {args.steps} steps per config interleaved, {args.clock} "
        "clock) with the default telemetry, with and without the heartbeat (its phase marks on the training "
        "thread and its posting thread) and the system sampler (its thread), each posting to a job board; "
        "hb: the heartbeat, sys: the system sampler at that interval; `paired` is the median over rounds of a "
        "step's time over the same round's step of the base.\n\n"
        f"```text\n{table}\n```\n\n"
        "| cost | ratio |\n| --- | --- |\n"
        + "\n".join(
            f"| {name} ({PART_COSTS[name][0]} / {PART_COSTS[name][1]}) | {value:.3f} |" for name, value in costs.items()
        )
        + f"\n\n`{line}`"
    )
    write_section("heartbeat-system-cost", "What the heartbeat and the system sampler cost per step", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
