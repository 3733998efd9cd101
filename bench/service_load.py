"""Load on the job API: 10,000 jobs in the store, a real uvicorn server on 127.0.0.1.

Measures p50/p99 latency of GET /v1/jobs (first page, and filtered by state and
label) and GET /v1/jobs/{id}, then how many submissions per second the API
accepts. The server runs with its scheduler paused (GRADWATCH_SCHEDULER_ENABLED=false),
so submitted jobs are validated and stored but never started on Ray: this
measures the API and the store, not Ray.

    .venv/bin/python bench/service_load.py [--jobs 10000] [--requests 500]

The last line is `list_p99_ms=A get_p99_ms=B submit_per_s=C` (goal: p99 < 50 ms); the tables are
written to the `service-load` section of bench/RESULTS.md (`--no-write` leaves it as it is).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradwatch.ids import new_job_id  # noqa: E402
from gradwatch.spec import load_spec  # noqa: E402
from service.stack.supervisor import free_port  # noqa: E402
from service.store.jobs import demand_of  # noqa: E402
from service.store.store import Store  # noqa: E402
from service.store.tables import Job, JobLabel, Transition  # noqa: E402

TOKEN = "bench"
GOAL_P99_MS = 50.0
TEAMS = ("vision", "nlp", "speech", "rl")
STATES = ["succeeded"] * 60 + ["failed"] * 10 + ["cancelled"] * 5 + ["running"] * 5 + ["queued"] * 20
SPEC = {
    "name": "bench",
    "model": {"name": "mlp", "hidden": [16]},
    "data": {"name": "synthetic-classification", "n_samples": 512},
    "max_steps": 100,
    "scaling": {"num_workers": 2},
}


def fill(store: Store, n: int) -> list[str]:
    """n jobs with their transitions, inserted in one transaction (the API path is measured below)."""
    rng = random.Random(0)
    spec = load_spec(SPEC)
    spec_json = spec.model_dump(mode="json")
    cpus, gpus = demand_of(spec)
    now = time.time() - n
    ids = []
    with store.db.write() as session:
        for i in range(n):
            state = rng.choice(STATES)
            job_id = new_job_id()
            created = now + i
            labels = {"team": rng.choice(TEAMS), "project": f"p{rng.randrange(20)}"}
            ended = created + 30 if state not in ("queued", "running") else None
            status = (
                {
                    "job_id": job_id,
                    "state": state,
                    "step": 100,
                    "max_steps": 100,
                    "train_loss": 0.1,
                    "updated_at": ended,
                }
                if ended
                else None
            )
            session.add(
                Job(
                    id=job_id,
                    name=f"run-{i % 50}",
                    owner="bench",
                    labels=labels,
                    priority=0,
                    spec={**spec_json, "labels": labels},
                    state=state,
                    reason="bench",
                    created_at=created,
                    started_at=created + 1 if state != "queued" else None,
                    ended_at=ended,
                    ray_submission_id=job_id,
                    world_size=2,
                    max_steps=100,
                    cpus=cpus,
                    gpus=gpus,
                    run_status=status,
                )
            )
            session.add_all(JobLabel(job_id=job_id, key=k, value=v, created_at=created) for k, v in labels.items())
            session.add(Transition(job_id=job_id, from_state=None, to_state="queued", at=created, reason="submitted"))
            if state != "queued":
                session.add(
                    Transition(
                        job_id=job_id,
                        from_state="queued",
                        to_state="running",
                        at=created + 1,
                        reason="submitted to Ray",
                    )
                )
            if ended:
                session.add(Transition(job_id=job_id, from_state="running", to_state=state, at=ended, reason="bench"))
            ids.append(job_id)
    return ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(client: httpx.Client, n: int, make_request) -> list[float]:
    for _ in range(20):  # warm up connections and caches
        make_request(client).raise_for_status()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        make_request(client).raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
    return out


def submissions_per_second(url: str, threads: int, seconds: float) -> tuple[float, int]:
    count = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def work() -> None:
        nonlocal count
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            while time.perf_counter() < stop:
                c.post("/v1/jobs", json=SPEC).raise_for_status()
                with lock:
                    count += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--submit-seconds", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true", help="print the figures without writing bench/RESULTS.md")
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="gradwatch-bench-"))
    store = Store(f"sqlite:///{data_dir / 'gradwatch.db'}")
    t0 = time.perf_counter()
    ids = fill(store, args.jobs)
    store.close()
    print(f"stored {len(ids)} jobs in {time.perf_counter() - t0:.1f} s ({data_dir})")

    port = free_port()
    env = {
        **os.environ,
        "GRADWATCH_DATA_DIR": str(data_dir),
        "GRADWATCH_TOKEN": TOKEN,
        "GRADWATCH_SCHEDULER_ENABLED": "false",
        # 2,000 seeded queued jobs and every submission stay queued: no caps on the queue here.
        "GRADWATCH_MAX_QUEUED_PER_USER": "1000000000",
        "GRADWATCH_MAX_QUEUED_JOBS": "1000000000",
        "GRADWATCH_RAY_ADDRESS": "http://127.0.0.1:9",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

        rng = random.Random(1)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            first_page = timed(c, args.requests, lambda c: c.get("/v1/jobs"))
            filtered = timed(
                c,
                args.requests,
                lambda c: c.get(
                    "/v1/jobs",
                    params=[
                        ("state", "succeeded"),
                        ("label", f"team={rng.choice(TEAMS)}"),
                        ("label", f"project=p{rng.randrange(20)}"),
                    ],
                ),
            )
            by_state = timed(c, args.requests, lambda c: c.get("/v1/jobs", params={"state": "running"}))
            one = timed(c, args.requests, lambda c: c.get(f"/v1/jobs/{rng.choice(ids)}"))
        rows = [
            ("GET /v1/jobs (first page of 50)", first_page),
            ("GET /v1/jobs?state=succeeded&label=team=..&label=project=..", filtered),
            ("GET /v1/jobs?state=running", by_state),
            ("GET /v1/jobs/{id}", one),
        ]
        for name, values in rows:
            print(f"{name:60s} p50 {statistics.median(values):6.2f} ms  p99 {percentile(values, 99):6.2f} ms")
        single, n1 = submissions_per_second(url, 1, args.submit_seconds)
        print(f"POST /v1/jobs, 1 client:  {single:7.1f} submissions/s ({n1} accepted, scheduler paused)")
        multi, n4 = submissions_per_second(url, 4, args.submit_seconds)
        print(f"POST /v1/jobs, 4 clients: {multi:7.1f} submissions/s ({n4} accepted, scheduler paused)")
    finally:
        server.terminate()
        server.wait(10)
    list_p99 = max(percentile(first_page, 99), percentile(filtered, 99), percentile(by_state, 99))
    get_p99 = percentile(one, 99)
    line = f"list_p99_ms={list_p99:.1f} get_p99_ms={get_p99:.1f} submit_per_s={max(single, multi):.0f}"
    if not args.no_write:
        from bench.results import write_section

        body = section(args, rows, [(1, single, n1), (4, multi, n4)], line)
        write_section("service-load", "Job API latency and submissions with 10,000 jobs stored", body)
    print(line)


def verdict(p99: float) -> str:
    return "met" if p99 < GOAL_P99_MS else "missed"


def section(args: argparse.Namespace, rows: list, submits: list[tuple[int, float, int]], line: str) -> str:
    """The markdown of this run for bench/RESULTS.md: the latency and submission tables, against the goal."""
    latency = "\n".join(
        f"| `{name}` | {statistics.median(values):.2f} | {percentile(values, 99):.2f} "
        f"| < {GOAL_P99_MS:g} ms: {verdict(percentile(values, 99))} |"
        for name, values in rows
    )
    submitted = "\n".join(f"| {clients} | {rate:.1f} | {count} |" for clients, rate, count in submits)
    return (
        f"{args.jobs:,} jobs in the service's SQLite store, a real uvicorn server on 127.0.0.1 with its "
        f"scheduler paused (jobs are validated and stored, never started on Ray), {args.requests} requests "
        "per route after 20 warm-up requests, one client; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end.\n\n"
        "| request | p50 ms | p99 ms | goal (p99) |\n| --- | --- | --- | --- |\n"
        f"{latency}\n\n"
        f"Submissions (`POST /v1/jobs`) for {args.submit_seconds:g} s each (no goal):\n\n"
        f"| clients | submissions/s | accepted |\n| --- | --- | --- |\n{submitted}\n\n`{line}`"
    )


if __name__ == "__main__":
    main()
