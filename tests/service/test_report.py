"""Run reports: real runs drawn in Debian's headless Chromium, the service's live page, the size budget.

The real runs come from the session's `example_runs` (tests/conftest.py): the demo through
`gradwatch run --json` (`live_demo`), the four dynamics examples through `run_job`, what that command
calls and prints (`dynamics_runs`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.api.routes import create_app
from service.cli.main import app as cli
from service.report.report import MAX_POINTS, PHASE_WORDS, anomaly_name, load_run, plotly_js_packed, render_report
from service.settings import Settings
from tests.conftest import EXAMPLES
from tests.promstack import free_port, require
from tests.service.fakes import FakeCluster, spec
from tests.stack import serve_app

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
# Headless Chromium as root on a closed network: no sandbox, no GPU, and no background traffic.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DYNAMICS = {
    "diverging": "divergence",
    "stalled": "plateau",
    "overfitting": "overfitting",
    "vanishing": "vanishing_gradients",
}
TOKEN = "report-token"

# Runs in the page: every chart drew something (SVG lines or points, or a heatmap image) at a real size.
CHECK_CHARTS = """() => [...document.querySelectorAll('.gw-chart')].map(div => {
    const box = div.getBoundingClientRect();
    const lines = [...div.querySelectorAll('.scatterlayer path.js-line')]
        .filter(p => /^M[^L]*L/.test(p.getAttribute('d') || '')).length;
    const images = [...div.querySelectorAll('.heatmaplayer image')]
        .filter(i => (i.getAttribute('href') || '').startsWith('data:image/')).length;
    return {id: div.id, width: box.width, height: box.height, traces: (div.data || []).length,
            lines, points: div.querySelectorAll('.scatterlayer .point').length, images,
            svg: div.querySelectorAll('svg.main-svg').length};
})"""
CHECK_ANOMALIES = """() => {
    const gd = document.getElementById('loss');
    const trace = (gd.data || []).find(t => t.name === 'anomalies');
    return {x: trace ? Array.from(trace.x) : [], text: trace ? Array.from(trace.text) : [],
            drawn: [...gd.querySelectorAll('.annotation .annotation-text')].map(t => t.textContent),
            diagnosis: [...document.querySelectorAll('.diagnosis li')].map(li => li.textContent)};
}"""

MARKERS = "Object.fromEntries(document.getElementById('loss').data.filter(t => t.meta).map(t => [t.meta, t.x]))"


@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_report(browser, path: Path):
    """The page drawn; returns it with what it logged and every request it made."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri())
    # A selector, not wait_for_function: polling a string expression is an eval in the page, which the
    # report's CSP refuses (no 'unsafe-eval') whenever the charts are not drawn at the first look.
    page.wait_for_selector("body[data-charts]", state="attached", timeout=60_000)
    assert page.evaluate("document.body.dataset.charts") == "drawn", page.inner_text("#gw-load")
    return page, problems, requests


def assert_every_chart_drew(page, expected: set[str]) -> list[dict]:
    charts = page.evaluate(CHECK_CHARTS)
    ids = {c["id"] for c in charts}
    assert expected <= ids and all(i.startswith(("scalar-", "val-", "system-")) for i in ids - expected), charts
    for chart in charts:
        assert chart["svg"] >= 1 and chart["traces"] >= 1, chart
        assert chart["width"] > 300 and chart["height"] > 200, chart
        if chart["id"] == "layer-grad":
            assert chart["images"] == 1, chart
        else:
            assert chart["lines"] + chart["points"] >= 1, chart
    return charts


ALL_CHARTS = {"loss", "lr", "norms", "layer-grad", "update-ratio", "noise-scale", "step-time"}


# ------------------------------------------------------------- real runs
@pytest.mark.ray
def test_the_demo_report_draws_every_chart_offline_in_chromium(example_runs, browser, tmp_path):
    run_dir, result = example_runs["digits-mlp"]
    path = tmp_path / "report.html"
    out = subprocess.run(
        [str(BIN / "gradwatch"), "report", str(run_dir), "-o", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert out.returncode == 0, out.stderr
    assert f"wrote {path}" in out.stderr
    page, problems, requests = open_report(browser, path)
    assert problems == []
    assert requests == [path.resolve().as_uri()], "the page must not fetch anything"
    assert_every_chart_drew(page, ALL_CHARTS)
    # one step-time line per rank, from each rank's own file
    assert page.evaluate("document.getElementById('step-time').data.map(t => t.name)") == ["rank 0", "rank 1"]
    layers = page.evaluate("document.getElementById('layer-grad').data[0].y")
    assert layers == list(json.loads((run_dir / "history.jsonl").read_text().splitlines()[0])["layer_grad_norm"])
    header = page.inner_text("header")
    assert result["job_id"] in header and "succeeded" in header
    assert "mlp" in header and "adamw lr 0.003" in header
    for phase in result["phases"]:
        assert f"{PHASE_WORDS[phase['phase']][0]} from step {phase['step']}" in header
    assert result["anomalies"] == []
    found = page.evaluate(CHECK_ANOMALIES)
    assert found["x"] == [] and found["drawn"] == []
    assert any(line.startswith("No anomalies") for line in found["diagnosis"])
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.close()


@pytest.mark.ray
@pytest.mark.parametrize("name", list(DYNAMICS))
def test_a_dynamics_report_shows_its_anomalies_at_the_steps_the_run_reported(example_runs, browser, tmp_path, name):
    run_dir, result = example_runs[name]
    # the diverging example ends failed once its updates were skipped max_skipped_steps steps
    assert result["state"] == ("failed" if name == "diverging" else "succeeded"), result["error"]
    reported = sorted((a["first_step"], a["kind"]) for a in result["anomalies"])
    assert DYNAMICS[name] in {kind for _, kind in reported}, result["anomalies"]
    path = tmp_path / f"{name}.html"
    path.write_text(render_report(load_run(run_dir)))
    page, problems, requests = open_report(browser, path)
    assert problems == [] and requests == [path.resolve().as_uri()]
    assert_every_chart_drew(page, ALL_CHARTS)
    found = page.evaluate(CHECK_ANOMALIES)
    assert sorted(zip(found["x"], found["text"], strict=True)) == reported
    assert sorted(found["drawn"]) == sorted(kind for _, kind in reported)  # the labels are on the chart
    for step, kind in reported:
        assert any(
            line.startswith(f"{anomaly_name(kind).capitalize()} first at step {step}") for line in found["diagnosis"]
        ), found["diagnosis"]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    markers = page.evaluate(MARKERS)
    assert markers.get("skipped steps", []) == [r["step"] for r in history if r.get("nonfinite")]
    page.close()


def test_rollbacks_and_restarts_are_marked_where_the_loop_recorded_them(browser, tmp_path):
    from gradwatch.spec import load_spec
    from workers.loop import Trainer
    from workers.session import LocalSession

    data = yaml.safe_load((EXAMPLES / "diverging.yaml").read_text())
    data.update(scaling={"num_workers": 1}, max_steps=300, on_divergence="rollback")
    spec_ = load_spec(data)
    run_dir, session = tmp_path / "gw-rollback", LocalSession(tmp_path / "ckpt")
    run_dir.mkdir()
    assert Trainer(spec_, session, run_dir=run_dir).train().rollbacks >= 1
    Trainer(spec_, session, run_dir=run_dir).train()  # a restarted worker group resumes at the last checkpoint
    (run_dir / "spec.json").write_text(json.dumps(spec_.model_dump(mode="json")))
    events = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if '"event"' in line]
    rollbacks = [e["step"] for e in events if e["event"] == "rollback"]
    assert rollbacks and [e["step"] for e in events if e["event"] == "restart"] == [300]
    path = tmp_path / "rollback.html"
    path.write_text(render_report(load_run(run_dir)))
    page, problems, _ = open_report(browser, path)
    assert problems == []
    markers = page.evaluate(MARKERS)
    assert markers["rollbacks"] == rollbacks and markers["restarts"] == [300]
    text = page.inner_text(".diagnosis")
    assert f"Rollback at step {rollbacks[0]}: back to step" in text and "resumed at step 300" in text
    page.close()


# ---------------------------------------------------------------- budget
def synthetic_run(run_dir: Path, steps: int = 10_000, layers: int = 32, interval: int = 10) -> None:
    """A long run's files, shaped like a real one's (values follow smooth curves with noise)."""
    import random

    rng = random.Random(0)
    run_dir.mkdir(parents=True)
    names = [f"blocks.{i}.mlp" for i in range(layers)]
    spec_ = {
        "name": "long-run",
        "model": {"name": "char-transformer"},
        "data": {"name": "text"},
        "optimizer": {"name": "adamw", "lr": 3e-4},
        "batch_size": 32,
        "max_steps": steps,
        "scaling": {"num_workers": 2},
        "telemetry": {"interval": interval},
    }
    (run_dir / "spec.json").write_text(json.dumps(spec_))
    with (
        (run_dir / "history.jsonl").open("w") as history,
        (run_dir / "steps-rank0.jsonl").open("w") as rank0,
        (run_dir / "steps-rank1.jsonl").open("w") as rank1,
    ):
        for step in [1, *range(interval, steps + 1, interval)]:
            loss = 0.8 + 3.5 * math.exp(-step / 800) + rng.gauss(0, 0.05)
            history.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": loss,
                        "global_loss": loss,
                        "loss_ema": loss,
                        "grad_norm": 1 + rng.random(),
                        "lr": 3e-4,
                        "step_seconds": 0.04,
                        "weight_norm": 50.0,
                        "gradient_noise_scale": 100 + step / 50,
                        "layer_grad_norm": {n: 10 ** (-i / 8 + rng.gauss(0, 0.1)) for i, n in enumerate(names)},
                        "layer_weight_norm": {n: 5.0 for n in names},
                        "layer_update_ratio": {n: 10 ** (-3 - i / 16 + rng.gauss(0, 0.1)) for i, n in enumerate(names)},
                        "phase": "refinement",
                        "anomalies": [],
                    }
                )
                + "\n"
            )
            if step % 50 == 0:
                history.write(
                    json.dumps(
                        {
                            "step": step,
                            "val_loss": loss + 0.1,
                            "val_accuracy": None,
                            "phase": "refinement",
                            "anomalies": [],
                        }
                    )
                    + "\n"
                )
            for f in (rank0, rank1):
                f.write(json.dumps({"step": step, "step_seconds": 0.04 + rng.random() / 100}) + "\n")
    (run_dir / "result.json").write_text(
        json.dumps(
            {
                "job_id": "gw-long",
                "state": "succeeded",
                "steps": steps,
                "world_size": 2,
                "wall_seconds": 3600.0,
                "phases": [
                    {"phase": "warmup", "step": 1},
                    {"phase": "rapid_learning", "step": 30},
                    {"phase": "refinement", "step": 900},
                ],
                "anomalies": [],
            }
        )
    )


def test_a_10000_step_32_layer_report_is_under_5_mb_in_under_5_s(browser, tmp_path):
    run_dir = tmp_path / "gw-long"
    synthetic_run(run_dir)
    plotly_js_packed.cache_clear()  # from cold: the bundle is compressed once per process
    start = time.perf_counter()
    run = load_run(run_dir)
    path = tmp_path / "long.html"
    path.write_text(render_report(run))
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    assert size < 5_000_000, f"{size / 1e6:.2f} MB"
    assert seconds < 5.0, f"{seconds:.2f} s"
    assert run.stride == 1 and len(run.steps) == 1001 and len(run.vals) == 200  # nothing thinned out
    page, problems, _ = open_report(browser, path)
    assert problems == []
    assert_every_chart_drew(page, ALL_CHARTS)
    assert len(page.evaluate("document.getElementById('layer-grad').data[0].y")) == 32
    assert page.evaluate("document.getElementById('update-ratio').data.length") == 32
    page.close()


def test_a_longer_history_is_thinned_but_keeps_every_validation_and_event(tmp_path):
    run_dir = tmp_path / "gw-thin"
    run_dir.mkdir()
    lines: list[dict] = []
    for step in range(1, 3 * MAX_POINTS + 1):
        lines.append({"step": step, "loss": 1.0, "global_loss": 1.0, "loss_ema": 1.0, "grad_norm": 1.0})
        if step % 100 == 0:
            lines.append({"step": step, "val_loss": 1.0, "val_accuracy": None})
    lines.append({"step": 5000, "event": "rollback", "to_step": 4000, "lr_scale": 0.5})
    lines.append(
        {"step": 4001, "loss": float("nan"), "global_loss": float("nan"), "grad_norm": float("nan"), "nonfinite": True}
    )
    (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4002, "lo')
    run = load_run(run_dir)
    assert run.stride == 4 and MAX_POINTS // 2 < len(run.steps) <= MAX_POINTS
    assert len(run.vals) == 3 * MAX_POINTS // 100 and len(run.events) == 1 and len(run.nonfinite) == 1
    assert run.unreadable_lines == 1  # the half-written last line of a live run
    page = render_report(run)
    assert "every 4th measured step is drawn" in page and "1 unreadable history lines skipped" in page
    assert "Rollback at step 5000: back to step 4000" in page and "non-finite loss or gradient" in page


# --------------------------------------------------------------- service
@pytest.mark.ray
def test_the_service_serves_the_report_live_with_the_jobs_auth(example_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")  # the Host TestClient sends
    demo_dir, _ = example_runs["digits-mlp"]
    settings = Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False)
    app = create_app(settings, cluster=FakeCluster(cpus=4))
    reader = {"Authorization": f"Bearer {app.state.store.users.add('reader', ['read-all'])}"}
    others = {"Authorization": f"Bearer {app.state.store.users.add('bob', ['read'])}"}
    alertmanager = {"Authorization": f"Bearer {app.state.store.users.add('am', ['alerts:write'])}"}
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        job = api.post("/v1/jobs", json=spec("live-report")).json()
        url = f"/v1/jobs/{job['id']}/report"
        assert api.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.get(url, headers=alertmanager).status_code == 403  # as for the job itself
        assert api.get(f"/v1/jobs/{job['id']}", headers=alertmanager).status_code == 403
        assert api.get(url, headers=reader).status_code == 200
        assert api.get(url, headers=others).status_code == 404  # another user's report, as for no job
        queued = api.get(url)
        assert queued.status_code == 200 and queued.headers["content-type"].startswith("text/html")
        assert 'class="state queued"' in queued.text and "No steps recorded yet." in queued.text
        assert 'id="loss-empty"' in queued.text
        assert api.get("/v1/jobs/gw-nobody/report").status_code == 404

        # running: the page follows the history as the driver appends to it
        app.state.store.jobs.transition(job["id"], "running", "placed on Ray")
        run_dir = settings.runs_dir / job["id"]
        run_dir.mkdir(parents=True)
        shutil.copy(demo_dir / "spec.json", run_dir)
        history = (demo_dir / "history.jsonl").read_text().splitlines(keepends=True)
        (run_dir / "history.jsonl").write_text("".join(history[:10]))
        first = api.get(url).text
        assert 'class="state running"' in first
        (run_dir / "history.jsonl").write_text("".join(history))
        later = api.get(url).text
        steps = [figure_steps(page) for page in (first, later)]
        assert steps[0] < steps[1] == max(json.loads(line)["step"] for line in history)


def figure_steps(page: str) -> int:
    """The last step in a page's learning-rate chart (decoded from its typed array)."""
    import base64

    import numpy as np

    figures = json.loads(page.split('id="gw-figures">', 1)[1].split("</script>", 1)[0])
    x = figures["lr"]["data"][0]["x"]
    return int(np.frombuffer(base64.b64decode(x["bdata"]), dtype="<f4").max())


@pytest.fixture
def server(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", token=TOKEN, scheduler_enabled=False)
    app = create_app(settings, cluster=FakeCluster(cpus=4))
    with serve_app(app) as url:
        yield url


def test_status_prints_the_report_url_and_report_fetches_it(server, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADWATCH_URL", server)
    monkeypatch.setenv("GRADWATCH_TOKEN", TOKEN)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    job = httpx.post(f"{server}/v1/jobs", json=spec("cli-report"), headers={"Authorization": f"Bearer {TOKEN}"}).json()
    runner = CliRunner()
    status = runner.invoke(cli, ["status", job["id"]])
    assert status.exit_code == 0, status.output
    assert f"{server}/v1/jobs/{job['id']}/report" in status.output
    made = runner.invoke(cli, ["report", job["id"]])  # not a directory here: asks the service
    assert made.exit_code == 0, made.output
    page = (tmp_path / f"{job['id']}-report.html").read_text()
    assert "cli-report" in page and 'id="gw-plotly"' in page
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("GRADWATCH_TOKEN", "not-the-token")  # --token-file wins over the environment
    by_file = runner.invoke(cli, ["report", job["id"], "--token-file", str(token_file), "-o", "by-file.html"])
    assert by_file.exit_code == 0, by_file.output
    assert "cli-report" in (tmp_path / "by-file.html").read_text()
    monkeypatch.setenv("GRADWATCH_TOKEN", TOKEN)
    missing = runner.invoke(cli, ["report", "gw-nobody"])
    assert missing.exit_code == 1 and "no job 'gw-nobody'" in missing.output


def test_report_refuses_what_is_not_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("GRADWATCH_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = runner.invoke(cli, ["report", str(empty)])
    assert out.exit_code == 1 and "not a gradwatch run directory" in out.output
    out = runner.invoke(cli, ["report", str(tmp_path / "nothing" / "here")])
    assert out.exit_code == 1 and "no run directory" in out.output
    out = runner.invoke(cli, ["report", "gw-elsewhere", "--storage-path", str(tmp_path)])
    assert out.exit_code == 1 and "cannot reach the gradwatch service" in " ".join(out.output.split())  # wrapped
    assert not any(tmp_path.glob("*.html"))
