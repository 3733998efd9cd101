"""Write the files Prometheus, Alertmanager and the service share inside gradwatch's compose stack.

deploy/compose.yaml runs this once (service `config`) before the others start: the shipped configs
point at 127.0.0.1, where in compose each part is its own container. Prometheus and Alertmanager
each get their own narrow token (scope targets:read, alerts:write), made here unless given, kept
across runs; the service reads the same files (GRADWATCH_PROMETHEUS_TOKEN_FILE,
GRADWATCH_ALERTMANAGER_TOKEN_FILE), so no operator token ever reaches them.

    python -m deploy.compose_init /etc/gradwatch    # reads PROMETHEUS_SCRAPE_INTERVAL and, optionally,
                                                    # GRADWATCH_PROMETHEUS_TOKEN, GRADWATCH_ALERTMANAGER_TOKEN
"""

import os
import secrets
import sys
from pathlib import Path

from deploy.render import render_alertmanager_config, render_prometheus_config

SERVICE_URL = "http://gradwatch:8765"
ALERTMANAGER_URL = "http://alertmanager:9093"
# deploy/compose.yaml mounts deploy/prometheus/ here in the Prometheus container.
RULE_FILE = "/etc/prometheus/rules/gradwatch.rules.yml"


def _token(path: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return path.read_text().strip() or secrets.token_urlsafe(32)
    except OSError:
        return secrets.token_urlsafe(32)


def write_configs(
    out_dir: Path,
    scrape_interval: str,
    prometheus_token: str | None = None,
    alertmanager_token: str | None = None,
) -> list[Path]:
    """prometheus.token, alertmanager.token, prometheus.yml and alertmanager.yml in `out_dir`."""
    prometheus_file, alertmanager_file = out_dir / "prometheus.token", out_dir / "alertmanager.token"
    files = {
        prometheus_file: _token(prometheus_file, prometheus_token),
        alertmanager_file: _token(alertmanager_file, alertmanager_token),
        out_dir / "prometheus.yml": render_prometheus_config(
            service_url=SERVICE_URL,
            token_file=prometheus_file,
            alertmanager_url=ALERTMANAGER_URL,
            rule_files=[RULE_FILE],
            scrape_interval=scrape_interval,
            eval_interval=scrape_interval,
        ),
        out_dir / "alertmanager.yml": render_alertmanager_config(
            webhook_url=f"{SERVICE_URL}/v1/alerts", token_file=alertmanager_file
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        # Prometheus and Alertmanager run as another user; this volume is mounted only into them
        # and the service, and each token opens only its own consumer's routes.
        path.chmod(0o644)
    return list(files)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0] if argv else "/etc/gradwatch")
    written = write_configs(
        out_dir,
        os.environ.get("PROMETHEUS_SCRAPE_INTERVAL") or "15s",
        os.environ.get("GRADWATCH_PROMETHEUS_TOKEN") or None,
        os.environ.get("GRADWATCH_ALERTMANAGER_TOKEN") or None,
    )
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
