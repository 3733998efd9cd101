"""Prometheus and Alertmanager as children of `gradwatch up`: the whole alert loop on one machine.

Both come from Debian's packages (`prometheus`, `prometheus-alertmanager`) or upstream's binaries
on PATH and run the shipped configs rendered for this service (deploy/render.py): Prometheus finds
the workers through the service's GET /v1/targets, scrapes them, evaluates the shipped rules and
sends alerts to Alertmanager, which posts them back to the service's POST /v1/alerts. Their data
lives under the data dir, both listen on 127.0.0.1 only, and both stop when the service stops (and
die with it, should it be killed).

    monitoring = Monitoring.start(settings)   # MonitoringUnavailable: not installed, or would not start
    ...
    monitoring.stop()
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings
from service.stack.supervisor import START_TIMEOUT_S, Child, ChildFailed, free_port, port_is_free, start_child

PROMETHEUS_NAMES = ("prometheus",)
ALERTMANAGER_NAMES = ("prometheus-alertmanager", "alertmanager")  # Debian's name, then upstream's
INSTALL_HINT = (
    "install them with `sudo apt-get install -y --no-install-recommends prometheus prometheus-alertmanager` "
    "(Debian/Ubuntu) or put upstream's `prometheus` and `alertmanager` on PATH; "
    "`gradwatch up --no-monitoring` starts the service without them (and without alerts)"
)
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_ALERTMANAGER_PORT = 9093
# One machine, seconds not minutes: an alert about a run here arrives a few seconds after its cause.
SCRAPE_INTERVAL = "1s"
EVAL_INTERVAL = "1s"
SD_REFRESH_INTERVAL = "1s"
GROUP_WAIT = "1s"
GROUP_INTERVAL = "5s"


class MonitoringUnavailable(RuntimeError):
    """Prometheus or Alertmanager is not installed, or did not start; the message says what to do."""


def find_binaries() -> tuple[str, str]:
    """Paths of Prometheus and Alertmanager on PATH; MonitoringUnavailable names what is missing."""
    prometheus = next((p for p in map(shutil.which, PROMETHEUS_NAMES) if p), None)
    alertmanager = next((p for p in map(shutil.which, ALERTMANAGER_NAMES) if p), None)
    missing = [
        name for name, path in (("prometheus", prometheus), ("prometheus-alertmanager", alertmanager)) if path is None
    ]
    if missing:
        raise MonitoringUnavailable(f"{' and '.join(missing)} not found on PATH: {INSTALL_HINT}")
    assert prometheus and alertmanager
    return prometheus, alertmanager


def prometheus_command(binary: str, config: Path, data: Path, port: int) -> list[str]:
    """Prometheus on 127.0.0.1:`port` with its TSDB in `data` and the reload endpoint on."""
    return [
        binary,
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={data}",
        "--web.enable-lifecycle",
    ]


def alertmanager_command(binary: str, config: Path, data: Path, port: int) -> list[str]:
    """Alertmanager on 127.0.0.1:`port`, state in `data`, without cluster gossip (a single one)."""
    return [
        binary,
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.path={data}",
        "--cluster.listen-address=",
    ]


def monitoring_token_files(settings: Settings) -> tuple[Path, Path]:
    """The token files Prometheus (service discovery) and Alertmanager (webhook) read, in that order:
    each its own narrow token (targets:read, alerts:write; service/auth.py), made when missing."""
    from service.auth import consumer_token_file

    return consumer_token_file(settings, "prometheus"), consumer_token_file(settings, "alertmanager")


def service_url(settings: Settings) -> str:
    """Where Prometheus and Alertmanager on this machine reach the service: loopback for a wildcard bind."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def choose_port(requested: int | None, default: int, option: str) -> int:
    """None: `default` when free, else any free port; 0: any free port; else exactly `requested`."""
    if requested is None:
        return default if port_is_free(default) else free_port()
    if requested == 0:
        return free_port()
    if not port_is_free(requested):
        raise MonitoringUnavailable(
            f"port {requested} on 127.0.0.1 is in use ({option}): choose another, or 0 for any free port"
        )
    return requested


def _start(name: str, command: list[str], port: int, folder: Path) -> Child:
    """One of them, its log in `folder`; MonitoringUnavailable (naming the log and its tail) when it fails."""
    try:
        return start_child(name, command, port, folder / f"{name}.log", folder)
    except ChildFailed as exc:
        raise MonitoringUnavailable(str(exc)) from None


def start_in_folder(
    name: str,
    command_of: Callable[[str, Path, Path, int], list[str]],
    binary: str,
    config_text: str,
    folder: Path,
    timeout: float = START_TIMEOUT_S,
) -> Child:
    """Prometheus or Alertmanager (`command_of`: prometheus_command or alertmanager_command) on a free port,
    alone in `folder`: its config `NAME.yml` written from `config_text`, its data in `data/`, its log in
    `NAME.log`; ChildFailed, naming the log, when it exits or is not ready within `timeout` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.yml"
    config.write_text(config_text)
    port = free_port()
    return start_child(
        name, command_of(binary, config, folder / "data", port), port, folder / f"{name}.log", folder, timeout
    )


@dataclass
class Monitoring:
    """Prometheus and Alertmanager started for one service; `stop()` ends both."""

    prometheus: Child
    alertmanager: Child
    folder: Path

    @classmethod
    def start(
        cls, settings: Settings, prometheus_port: int | None = None, alertmanager_port: int | None = None
    ) -> Monitoring:
        from deploy.render import render_alertmanager_config, render_prometheus_config

        prometheus_bin, alertmanager_bin = find_binaries()
        folder = settings.data_dir / "monitoring"
        folder.mkdir(parents=True, exist_ok=True)
        prometheus_token, alertmanager_token = monitoring_token_files(settings)
        url = service_url(settings)
        am_port = choose_port(alertmanager_port, DEFAULT_ALERTMANAGER_PORT, "--alertmanager-port")
        am_config = folder / "alertmanager.yml"
        am_config.write_text(
            render_alertmanager_config(
                webhook_url=f"{url}/v1/alerts",
                token_file=alertmanager_token,
                group_wait=GROUP_WAIT,
                group_interval=GROUP_INTERVAL,
            )
        )
        alertmanager = _start(
            "alertmanager",
            alertmanager_command(alertmanager_bin, am_config, folder / "alertmanager", am_port),
            am_port,
            folder,
        )
        try:
            prom_port = choose_port(prometheus_port, DEFAULT_PROMETHEUS_PORT, "--prometheus-port")
            prom_config = folder / "prometheus.yml"
            prom_config.write_text(
                render_prometheus_config(
                    service_url=url,
                    token_file=prometheus_token,
                    alertmanager_url=alertmanager.url,
                    scrape_interval=SCRAPE_INTERVAL,
                    eval_interval=EVAL_INTERVAL,
                    sd_refresh_interval=SD_REFRESH_INTERVAL,
                )
            )
            prometheus = _start(
                "prometheus",
                prometheus_command(prometheus_bin, prom_config, folder / "prometheus", prom_port),
                prom_port,
                folder,
            )
        except BaseException:
            alertmanager.stop()
            raise
        return cls(prometheus, alertmanager, folder)

    def stop(self) -> None:
        """Prometheus first (it sends to Alertmanager), then Alertmanager."""
        for child in (self.prometheus, self.alertmanager):
            child.stop()


__all__ = ["Monitoring", "MonitoringUnavailable", "find_binaries", "monitoring_token_files", "start_in_folder"]
