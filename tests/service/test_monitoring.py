"""The Prometheus and Alertmanager `gradwatch up` runs: found on PATH, configured for the service, stopped."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from service.settings import Settings
from service.stack.monitoring import Monitoring, MonitoringUnavailable, choose_port, find_binaries, service_url
from tests.promstack import ALERTMANAGER, PROMETHEUS, free_port, require, wait_for


def executable(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_missing_binaries_are_named_with_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MonitoringUnavailable) as missing:
        find_binaries()
    assert "prometheus and prometheus-alertmanager not found on PATH" in str(missing.value)
    assert "apt-get install -y --no-install-recommends prometheus prometheus-alertmanager" in str(missing.value)
    assert "--no-monitoring" in str(missing.value)
    executable(tmp_path, "prometheus")
    with pytest.raises(MonitoringUnavailable, match=r"^prometheus-alertmanager not found"):
        find_binaries()
    executable(tmp_path, "alertmanager")  # upstream's name serves as well as Debian's
    assert find_binaries() == (str(tmp_path / "prometheus"), str(tmp_path / "alertmanager"))


def test_ports_default_when_free_and_a_taken_one_is_refused_by_its_option():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert choose_port(None, port, "--prometheus-port") != port  # the default is taken: any free one
        with pytest.raises(MonitoringUnavailable, match=rf"port {port} on 127.0.0.1 is in use \(--prometheus-port\)"):
            choose_port(port, 9090, "--prometheus-port")
    assert choose_port(None, port, "--prometheus-port") == port
    assert choose_port(0, port, "--prometheus-port") not in (0, port)


def test_a_wildcard_bind_is_reached_on_loopback():
    assert service_url(Settings(host="0.0.0.0", port=8765)) == "http://127.0.0.1:8765"
    assert service_url(Settings(host="::", port=8765)) == "http://[::1]:8765"
    assert service_url(Settings(host="127.0.0.1", port=1234)) == "http://127.0.0.1:1234"


@pytest.mark.prometheus
def test_prometheus_and_alertmanager_run_the_shipped_configs_for_the_service(tmp_path):
    require(PROMETHEUS)
    require(ALERTMANAGER)
    settings = Settings(data_dir=tmp_path, port=free_port(), token="service-token")
    monitoring = Monitoring.start(settings, prometheus_port=0, alertmanager_port=0)
    try:
        folder = tmp_path / "monitoring"
        token, am_token = tmp_path / "prometheus.token", tmp_path / "alertmanager.token"
        texts = {path.read_text().strip() for path in (token, am_token)}
        assert len(texts) == 2 and "service-token" not in texts  # each its own narrow token, not the admin's
        assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in (token, am_token))
        prom = yaml.safe_load((folder / "prometheus.yml").read_text())
        sd = next(j for j in prom["scrape_configs"] if j["job_name"] == "gradwatch-workers")["http_sd_configs"][0]
        assert sd["url"] == f"{settings.url}/v1/targets"
        assert sd["authorization"] == {"type": "Bearer", "credentials_file": str(token)}
        assert prom["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
            monitoring.alertmanager.url.removeprefix("http://")
        ]
        am = yaml.safe_load((folder / "alertmanager.yml").read_text())
        hook = am["receivers"][0]["webhook_configs"][0]
        assert hook["url"] == f"{settings.url}/v1/alerts"
        assert hook["http_config"]["authorization"]["credentials_file"] == str(am_token)
        # Prometheus loaded the shipped rules and knows its Alertmanager
        rules = httpx.get(f"{monitoring.prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert "TrainingLossNonFinite" in {r["name"] for g in rules for r in g["rules"]}
        wait_for(
            lambda: httpx.get(f"{monitoring.prometheus.url}/api/v1/alertmanagers", timeout=5).json()["data"][
                "activeAlertmanagers"
            ],
            timeout=30,
            what="Prometheus to find its Alertmanager",
        )
        assert (folder / "prometheus").is_dir() and (folder / "alertmanager").is_dir()  # data under the data dir
    finally:
        monitoring.stop()
    assert monitoring.prometheus.process.returncode is not None
    assert monitoring.alertmanager.process.returncode is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{monitoring.prometheus.url}/-/ready", timeout=2)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.prometheus
def test_they_die_with_a_killed_service(tmp_path):
    require(PROMETHEUS)
    require(ALERTMANAGER)
    script = (
        "import signal\n"
        "from service.stack.monitoring import Monitoring\n"
        "from service.settings import Settings\n"
        f"m = Monitoring.start(Settings(data_dir={str(tmp_path)!r}, port={free_port()}, token='t'), 0, 0)\n"
        "print(m.prometheus.process.pid, m.alertmanager.process.pid, flush=True)\n"
        "signal.pause()  # until the test kills it\n"
    )
    service = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in service.stdout.readline().split()]
        assert len(children) == 2 and all(alive(pid) for pid in children)
    finally:
        service.kill()  # SIGKILL: no `finally` of its own runs
        service.wait()
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=15, what="Prometheus and Alertmanager to exit")
