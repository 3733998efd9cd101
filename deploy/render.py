"""The shipped Prometheus and Alertmanager configs, with addresses, paths and timings overridden.

Everything else (jobs, routes, inhibitions, honor_labels) stays as shipped, so tests and local
stacks run the configuration that production runs:

    from deploy.render import render_prometheus_config
    text = render_prometheus_config(service_url="http://127.0.0.1:18765",
                                    token_file="/tmp/prometheus.token", scrape_interval="1s", eval_interval="1s")

Each consumer has its own token (service/auth.py `consumer_token_file`): Prometheus' file
(scope targets:read) and Alertmanager's (scope alerts:write), never the operator's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gradwatch.names import DEFAULT_SERVICE_URL

DEPLOY = Path(__file__).resolve().parent
PROMETHEUS_CONFIG = DEPLOY / "prometheus/prometheus.yml"
ALERTMANAGER_CONFIG = DEPLOY / "alertmanager/alertmanager.yml"
RULE_FILE = DEPLOY / "prometheus/rules/gradwatch.rules.yml"
SERVICE_JOB = "gradwatch-service"
WORKERS_JOB = "gradwatch-workers"


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _dump(config: dict[str, Any], source: Path) -> str:
    header = f"# Rendered by deploy/render.py from {source.relative_to(DEPLOY.parent)}.\n"
    return header + yaml.safe_dump(config, sort_keys=False, width=120)


def _base(url: str, what: str) -> tuple[str, str, str]:
    """`http://host:port/prefix` -> (scheme, host:port, /prefix); errors name the argument."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must look like http://host:port, got {url!r}")
    return parts.scheme, parts.netloc, parts.path.rstrip("/")


def _scrape_job(config: dict[str, Any], name: str) -> dict[str, Any]:
    for job in config["scrape_configs"]:
        if job["job_name"] == name:
            return job
    raise KeyError(f"{PROMETHEUS_CONFIG} has no scrape job {name!r}")


def _authorization(token_file: str | Path | None) -> dict[str, str] | None:
    # `type` spelled out: Prometheus 2.42 sends the bare token on SD requests without it.
    return {"type": "Bearer", "credentials_file": str(token_file)} if token_file is not None else None


def render_prometheus_config(
    service_url: str = DEFAULT_SERVICE_URL,
    token_file: str | Path | None = "/etc/gradwatch/prometheus.token",
    alertmanager_url: str | None = "http://127.0.0.1:9093",
    rule_files: Sequence[str | Path] | None = None,
    scrape_interval: str = "15s",
    eval_interval: str = "15s",
    sd_refresh_interval: str | None = None,
) -> str:
    """deploy/prometheus/prometheus.yml pointed at a service, a token and an Alertmanager.

    `rule_files` defaults to the shipped rule file by absolute path, so the config may be written
    anywhere (Prometheus reads relative paths from the config file's folder); `alertmanager_url=None`
    drops alerting; `token_file` (Prometheus' token, scope targets:read) authorizes both the
    service scrape and discovery, `None` drops it.
    """
    config = _load(PROMETHEUS_CONFIG)
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = eval_interval
    config["rule_files"] = [str(p) for p in (rule_files if rule_files is not None else [RULE_FILE])]

    if alertmanager_url is None:
        config.pop("alerting", None)
    else:
        scheme, host, prefix = _base(alertmanager_url, "alertmanager_url")
        manager: dict[str, Any] = {"static_configs": [{"targets": [host]}], "scheme": scheme}
        if prefix:
            manager["path_prefix"] = prefix
        config["alerting"] = {"alertmanagers": [manager]}

    scheme, host, prefix = _base(service_url, "service_url")
    service = _scrape_job(config, SERVICE_JOB)
    service["scheme"] = scheme
    service["metrics_path"] = f"{prefix}/metrics"
    service["static_configs"] = [{"targets": [host]}]
    if _authorization(token_file) is None:
        service.pop("authorization", None)
    else:
        service["authorization"] = _authorization(token_file)

    workers = _scrape_job(config, WORKERS_JOB)
    for sd in workers["http_sd_configs"]:
        sd["url"] = f"{scheme}://{host}{prefix}/v1/targets"
        if sd_refresh_interval is not None:
            sd["refresh_interval"] = sd_refresh_interval
        auth = _authorization(token_file)
        if auth is None:
            sd.pop("authorization", None)
        else:
            sd["authorization"] = auth
    return _dump(config, PROMETHEUS_CONFIG)


def render_alertmanager_config(
    webhook_url: str = f"{DEFAULT_SERVICE_URL}/v1/alerts",
    token_file: str | Path | None = "/etc/gradwatch/alertmanager.token",
    group_wait: str | None = None,
    group_interval: str | None = None,
    repeat_interval: str | None = None,
    critical_repeat_interval: str | None = None,
) -> str:
    """deploy/alertmanager/alertmanager.yml with every webhook sent to `webhook_url`.

    Timings left as None keep the shipped values; `critical_repeat_interval` is the critical
    route's own; `token_file` is Alertmanager's token (scope alerts:write), `None` sends no
    Authorization header.
    """
    _base(webhook_url, "webhook_url")
    config = _load(ALERTMANAGER_CONFIG)
    route = config["route"]
    for key, value in (
        ("group_wait", group_wait),
        ("group_interval", group_interval),
        ("repeat_interval", repeat_interval),
    ):
        if value is not None:
            route[key] = value
    if critical_repeat_interval is not None:
        for sub in route.get("routes", []):
            if 'severity="critical"' in sub.get("matchers", []):
                sub["repeat_interval"] = critical_repeat_interval
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url
            http_config = hook.setdefault("http_config", {})
            auth = _authorization(token_file)
            if auth is None:
                http_config.pop("authorization", None)
            else:
                http_config["authorization"] = auth
            if not http_config:
                hook.pop("http_config")
    return _dump(config, ALERTMANAGER_CONFIG)
