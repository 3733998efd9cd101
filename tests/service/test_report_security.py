"""A report of a real two-rank run (tests/service/report_run.py) whose layer names, job name, labels, events
and anomaly kinds hold markup: drawn in headless Chromium under the report's own CSP, every series of every
chart drawn, no markup or script from the names; the service sends the policy as headers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.routes import create_app
from service.report.report import content_security_policy, load_run, render_report
from service.settings import Settings
from tests.conftest import REPO
from tests.service.fakes import FakeCluster, spec
from tests.service.report_run import HOSTILE_LAYERS, INTERVAL
from tests.service.test_report import browser  # noqa: F401 - the module's Chromium

TOKEN = "report-security-token"
HOSTILE_NAME = "</script><script>alert(1)</script><a href=//evil>x</a><!--<script>"
HOSTILE_TEXT = '<img src=x onerror="alert(2)"><b>bold</b><a href=//evil>x</a>'
STEPS = 120

# Each chart, each trace: drawn (an SVG line with at least one segment, or points, or a heatmap image).
CHECK_TRACES = """() => [...document.querySelectorAll('.gw-chart')].map(div => {
    const scatter = (div.data || []).filter(t => t.type === 'scatter');
    const drawn = [...div.querySelectorAll('.scatterlayer .trace')].map(g =>
        [...g.querySelectorAll('path.js-line')].some(p => /^M[^L]*L/.test(p.getAttribute('d') || ''))
        || g.querySelectorAll('.point').length > 0);
    return {id: div.id, svg: div.querySelectorAll('svg.main-svg').length, names: scatter.map(t => t.name),
            drawn, images: [...div.querySelectorAll('.heatmaplayer image')]
                .filter(i => (i.getAttribute('href') || '').startsWith('data:image/')).length,
            heatmaps: (div.data || []).filter(t => t.type === 'heatmap').length};
})"""
# What markup the page holds that no name may add: links, bold, images, scripts, and any injected handler.
CHECK_MARKUP = """() => ({
    links: document.querySelectorAll('a').length,
    bold: document.querySelectorAll('b').length,
    imgs: document.querySelectorAll('img').length,
    scripts: document.querySelectorAll('script').length,
    evil: [...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on')
        || (/href|src/.test(a.name) && /evil|^x$/.test(a.value)))).length,
    violations: window.__violations,
    alerted: window.__alerted,
})"""
WATCH = """window.__violations = []; window.__alerted = 0;
document.addEventListener('securitypolicyviolation',
    e => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
window.alert = () => { window.__alerted += 1; };"""


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hostile") / "gw-hostile"
    done = subprocess.run(
        [sys.executable, "-m", "tests.service.report_run", str(run_dir), str(STEPS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spec_ = json.loads((run_dir / "spec.json").read_text())
    spec_.update(name=HOSTILE_NAME, labels={"team": HOSTILE_TEXT})
    (run_dir / "spec.json").write_text(json.dumps(spec_))
    result = json.loads((run_dir / "result.json").read_text())
    result["anomalies"] = [{"kind": HOSTILE_TEXT, "first_step": 50}]
    (run_dir / "result.json").write_text(json.dumps(result))
    with (run_dir / "history.jsonl").open("a") as history:
        history.write(json.dumps({"step": 60, "event": "rollback", "to_step": 40, "lr_scale": HOSTILE_TEXT}) + "\n")
        history.write(json.dumps({"step": 70, "event": HOSTILE_TEXT, "cause": HOSTILE_NAME}) + "\n")
    return run_dir


def open_page(browser, url: str, route: tuple[str, dict[str, str]] | None = None):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def dialog(d) -> None:
        problems.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    page.add_init_script(WATCH)
    if route is not None:
        body, headers = route
        page.route(url, lambda r: r.fulfill(status=200, body=body, headers=headers))
    page.goto(url)
    # A selector, not wait_for_function: polling a string expression is an eval in the page, which the
    # report's CSP refuses (no 'unsafe-eval') whenever the charts are not drawn at the first look.
    page.wait_for_selector("body[data-charts]", state="attached", timeout=60_000)
    assert page.evaluate("document.body.dataset.charts") == "drawn", page.inner_text("#gw-load")
    return page, problems


def assert_safe_and_drawn(page, problems: list[str]) -> list[dict]:
    assert problems == []
    markup = page.evaluate(CHECK_MARKUP)
    # the page's own scripts (summary, figures, plotly's packed text, the loader) and plotly.js unpacked
    assert markup == {"links": 0, "bold": 0, "imgs": 0, "scripts": 5, "evil": 0, "violations": [], "alerted": 0}
    charts = page.evaluate(CHECK_TRACES)
    for chart in charts:
        assert chart["svg"] >= 1, chart
        assert len(chart["drawn"]) == len(chart["names"]) and all(chart["drawn"]), chart
        assert chart["images"] == chart["heatmaps"], chart
        assert chart["names"] or chart["heatmaps"], chart
    return charts


def test_a_hostile_run_is_drawn_whole_as_text_under_its_own_policy(hostile_run, browser, tmp_path):  # noqa: F811
    path = tmp_path / "report.html"
    page_text = render_report(load_run(hostile_run))
    path.write_text(page_text)
    for island in ("gw-summary", "gw-figures"):
        body = page_text.split(f'id="{island}">', 1)[1].split("</script>", 1)[0]
        assert not any(c in body for c in "<>&"), island
    assert f'content="{content_security_policy(header=False).replace(chr(39), "&#x27;")}"' in page_text
    page, problems = open_page(browser, path.resolve().as_uri())
    charts = {c["id"]: c for c in assert_safe_and_drawn(page, problems)}
    # every chart there is, with every series the run has
    assert {"loss", "lr", "norms", "layer-grad", "update-ratio", "noise-scale", "step-time"} <= set(charts)
    assert charts["norms"]["names"] == ["gradient norm", "weight norm"]
    assert charts["noise-scale"]["names"][0] == "gradient noise scale (B_simple)"
    assert charts["step-time"]["names"] == ["rank 0", "rank 1"]
    weight = page.evaluate("Array.from(document.getElementById('norms')._fullData[1].x)")
    history = [json.loads(line) for line in (hostile_run / "history.jsonl").read_text().splitlines()]
    measured = [r["step"] for r in history if "weight_norm" in r]
    assert len(measured) < len([r for r in history if "grad_norm" in r]) / (INTERVAL - 1)  # a sparse series
    assert weight == measured
    # the custom scalars, a chart each, and the system metrics per rank
    scalars = {c: page.evaluate(f"document.getElementById('{c}').layout.title.text") for c in charts if "scalar" in c}
    assert sorted(t.split(" ")[0] for t in scalars.values()) == ["accuracy_proxy", "tokens_seen"]
    for chart_id in ("system-process-cpu-cores", "system-rss-bytes", "system-samples-per-second"):
        assert charts[chart_id]["names"] == ["rank 0", "rank 1"], chart_id
    assert page.locator("#system-gpu-empty").count() == 1
    # names are shown as the text they are
    ticks = page.evaluate("[...document.querySelectorAll('#layer-grad .ytick text')].map(t => t.textContent)")
    assert sorted(ticks) == sorted(HOSTILE_LAYERS)
    assert page.inner_text("h1").startswith(HOSTILE_NAME)
    annotations = page.evaluate("[...document.querySelectorAll('#loss .annotation-text')].map(t => t.textContent)")
    assert annotations == [HOSTILE_TEXT]
    header = page.inner_text("header")
    assert f"team={HOSTILE_TEXT}" in header and f"learning rate x{HOSTILE_TEXT}." in header
    # what ran: the entrypoint, and the schedule its learning rate followed
    assert "__main__:train" in header and "model\tNone" not in header and "constant" not in header
    assert "warm-up from" in header and "over steps 1-20" in header and "cosine decay from 0.003" in header
    page.close()


def test_the_service_sends_the_policy_and_chromium_draws_every_chart_under_it(
    hostile_run,
    browser,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    import shutil

    monkeypatch.setenv("GRADWATCH_ALLOWED_HOSTS", "testserver")
    settings = Settings(data_dir=tmp_path, token=TOKEN, scheduler_enabled=False)
    app = create_app(settings, cluster=FakeCluster(cpus=4))
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        job = api.post("/v1/jobs", json=spec("csp-report")).json()
        app.state.store.jobs.transition(job["id"], "running", "placed on Ray")
        shutil.copytree(hostile_run, settings.runs_dir / job["id"])
        response = api.get(f"/v1/jobs/{job['id']}/report")
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert directives["base-uri"] == "'none'" and directives["form-action"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"] and "'unsafe-eval'" not in directives["script-src"]
    assert all(s.startswith("'sha256-") for s in directives["script-src"].split())
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-type"].startswith("text/html")
    url = "http://report.test/v1/jobs/report"
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    page, problems = open_page(browser, url, (response.text, headers))
    charts = assert_safe_and_drawn(page, problems)
    assert len(charts) >= 12
    page.close()
