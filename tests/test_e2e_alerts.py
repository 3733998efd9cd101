"""End to end: real Ray, the service, real Prometheus and Alertmanager with the shipped configs.

Prometheus discovers the workers through the service's /v1/targets, evaluates the shipped rules
every second and sends alerts to Alertmanager, which delivers them to the service's webhook.
Only addresses, paths and intervals are overridden (deploy/render.py). The same scraped data
then runs every dashboard panel's query, with the template variables of a real job.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import httpx
import pytest
import yaml

from dashboards.build import panel_queries, substitute
from deploy.render import render_alertmanager_config, render_prometheus_config
from service.auth import consumer_token_file
from service.settings import Settings
from tests.conftest import EXAMPLES, REPO
from tests.promstack import query, start_alertmanager, start_prometheus, wait_for
from tests.stack import Service

pytestmark = [pytest.mark.ray, pytest.mark.prometheus, pytest.mark.timeout(1200)]

DIVERGENCE_ALERTS = {"TrainingLossNonFinite", "TrainingDiverging"}


@pytest.fixture(scope="module")
def stack(ray_head, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    svc = Service(ray_head, tmp / "gradwatch")
    (tmp / "gradwatch").mkdir(exist_ok=True)
    svc.start()
    # Prometheus and Alertmanager each with their own narrow token, as deployed.
    settings = Settings(data_dir=tmp / "gradwatch")
    am_config = render_alertmanager_config(webhook_url=f"{svc.url}/v1/alerts",
                                           token_file=consumer_token_file(settings, "alertmanager"),
                                           group_wait="1s", group_interval="1s")
    with start_alertmanager(am_config, tmp) as am:
        prom_config = render_prometheus_config(service_url=svc.url,
                                               token_file=consumer_token_file(settings, "prometheus"),
                                               alertmanager_url=am.url, scrape_interval="1s",
                                               eval_interval="1s", sd_refresh_interval="1s")
        with start_prometheus(prom_config, tmp) as prom:
            yield SimpleNamespace(svc=svc, client=svc.client, am=am, prom=prom, started=time.time(), jobs={})
    for job in svc.client.jobs(state=["queued", "running"]):
        svc.client.cancel(job["id"])
    svc.stop()


def submit(stack, example: str) -> dict:
    job = stack.client.submit(yaml.safe_load((EXAMPLES / f"{example}.yaml").read_text()))
    stack.jobs[example] = job["id"]
    return job


def alert_names(stack, job_id: str) -> set[str]:
    return {a["alertname"] for a in stack.client.alerts(job_id=job_id)}


def wait_for_alert(stack, job_id: str, names: set[str], timeout: float) -> set[str]:
    def arrived():
        state = stack.client.get(job_id)["state"]
        assert state in ("queued", "running"), f"{job_id} ended {state} before any of {names} arrived"
        return alert_names(stack, job_id) & names

    return wait_for(arrived, timeout=timeout, interval=1, what=f"{'/'.join(sorted(names))} for {job_id}")


def test_a_healthy_run_raises_no_alert(stack):
    job = submit(stack, "digits-mlp")
    done = stack.client.wait(job["id"], timeout=400)
    assert done["state"] == "succeeded", done["reason"]
    assert done["step"] == 600
    # the run's last scrapes have been evaluated by the rules
    wait_for(lambda: not stack.client.targets(), timeout=30, what="the finished job to leave /v1/targets")
    time.sleep(4)
    assert alert_names(stack, job["id"]) == set()
    fired = query(stack.prom.url, f'count_over_time(ALERTS{{job_id="{job["id"]}"}}[30m])')
    assert fired == [], fired


def test_a_diverging_run_is_reported_as_diverging(stack):
    job = submit(stack, "diverging")
    arrived = wait_for_alert(stack, job["id"], DIVERGENCE_ALERTS, timeout=300)
    assert arrived
    alert = next(a for a in stack.client.alerts(job_id=job["id"]) if a["alertname"] in DIVERGENCE_ALERTS)
    assert alert["severity"] == "critical" and alert["status"] == "firing"
    assert alert["summary"] and alert["description"]
    status = stack.client.get(job["id"])
    assert {a["alertname"] for a in status["alerts"]} & DIVERGENCE_ALERTS
    stack.client.cancel(job["id"])
    assert stack.client.wait(job["id"], timeout=60)["state"] == "cancelled"


def test_a_stalled_run_is_reported_as_stalled(stack):
    job = submit(stack, "stalled")
    wait_for_alert(stack, job["id"], {"TrainingStalled"}, timeout=400)
    alert = next(a for a in stack.client.alerts(job_id=job["id"]) if a["alertname"] == "TrainingStalled")
    assert alert["severity"] == "warning"
    assert not alert_names(stack, job["id"]) & DIVERGENCE_ALERTS
    stack.client.cancel(job["id"])
    ended = stack.client.wait(job["id"], timeout=60)
    assert ended["state"] == "cancelled"


# Panels that cannot return data for a healthy job, and why.
NO_DATA_FOR_A_HEALTHY_JOB = {
    ("gradwatch-run", "Alerts for this run"): "an alert list: a healthy run has no alert",
    ("gradwatch-run", "annotation: Alerts"): "alert annotations: a healthy run has no alert",
}


def test_every_dashboard_panel_returns_data(stack):
    healthy = stack.jobs.get("digits-mlp")
    assert healthy, "runs after test_a_healthy_run_raises_no_alert"
    variables = {"job_id": healthy, "team": "vision", "project": "demo", "state": ".*"}
    start, end = stack.started, time.time()
    problems, ran = [], 0
    for path in sorted((REPO / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for title, expr in panel_queries(board):
            promql = substitute(expr, variables)
            response = httpx.get(f"{stack.prom.url}/api/v1/query_range",
                                 params={"query": promql, "start": start, "end": end, "step": 2}, timeout=30)
            body = response.json()
            ran += 1
            if body.get("status") != "success":
                problems.append(f"{board['uid']} / {title}: error {body.get('error')} in {promql}")
            elif not body["data"]["result"] and (board["uid"], title) not in NO_DATA_FOR_A_HEALTHY_JOB:
                problems.append(f"{board['uid']} / {title}: no data for {promql}")
    assert ran >= 30
    assert not problems, "\n".join(problems)
