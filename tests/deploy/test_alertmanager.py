"""The shipped Prometheus and Alertmanager configs: valid as shipped and as rendered, and working live.

The live tests run the real binaries with the rendered configs against small local HTTP servers
that stand in for the gradwatch service (/metrics, /v1/targets, /v1/alerts) and one worker.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from deploy.render import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    render_alertmanager_config,
    render_prometheus_config,
)
from tests.promstack import AMTOOL, PROMTOOL, query, require, start_alertmanager, start_prometheus, wait_for

TOKEN = "test-token-3f9a"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


# ---- static checks


def test_amtool_accepts_the_shipped_config():
    result = _run(require(AMTOOL), "check-config", str(ALERTMANAGER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_rendered_config(tmp_path, token_file):
    config = tmp_path / "alertmanager.yml"
    config.write_text(
        render_alertmanager_config(
            "http://127.0.0.1:18765/v1/alerts",
            token_file,
            group_wait="1s",
            group_interval="1s",
            repeat_interval="1m",
            critical_repeat_interval="30s",
        )
    )
    result = _run(require(AMTOOL), "check-config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_shipped_and_rendered_prometheus_config(tmp_path, token_file):
    # The shipped file names token files that exist only where it is deployed.
    shipped = _run(require(PROMTOOL), "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG))
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text(
        render_prometheus_config(
            "http://127.0.0.1:18765",
            token_file,
            "http://127.0.0.1:19093",
            scrape_interval="1s",
            eval_interval="1s",
            sd_refresh_interval="1s",
        )
    )
    rendered = _run(require(PROMTOOL), "check", "config", str(config))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr


def test_rendering_overrides_only_addresses_paths_and_timings(token_file):
    import yaml

    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    rendered = yaml.safe_load(
        render_prometheus_config(
            "https://svc:9000/gw", token_file, None, rule_files=["/r.yml"], scrape_interval="2s", eval_interval="3s"
        )
    )
    assert rendered["global"] == {"scrape_interval": "2s", "evaluation_interval": "3s"}
    assert rendered["rule_files"] == ["/r.yml"] and "alerting" not in rendered
    service, workers = rendered["scrape_configs"]
    assert service["static_configs"] == [{"targets": ["svc:9000"]}]
    assert service["metrics_path"] == "/gw/metrics"
    assert service["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}
    assert workers["http_sd_configs"][0]["url"] == "https://svc:9000/gw/v1/targets"
    assert workers["http_sd_configs"][0]["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}
    assert workers["honor_labels"] is shipped["scrape_configs"][1]["honor_labels"] is True

    am = yaml.safe_load(render_alertmanager_config("http://svc/v1/alerts", None, group_wait="1s"))
    assert am["route"]["group_wait"] == "1s" and am["route"]["group_by"] == ["job_id", "alertname"]
    hook = am["receivers"][0]["webhook_configs"][0]
    assert hook == {"url": "http://svc/v1/alerts", "send_resolved": True, "max_alerts": 1000}
    with pytest.raises(ValueError, match="webhook_url"):
        render_alertmanager_config("127.0.0.1:8765/v1/alerts")


# ---- live: a stand-in for the service and a worker

Route = Callable[[dict], tuple[int, str, str]]


class Recorder:
    """What a stand-in server received, for the test to wait on."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def add(self, **request) -> None:
        with self.lock:
            self.requests.append(request)

    def matching(self, predicate: Callable[[dict], bool]) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if predicate(r)]


@contextmanager
def serve(routes: dict[tuple[str, str], Route]) -> Iterator[tuple[str, Recorder]]:
    """An HTTP server on a free port: routes map (method, path) to f(request) -> (status, type, body)."""
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            request = {"method": method, "path": self.path, "headers": dict(self.headers), "body": body}
            recorder.add(**request)
            route = routes.get((method, self.path.split("?")[0]))
            status, content_type, text = route(request) if route else (404, "text/plain", "not found")
            payload = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()


def _webhooks(recorder: Recorder, status: str | None = None, **labels: str) -> list[dict]:
    """Alertmanager webhook payloads received, optionally of one status and with these group labels."""
    found = []
    for request in recorder.matching(lambda r: r["method"] == "POST" and r["path"] == "/v1/alerts"):
        payload = json.loads(request["body"])
        if status and payload["status"] != status:
            continue
        if any(payload["groupLabels"].get(k) != v for k, v in labels.items()):
            continue
        found.append({**payload, "_headers": request["headers"]})
    return found


def _alertmanager_post(url: str, alerts: list[dict]) -> None:
    httpx.post(f"{url}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()


@pytest.mark.prometheus
def test_alertmanager_delivers_to_the_service_with_its_token(tmp_path, token_file):
    with serve({("POST", "/v1/alerts"): lambda r: (200, "text/plain", "ok")}) as (service_url, recorder):
        config = render_alertmanager_config(
            f"{service_url}/v1/alerts", token_file, group_wait="1s", group_interval="1s"
        )
        with start_alertmanager(config, tmp_path) as am:
            now = datetime.now(UTC)
            alert = {
                "labels": {"alertname": "TrainingDiverging", "job_id": "j1", "severity": "critical"},
                "annotations": {"summary": "Job j1 is diverging", "dashboard": "/d/gradwatch-run?var-job_id=j1"},
                "startsAt": now.isoformat(),
            }
            # A warning of the same job is inhibited by its critical alert; one of another job is not.
            warning = {
                "labels": {"alertname": "TrainingLossSpike", "job_id": "j1", "severity": "warning"},
                "startsAt": now.isoformat(),
            }
            other = {
                "labels": {"alertname": "TrainingLossSpike", "job_id": "j2", "severity": "warning"},
                "startsAt": now.isoformat(),
            }
            _alertmanager_post(am.url, [alert, warning, other])

            firing = wait_for(
                lambda: _webhooks(recorder, "firing", job_id="j1"), timeout=20, what="the firing notification"
            )[0]
            assert firing["_headers"]["Authorization"] == f"Bearer {TOKEN}"
            assert firing["groupLabels"] == {"alertname": "TrainingDiverging", "job_id": "j1"}
            assert firing["alerts"][0]["annotations"]["dashboard"] == "/d/gradwatch-run?var-job_id=j1"
            wait_for(lambda: _webhooks(recorder, "firing", job_id="j2"), timeout=20, what="j2's warning")
            assert not _webhooks(recorder, alertname="TrainingLossSpike", job_id="j1"), "not inhibited"

            _alertmanager_post(am.url, [{**alert, "endsAt": datetime.now(UTC).isoformat()}])
            resolved = wait_for(
                lambda: _webhooks(recorder, "resolved", job_id="j1"), timeout=20, what="the resolved notification"
            )[0]
            assert resolved["alerts"][0]["labels"]["alertname"] == "TrainingDiverging"


WORKER_METRICS = """\
# TYPE gradwatch_loss_ema gauge
gradwatch_loss_ema{{job_id="live",rank="0"}} {ema}
# TYPE gradwatch_last_step_timestamp_seconds gauge
gradwatch_last_step_timestamp_seconds{{job_id="live",rank="0"}} {heartbeat}
# TYPE gradwatch_nonfinite_total counter
gradwatch_nonfinite_total{{job_id="live",rank="0",kind="loss"}} 0
"""


@pytest.mark.prometheus
def test_a_nan_loss_reaches_the_service_and_resolves_when_the_job_ends(tmp_path, token_file):
    """Worker -> Prometheus (HTTP SD with the token) -> rules -> Alertmanager -> service webhook."""
    job = {"ema": "2.0", "running": True}

    def worker_metrics(_request):
        heartbeat = datetime.now(UTC).timestamp()
        return 200, "text/plain; version=0.0.4", WORKER_METRICS.format(ema=job["ema"], heartbeat=heartbeat)

    with serve({("GET", "/metrics"): worker_metrics}) as (worker_url, _):

        def targets(request):
            if request["headers"].get("Authorization") != f"Bearer {TOKEN}":
                return 401, "application/json", '{"detail": "bearer token required"}'
            live = [{"targets": [worker_url.removeprefix("http://")], "labels": {"job_id": "live", "rank": "0"}}]
            return 200, "application/json", json.dumps(live if job["running"] else [])

        def service_metrics(_request):
            running, succeeded = (1, 0) if job["running"] else (0, 1)
            return (
                200,
                "text/plain; version=0.0.4",
                (
                    "# TYPE gradwatch_job_state gauge\n"
                    f'gradwatch_job_state{{job_id="live",state="running"}} {running}\n'
                    f'gradwatch_job_state{{job_id="live",state="succeeded"}} {succeeded}\n'
                ),
            )

        routes = {
            ("GET", "/metrics"): service_metrics,
            ("GET", "/v1/targets"): targets,
            ("POST", "/v1/alerts"): lambda r: (200, "text/plain", "ok"),
        }
        with serve(routes) as (service_url, service):
            am_config = render_alertmanager_config(
                f"{service_url}/v1/alerts", token_file, group_wait="1s", group_interval="1s"
            )
            with start_alertmanager(am_config, tmp_path) as am:
                prom_config = render_prometheus_config(
                    service_url, token_file, am.url, scrape_interval="1s", eval_interval="1s", sd_refresh_interval="1s"
                )
                with start_prometheus(prom_config, tmp_path) as prom:
                    series = wait_for(
                        lambda: query(prom.url, 'gradwatch_loss_ema{job_id="live"}'),
                        timeout=30,
                        what="the worker's first scrape via HTTP SD",
                    )
                    labels = series[0]["metric"]
                    assert labels["job"] == "gradwatch-workers" and labels["rank"] == "0"
                    assert "exported_job_id" not in labels  # honor_labels keeps the worker's own job_id
                    assert not _webhooks(service)

                    job["ema"] = "NaN"
                    firing = wait_for(
                        lambda: _webhooks(service, "firing", job_id="live"),
                        timeout=30,
                        what="TrainingLossNonFinite at the service",
                    )[0]
                    assert firing["_headers"]["Authorization"] == f"Bearer {TOKEN}"
                    alert = firing["alerts"][0]
                    assert alert["labels"] == {
                        "alertname": "TrainingLossNonFinite",
                        "job_id": "live",
                        "severity": "critical",
                    }
                    assert alert["annotations"]["dashboard"] == "/d/gradwatch-run?var-job_id=live"

                    job["running"] = False  # the job ends: state succeeded, endpoint leaves discovery
                    wait_for(
                        lambda: _webhooks(service, "resolved", job_id="live"),
                        timeout=30,
                        what="the alert to resolve once the job ended",
                    )
                    assert not query(prom.url, 'ALERTS{alertstate="firing", job_id="live"}')


def test_wait_for_reports_what_it_waited_for():
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, timeout=0.3, interval=0.1, what="the impossible")
    assert wait_for(lambda: [1], timeout=1) == [1]
