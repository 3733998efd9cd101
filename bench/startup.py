"""What gradwatch adds to a job's start and to its resume, against a plain Ray Train TorchTrainer.

One Ray head on 127.0.0.1 (token auth, 2 CPUs) and, on it, one `gradwatch up --no-monitoring`
service. The same job runs two ways, alternating, `--repeats` times each (the first of each pair
swaps every repeat; plain goes first, so the service has connected to Ray before its first job):

- gradwatch: the path a user of the service takes. The spec goes to `POST /v1/jobs` (the SDK's
  `Client.submit`, what `gradwatch submit` calls); the scheduler submits one Ray job whose
  entrypoint, `python -m workers.driver`, runs Ray Train's TorchTrainer with the built-in loop.
- plain: what the same user does without gradwatch on the same cluster: a Ray Train script
  (`plain_train` below: the model, data, optimizer and checkpoints written out with PyTorch and
  Ray Train alone) submitted as a Ray job through Ray's Job Submission API, `ray job submit`'s
  own call.

The job: the digits MLP of examples/digits-mlp.yaml (64-128-64-10, ReLU, AdamW at a constant lr 3e-3, batch 64
per worker, 80% of scikit-learn's digits), 2 CPU workers over gloo, a checkpoint every 100 steps,
`FailureConfig(max_failures=1)`, and Ray Train's health check every 0.5 s for both (gradwatch's
setting; Ray's default is 2 s), so the difference is gradwatch's own.

What is timed, with the same clock and the same kind of record for both: rank 0 writes the wall
time after every optimizer step (gradwatch: its history.jsonl; plain: a steps.jsonl of its own), read
after the run, so no polling delay enters a figure.

- start-up: from the submit call to the end of the first step.
- resume: once Ray Train has registered the first checkpoint (its checkpoint_manager_snapshot.json
  names one), the newest live `RayTrainWorker` process of the run (Ray's state API) gets SIGKILL;
  from the kill to the end of the first step after it.

    .venv/bin/python bench/startup.py                   # 3 repeats: 7-14 minutes on a shared 2-core machine
    .venv/bin/python bench/startup.py --repeats 5 --json

Goals: start-up <= plain + 2 s and resume <= plain + 2 s (medians). The last line is
`startup_extra_seconds=A resume_extra_seconds=B` (gradwatch's median minus plain's); the
tables are written to the `startup` section of bench/RESULTS.md (`--no-write` leaves it as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

GOAL_EXTRA_S = 2.0
MAX_STEPS = 500
CHECKPOINT_EVERY = 100
HEALTH_CHECK_S = "0.5"
TOKEN = "bench-startup-token"
POLL_INTERVAL = "0.5"  # GRADWATCH_POLL_INTERVAL of the bench's service
SPEC: dict[str, Any] = {
    "name": "startup-bench",
    "model": {"name": "mlp", "hidden": [128, 64], "activation": "relu"},
    "data": {"name": "digits", "val_fraction": 0.2},
    "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01},
    "schedule": {"name": "constant"},
    "batch_size": 64,
    "max_steps": MAX_STEPS,
    "scaling": {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 1},
    "validation": {"every_steps": 50},
    "checkpoint": {"every_steps": CHECKPOINT_EVERY, "keep": 2},
    "max_failures": 1,
    "timeout": None,
}


# ------------------------------------------------------------------ the plain Ray Train job
def plain_train(config: dict[str, Any]) -> None:
    """Each rank of the plain job: the digits MLP in PyTorch and Ray Train, nothing else."""
    import ray.train
    import ray.train.torch
    import torch
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    rank = ray.train.get_context().get_world_rank()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train = perm[round(len(x) * 0.2) :]
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True, drop_last=True)
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3.0e-3, weight_decay=0.01)
    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = torch.load(Path(path) / "state.pt")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
    log = open(config["steps_file"], "a") if rank == 0 else None  # noqa: SIM115 - open for the whole run
    if log and checkpoint is not None:  # as gradwatch's history marks a restart
        log.write(json.dumps({"step": step, "event": "restart", "time": time.time()}) + "\n")
    while step < config["max_steps"]:
        if isinstance(loader.sampler, DistributedSampler):  # prepare_data_loader's, with 2 workers
            loader.sampler.set_epoch(epoch)
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if log:
                log.write(json.dumps({"step": step, "time": time.time()}) + "\n")
                log.flush()
            if step % config["checkpoint_every"] == 0 or step == config["max_steps"]:
                with tempfile.TemporaryDirectory() as path:
                    kept = None
                    if rank == 0:
                        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
                        torch.save({**state, "step": step, "epoch": epoch}, Path(path) / "state.pt")
                        kept = ray.train.Checkpoint.from_directory(path)
                    ray.train.report({"step": step}, checkpoint=kept)
            if step >= config["max_steps"]:
                break
        epoch += 1


def plain_trainer(config: dict[str, Any]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        plain_train,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=config["name"],
            storage_path=config["storage_path"],
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def plain_driver(config: dict[str, Any]) -> int:
    """The plain job's entrypoint (`startup.py --plain-driver CONFIG`): a user's whole Ray Train script."""
    import ray

    ray.init()  # the Ray job's own cluster (RAY_ADDRESS)
    plain_trainer(config).fit()
    return 0


# ------------------------------------------------------------------ reading the runs
def records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


def step_times(path: Path) -> list[tuple[int, float]]:
    """(step, wall time) of every optimizer step rank 0 recorded, in file order (validations and
    restart events of gradwatch's history left out)."""
    return [(r["step"], r["time"]) for r in records(path) if "loss" in r or set(r) == {"step", "time"}]


def resumed_step(path: Path) -> tuple[int, float] | None:
    """The first step recorded after the first restart mark (gradwatch's history and the plain
    script both write `{"event": "restart"}` when a rank 0 resumes from a checkpoint)."""
    restarted = False
    for r in records(path):
        if r.get("event") == "restart":
            restarted = True
        elif restarted and ("loss" in r or set(r) == {"step", "time"}):
            return r["step"], r["time"]
    return None


def checkpoint_registered(run_dir: Path) -> bool:
    """Ray Train's controller has registered a checkpoint of this run (what a restart resumes from)."""
    try:
        state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    if isinstance(state, str):  # Ray writes the snapshot as a JSON string holding the JSON
        state = json.loads(state)
    return bool(state.get("latest_checkpoint_result") or state.get("checkpoint_results"))


class Bench:
    def __init__(self, ray_address: str, service: Any, workdir: Path):
        from service.scheduler.local_ray import ray_token

        self.address, self.service, self.workdir = ray_address, service, workdir
        self.runs_dir = workdir / "gradwatch" / "runs"  # the service's storage path under its data dir
        token = ray_token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        from ray.job_submission import JobSubmissionClient

        self.jobs = JobSubmissionClient(ray_address, headers=self.headers)

    # ---- the cluster
    def _get(self, path: str, **params: Any) -> Any:
        import httpx

        response = httpx.get(f"{self.address}{path}", params=params, headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def train_workers(self, ray_job_id: str | None = None) -> list[int]:
        """PIDs of the live RayTrainWorker actors (of one Ray job, when given)."""
        keys, predicates, values = ["class_name", "state"], ["=", "="], ["RayTrainWorker", "ALIVE"]
        if ray_job_id:
            keys, predicates, values = [*keys, "job_id"], [*predicates, "="], [*values, ray_job_id]
        body = self._get(
            "/api/v0/actors", filter_keys=keys, filter_predicates=predicates, filter_values=values, limit=1000
        )
        return sorted(a["pid"] for a in ((body.get("data") or {}).get("result") or {}).get("result") or [])

    def wait_idle(self) -> None:
        """No training worker alive and every CPU free, so each run starts on an idle cluster."""
        from service.scheduler.launcher import ClusterUnavailable, RayCluster
        from service.stack.supervisor import wait_for

        cluster = RayCluster(self.address, self.headers.get("Authorization", "")[7:] or None)

        def idle() -> bool:
            try:
                free, total = cluster.resources()
            except ClusterUnavailable:  # no report yet
                return False
            return not self.train_workers() and free.cpus >= total.cpus

        wait_for(idle, timeout=180, interval=0.5, what="an idle Ray cluster")

    def kill_a_worker(self, ray_job_id: str | None) -> float:
        pid = self.train_workers(ray_job_id)[-1]
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        return killed

    def ray_job_start(self, submission_id: str) -> float:
        """When Ray started the job (its own record), as a Unix time."""
        started = self.jobs.get_job_info(submission_id).start_time
        if started is None:
            raise RuntimeError(f"Ray has no start time for job {submission_id}")
        return started / 1000

    # ---- one run of either kind
    def measure(
        self, steps_file: Path, run_dir: Path, submitted: float, ray_job_id: Any, running: Any
    ) -> dict[str, Any]:
        from service.stack.supervisor import wait_for

        wait_for(lambda: step_times(steps_file) or not running(), timeout=300, interval=0.1, what="the first step")
        wait_for(
            lambda: checkpoint_registered(run_dir) or not running(),
            timeout=300,
            interval=0.05,
            what="a registered checkpoint",
        )
        if not running():
            raise RuntimeError(f"the run ended before a worker could be killed; see {run_dir}")
        killed = self.kill_a_worker(ray_job_id())
        wait_for(
            lambda: resumed_step(steps_file) or not running(), timeout=300, interval=0.1, what="the first resumed step"
        )
        first, after = step_times(steps_file)[0], resumed_step(steps_file)
        if first[0] != 1 or after is None:
            raise RuntimeError(f"no first step or no resumed step in {steps_file}")
        return {
            "startup_s": first[1] - submitted,
            "resume_s": after[1] - killed,
            "resumed_from_step": after[0] - 1,
            "killed_at_step": max(s for s, t in step_times(steps_file) if t <= killed),
        }

    def run_gradwatch(self) -> dict[str, Any]:
        client = self.service.client
        submitted = time.time()
        job = client.submit(SPEC)
        run_dir = self.runs_dir / job["id"]
        ray_job: dict[str, str | None] = {}

        def ray_job_id() -> str | None:
            if "id" not in ray_job:
                ray_job["id"] = self.jobs.get_job_info(job["id"]).job_id
            return ray_job["id"]

        def running() -> bool:
            return client.get(job["id"])["state"] in ("queued", "running")

        figures = self.measure(run_dir / "history.jsonl", run_dir, submitted, ray_job_id, running)
        figures["ray_job_start_s"] = self.ray_job_start(job["id"]) - submitted
        ended = client.wait(job["id"], timeout=600, poll=0.5)
        if ended["state"] != "succeeded":
            raise RuntimeError(f"gradwatch job {job['id']} ended {ended['state']}: {ended.get('reason')}")
        return {**figures, "job": job["id"]}

    def plain_config(self) -> dict[str, Any]:
        name = f"plain-{uuid.uuid4().hex[:8]}"
        storage = self.workdir / "plain"
        (storage / name).mkdir(parents=True)
        return {
            "name": name,
            "storage_path": str(storage),
            "steps_file": str(storage / name / "steps.jsonl"),
            "max_steps": MAX_STEPS,
            "checkpoint_every": CHECKPOINT_EVERY,
        }

    def run_plain_job(self) -> dict[str, Any]:
        import shlex

        from ray.job_submission import JobStatus

        config = self.plain_config()
        entrypoint = shlex.join([sys.executable, str(Path(__file__).resolve()), "--plain-driver", json.dumps(config)])
        submitted = time.time()
        sid = self.jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=config["name"],
            runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_S}},
        )
        ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

        def running() -> bool:
            return self.jobs.get_job_status(sid) not in ended

        run_dir = Path(config["storage_path"]) / config["name"]
        figures = self.measure(
            Path(config["steps_file"]), run_dir, submitted, lambda: self.jobs.get_job_info(sid).job_id, running
        )
        figures["ray_job_start_s"] = self.ray_job_start(sid) - submitted
        from service.stack.supervisor import wait_for

        wait_for(lambda: not running(), timeout=600, interval=0.5, what=f"plain job {sid} to end")
        if self.jobs.get_job_status(sid) != JobStatus.SUCCEEDED:
            raise RuntimeError(f"plain job {sid} failed: {self.jobs.get_job_logs(sid)[-2000:]}")
        return {**figures, "job": sid}


# ------------------------------------------------------------------ the table
def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def summarize(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, Any]]:
    summary: dict[str, Any] = {}
    lines = [f"{'':<10} {'start-up s (median, min-max)':>30} {'resume s (median, min-max)':>30}"]
    for kind, rows in runs.items():
        startup = [r["startup_s"] for r in rows]
        resume = [r["resume_s"] for r in rows]
        summary[kind] = {
            "startup_median_s": round(statistics.median(startup), 2),
            "resume_median_s": round(statistics.median(resume), 2),
            "runs": rows,
        }
        lines.append(
            f"{kind:<10} {statistics.median(startup):>16.1f} ({spread(startup):>11}) "
            f"{statistics.median(resume):>16.1f} ({spread(resume):>11})"
        )
    extra = {
        what: round(summary["gradwatch"][f"{what}_median_s"] - summary["plain"][f"{what}_median_s"], 2)
        for what in ("startup", "resume")
    }
    for what, label in (("startup", "start-up"), ("resume", "resume")):
        verdict = "goal met" if extra[what] <= GOAL_EXTRA_S else "goal missed"
        lines.append(f"{label}: gradwatch - plain = {extra[what]:+.1f} s (goal <= +{GOAL_EXTRA_S:g} s): {verdict}")
    summary["extra_s"] = extra
    summary["goals_met"] = all(v <= GOAL_EXTRA_S for v in extra.values())
    return lines, summary


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing bench/RESULTS.md")
    parser.add_argument("--plain-driver", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_driver:
        return plain_driver(json.loads(args.plain_driver))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    sys.path.insert(0, str(REPO))
    os.environ.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    from service.scheduler.local_ray import private_ray_head
    from service.stack.supervisor import ServiceProcess

    started, load_before = time.time(), load_average()
    runs: dict[str, list[dict[str, Any]]] = {"gradwatch": [], "plain": []}
    head = private_ray_head(2, env={**os.environ, "PYTHONPATH": str(REPO)}, prefix="gwbench-")
    with tempfile.TemporaryDirectory(prefix="gw-startup-bench-") as tmp, head as address:
        workdir = Path(tmp)
        data_dir = workdir / "gradwatch"
        data_dir.mkdir()
        env = {**os.environ, "RAY_ADDRESS": address, "GRADWATCH_POLL_INTERVAL": POLL_INTERVAL}
        service = ServiceProcess(data_dir, ["--no-monitoring"], env=env, token=TOKEN)
        service.start()
        bench = Bench(address, service, workdir)
        try:
            for i in range(args.repeats):
                # Plain first: the service, just started, is done connecting to Ray before its first job.
                order = ("plain", "gradwatch") if i % 2 == 0 else ("gradwatch", "plain")
                for kind in order:
                    bench.wait_idle()
                    row = bench.run_gradwatch() if kind == "gradwatch" else bench.run_plain_job()
                    runs[kind].append(row)
                    if not args.json:
                        print(
                            f"run {i + 1} {kind:<9} start-up {row['startup_s']:5.1f} s   "
                            f"resume {row['resume_s']:5.1f} s "
                            f"(killed at step {row['killed_at_step']}, resumed from {row['resumed_from_step']}; "
                            f"Ray job started {row.get('ray_job_start_s', 0):.1f} s after the submit)",
                            flush=True,
                        )
        finally:
            service.stop()
    lines, summary = summarize(runs)
    summary.update(
        repeats=args.repeats,
        seconds=round(time.time() - started),
        load_average_before=load_before,
        load_average_after=load_average(),
    )
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(
        f"start-up and resume: digits MLP, 2 CPU workers (gloo), {args.repeats} runs each alternating; "
        f"plain = a Ray job (Job Submission API); {summary['seconds']} s; load average {load_before} before, "
        f"{summary['load_average_after']} after"
    )
    print("\n".join(lines))
    extra = summary["extra_s"]
    line = f"startup_extra_seconds={extra['startup']:.2f} resume_extra_seconds={extra['resume']:.2f}"
    if not args.no_write:
        from bench.results import write_section

        write_section("startup", "What gradwatch adds to a job's start-up and resume", section(runs, summary, line))
    print(line)
    return 0


def section(runs: dict[str, list[dict[str, Any]]], summary: dict[str, Any], line: str) -> str:
    """The markdown of this run for bench/RESULTS.md: medians per kind, and gradwatch's extra against the goal."""
    medians = "\n".join(
        f"| {kind} | {summary[kind]['startup_median_s']:.1f} ({spread([r['startup_s'] for r in rows])}) "
        f"| {summary[kind]['resume_median_s']:.1f} ({spread([r['resume_s'] for r in rows])}) |"
        for kind, rows in runs.items()
    )
    extra = "\n".join(
        f"| {label} | {summary['extra_s'][what]:+.1f} | <= +{GOAL_EXTRA_S:g} s: "
        f"{'met' if summary['extra_s'][what] <= GOAL_EXTRA_S else 'missed'} |"
        for what, label in (("startup", "start-up"), ("resume", "resume"))
    )
    return (
        "The digits MLP (64-128-64-10), 2 CPU workers over gloo, a checkpoint every 100 steps, on one Ray head "
        "(2 CPUs) with `gradwatch up --no-monitoring`. gradwatch: the spec submitted to the service; plain: the "
        "same job as a Ray Train script submitted through Ray's Job Submission API. Start-up: from the submit "
        "call to the end of the first step; resume: from SIGKILL of a training worker to the end of the first "
        f"step after it. {summary['repeats']} run(s) of each kind, alternating, {summary['seconds']} s; load "
        f"average {summary['load_average_before']} before, {summary['load_average_after']} after.\n\n"
        "| kind | start-up s, median (min-max) | resume s, median (min-max) |\n| --- | --- | --- |\n"
        f"{medians}\n\n"
        "| gradwatch - plain (medians) | seconds | goal |\n| --- | --- | --- |\n"
        f"{extra}\n\n`{line}`"
    )


if __name__ == "__main__":
    sys.exit(main())
