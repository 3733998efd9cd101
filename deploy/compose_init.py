"""Write the files Prometheus and Alertmanager need inside gradwatch's compose stack.

deploy/compose.yaml runs this once (service `config`) before Prometheus and Alertmanager start:
the shipped configs point at 127.0.0.1, where in compose each part is its own container.

    python -m deploy.compose_init /etc/gradwatch    # reads GRADWATCH_TOKEN, PROMETHEUS_SCRAPE_INTERVAL
"""

import os
import sys
from pathlib import Path

from deploy.render import render_alertmanager_config, render_prometheus_config

SERVICE_URL = "http://gradwatch:8765"
ALERTMANAGER_URL = "http://alertmanager:9093"
# deploy/compose.yaml mounts deploy/prometheus/ here in the Prometheus container.
RULE_FILE = "/etc/prometheus/rules/gradwatch.rules.yml"


def write_configs(out_dir: Path, token: str, scrape_interval: str) -> list[Path]:
    """The service token, prometheus.yml and alertmanager.yml in `out_dir` (one shared volume)."""
    token_file = out_dir / "token"
    files = {
        token_file: token,
        out_dir / "prometheus.yml": render_prometheus_config(
            service_url=SERVICE_URL,
            token_file=token_file,
            alertmanager_url=ALERTMANAGER_URL,
            rule_files=[RULE_FILE],
            scrape_interval=scrape_interval,
            eval_interval=scrape_interval,
        ),
        out_dir / "alertmanager.yml": render_alertmanager_config(
            webhook_url=f"{SERVICE_URL}/v1/alerts", token_file=token_file
        ),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)  # Prometheus and Alertmanager run as another user
    return list(files)


def main(argv: list[str]) -> int:
    token = os.environ.get("GRADWATCH_TOKEN", "")
    if not token:
        print(
            "GRADWATCH_TOKEN is not set: Prometheus and Alertmanager need it to call the service",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(argv[0] if argv else "/etc/gradwatch")
    for path in write_configs(out_dir, token, os.environ.get("PROMETHEUS_SCRAPE_INTERVAL") or "15s"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
