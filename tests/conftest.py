"""Shared fixtures: a real local Ray for the tests that need one, and small specs."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gradwatch.names import TEST_REPORTS_ENV

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# Every Ray process the tests start inherits the test hook: the ranks' final reports carry the
# parameter fingerprints and first-epoch indices the tests check.
os.environ[TEST_REPORTS_ENV] = "1"
# Ray Train starts a preemption watcher actor for every run: it polls Ray for draining nodes and logs them
# (and answers ray.train.get_preemption_info, which neither gradwatch nor these tests call). A process of
# its own per run, about 2 s of a core here, times the suite's few dozen Ray Train runs: off in the tests
# (Ray's own switch), on where users run. Node loss is tested as gradwatch sees it (tests/test_multinode.py).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers inherit COLUMNS=80 and LINES=24 from execnet; a rich Console made at import
    # would keep 80 columns for good, where a test sets COLUMNS for the commands it runs.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)
# The reason a run ends failed once its updates were skipped max_skipped_steps steps (workers/loop.py).
DIVERGED = re.compile(
    r"diverged: (?:(?P<steps>\d+) consecutive non-finite steps|(?P<skipped>\d+) of the "
    r"(?P<of>\d+) steps) since step (?P<since>\d+)(?: were non-finite, never \d+ finite in a row)?; "
    r"last finite loss(?: before them)? (?P<loss>\S+) at step (?P<last>\d+)"
)


# mypy takes 15-20 s of one core on a clean clone, while the suite's first tests (no Ray) use one core:
# it starts, at a lower priority, as soon as the session knows it will run test_types_are_clean.
@functools.cache
def mypy_run() -> subprocess.Popen:
    """mypy over the packages pyproject.toml names, started once a session; `communicate()` for its report."""
    return subprocess.Popen(
        [sys.executable, "-m", "mypy"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.nice(5),
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    # Under pytest-xdist every worker collects every test, and only one runs test_types_are_clean:
    # there mypy starts when that test asks for it.
    if os.environ.get("PYTEST_XDIST_WORKER") is None and any(
        item.name == "test_types_are_clean" for item in session.items
    ):
        mypy_run()


# The session fixtures that run the example jobs are costly (a few Ray jobs): under pytest-xdist
# (`make test` runs two workers, --dist loadgroup) every test that reads them runs in one worker.
EXAMPLE_FIXTURES = {"example_jobs", "example_runs", "dynamics_runs", "live_demo"}


def module_fixtures(item: pytest.Item) -> set[str]:
    """The module-scoped fixtures of the tests' own (conftest files and test modules) that ITEM uses."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].scope == "module" and defs[-1].baseid.startswith("tests")
    }


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    # --dist loadgroup hands every test that has no group to whichever worker is free, one at a time: the
    # tests of one module would then set up its module fixtures (a local Ray, a `gradwatch up` stack, the
    # jobs a module shares) once on each worker, side by side on the same cores. A module whose tests share
    # such a fixture is one group, run in order on one worker, as a plain `pytest` runs it.
    groups: list[tuple[pytest.Item, str]] = []
    for item in items:
        if EXAMPLE_FIXTURES & set(getattr(item, "fixturenames", ())):
            groups.append((item, "examples"))
        elif module_fixtures(item):
            groups.append((item, item.nodeid.split("::")[0]))
        else:
            continue
        item.add_marker(pytest.mark.xdist_group(groups[-1][1]))
    result = yield  # pytest-xdist's own hook among them: it names each test's group in the id it reports
    if getattr(config.option, "loadgroup", False):  # set by pytest-xdist in its workers under --dist loadgroup
        _name_groups_in_ids(groups)
    return result


def _name_groups_in_ids(groups: list[tuple[pytest.Item, str]]) -> None:
    """Give each grouped test the id "ID@GROUP" that --dist loadgroup schedules by, where pytest-xdist could
    not: it sets the item's `_nodeid`, which pytest 9.2 no longer reads (an item's id is a structured `_id`),
    so without this every group would be split over the workers and its fixtures set up on each."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest, where pytest-xdist's own renaming works
        return
    for item, group in groups:
        if not isinstance(getattr(item, "_id", None), NodeId) or item.nodeid.rsplit("@", 1)[-1] == group:
            continue
        item._id = NodeId.parse(f"{item.nodeid}@{group}")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module (started in-process, shut down after)."""
    import ray

    from workers.driver import init_ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    init_ray(quiet=True)
    yield ray
    ray.shutdown()


def small_spec(**overrides) -> dict:
    """A quick job on the real digits data; override any field."""
    spec: dict[str, Any] = {
        "name": "test-job",
        "model": {"name": "mlp", "hidden": [32]},
        "data": {"name": "digits"},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "batch_size": 32,
        "max_steps": 60,
        "scaling": {"num_workers": 2},
        "validation": {"every_steps": 20},
        "telemetry": {"interval": 5, "grace_seconds": 0},
        "checkpoint": {"every_steps": 30, "keep": 1},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key not in ("model", "data"):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head (2 logical CPUs) for every module that runs jobs through the service."""
    from tests.stack import ray_head as start_head

    with start_head(cpus=2) as address:
        yield address


@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL server (initdb in a temporary folder, a free port) for the whole run."""
    from tests.pgcluster import postgres_cluster

    with postgres_cluster() as cluster:
        yield cluster


# The four examples that show dynamics on purpose, with the steps their detectors need (the shipped specs
# run longer so that Prometheus alerts fire). The diverging one ends by itself, failed, once its updates
# were skipped max_skipped_steps steps; what it ships with, a checkpoint every 10 steps for a rollback to
# come back to (and a run that lives on long enough after its first NaN for the alert), no test of these
# runs reads: each checkpoint is a Ray Train report, 0.3-0.5 s here.
DYNAMICS_EXAMPLES = ("diverging", "stalled", "overfitting", "vanishing")
EXAMPLE_OVERRIDES: dict[str, dict] = {
    "stalled": {"max_steps": 400},
    "diverging": {"checkpoint": {"every_steps": 100, "keep": 1}},
}


def example_spec_file(name: str, folder: Path) -> Path:
    """examples/NAME.yaml for a test: no scrape grace at the end, only the steps the detectors need, and
    no checkpoints that no test reads."""
    import yaml

    data = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    data["telemetry"] = {**data.get("telemetry", {}), "grace_seconds": 0}
    data.update(EXAMPLE_OVERRIDES.get(name, {}))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_dynamics(tmp: Path) -> dict[str, tuple[Path, dict]]:
    """The four dynamics examples through `run_job` (what `gradwatch run` calls) on a local Ray in this
    process, shut down before it returns."""
    import ray

    from gradwatch.spec import load_spec
    from workers.driver import init_ray, run_job

    tmp.mkdir(parents=True, exist_ok=True)
    made = {}
    if ray.is_initialized():
        ray.shutdown()
    init_ray(quiet=True)
    try:
        for name in DYNAMICS_EXAMPLES:
            result = run_job(load_spec(example_spec_file(name, tmp)), storage_path=tmp / "runs")
            made[name] = (Path(result.run_dir), result.model_dump(mode="json"))
    finally:
        ray.shutdown()
    return made


def _watch_demo(proc: subprocess.Popen, sd_file: Path, prom_url: str) -> dict:
    """What the live-demo tests read from the running demo (see `live_demo`), then its end."""
    import json
    import time

    import httpx

    from tests.contract import samples, value
    from tests.promstack import query, wait_for

    try:

        def two_targets():
            groups = json.loads(sd_file.read_text() or "[]")
            return groups if len(groups) == 2 else None

        groups = wait_for(two_targets, timeout=180, interval=0.5, what="both ranks in the file_sd file")
        urls = {g["labels"]["rank"]: f"http://{g['targets'][0]}/metrics" for g in groups}

        def scraped_after_warmup():
            at = time.time()
            texts = {rank: httpx.get(url, timeout=5).text for rank, url in urls.items()}
            fams = samples(texts["0"])
            ok = (
                value(fams, "gradwatch_step") >= 100
                and "gradwatch_gradient_noise_scale" in fams
                and fams["gradwatch_gradient_noise_scale"]
                and any(s.labels.get("split") == "val" for s in fams["gradwatch_loss"])
            )
            return (texts, at) if ok else None

        texts, scraped_at = wait_for(scraped_after_warmup, timeout=120, interval=0.5, what="step 100 on rank 0")
        in_prometheus = wait_for(
            lambda: len(query(prom_url, "gradwatch_step")) == 2 and query(prom_url, "gradwatch_step"),
            timeout=30,
            what="both ranks scraped",
        )
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return {
        "texts": texts,
        "scraped_at": scraped_at,
        "prometheus": in_prometheus,
        "result": json.loads(out.strip().splitlines()[-1]),
        "after_end": json.loads(sd_file.read_text()),
    }


@pytest.fixture(scope="session")
def example_jobs(tmp_path_factory) -> dict:
    """The demo (`live_demo`) and the four dynamics examples (`dynamics_runs`), once per session and at the
    same time: the demo in a `gradwatch run` subprocess on a local Ray of its own, watched from a thread,
    the dynamics examples on this process's Ray. Much of a short Ray job is its start and its end, when its
    CPUs wait: side by side they take about as long as the longer of the two."""
    import threading

    import yaml

    from tests.promstack import start_prometheus
    from tests.stack import gradwatch_run

    tmp = tmp_path_factory.mktemp("example-jobs")
    spec = yaml.safe_load((EXAMPLES / "digits-mlp.yaml").read_text())
    spec["telemetry"] = {"interval": 5, "grace_seconds": 6}
    spec_file = tmp / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    sd_file = tmp / "targets.json"
    sd_file.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "gradwatch-workers",
                "scrape_interval": "1s",
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "1s"}],
            }
        ],
    }
    with start_prometheus(yaml.safe_dump(config), tmp) as prom:
        proc = gradwatch_run(spec_file, tmp / "runs", sd_file)
        watched: dict = {}

        def watch() -> None:
            try:
                watched["live"] = _watch_demo(proc, sd_file, prom.url)
            except BaseException as error:  # noqa: BLE001 - raised in the fixture's own thread below
                watched["error"] = error

        watcher = threading.Thread(target=watch, name="live-demo", daemon=True)
        watcher.start()
        try:
            dynamics = _run_dynamics(tmp / "dynamics")
        finally:
            watcher.join()
    if "error" in watched:
        raise watched["error"]
    return {"live": {"spec": spec, "tmp": tmp, **watched["live"]}, "dynamics": dynamics}


@pytest.fixture(scope="session")
def dynamics_runs(example_jobs) -> dict[str, tuple[Path, dict]]:
    """name -> (run directory, the run's result as `gradwatch run --json` prints it) for the four dynamics
    examples, run once per session through `run_job` (what that command calls)."""
    return example_jobs["dynamics"]


@pytest.fixture(scope="session")
def live_demo(example_jobs) -> dict:
    """The demo (examples/digits-mlp.yaml, telemetry every 5 steps) through `gradwatch run --json
    --prometheus-sd-file`, a real Prometheus scraping its ranks through that file, once per session.

    Returns what the tests read: `spec` (what ran), `texts` (rank -> both ranks' /metrics once rank 0 is
    past step 100 with a gradient noise scale and a validation loss), `scraped_at` (when), `prometheus`
    (the gradwatch_step series Prometheus scraped), `result` (the `--json` line), `after_end` (the file_sd
    file once the run ended).
    """
    return example_jobs["live"]


@pytest.fixture(scope="session")
def example_runs(live_demo, dynamics_runs):
    """name -> (run directory, the run's `--json` result) for the demo (`live_demo`) and the four dynamics
    examples (`dynamics_runs`)."""
    result = live_demo["result"]
    return {"digits-mlp": (Path(result["run_dir"]), result), **dynamics_runs}
