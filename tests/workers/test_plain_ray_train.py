"""A plain Ray Train script with gradwatch's few lines (no service) exports to a real Prometheus."""

from __future__ import annotations

import secrets
import subprocess

import pytest
import yaml

from tests.conftest import EXAMPLES
from tests.promstack import query, start_prometheus, wait_for
from tests.stack import launch

pytestmark = [pytest.mark.ray, pytest.mark.prometheus]


def test_a_plain_ray_train_script_exports_the_metrics_contract_to_prometheus(tmp_path):
    sd_dir = tmp_path / "sd"
    sd_dir.mkdir()
    job_id = f"plain-{secrets.token_hex(4)}"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "plain",
                "scrape_interval": "1s",
                "file_sd_configs": [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}],
            }
        ],
    }
    with start_prometheus(yaml.safe_dump(config), tmp_path) as prom:
        proc = launch(
            [
                str(EXAMPLES / "custom" / "ray_train_plain.py"),
                "--steps",
                "3000",
                "--job-id",
                job_id,
                "--sd-dir",
                str(sd_dir),
                "--storage-path",
                str(tmp_path / "runs"),
                "--grace-seconds",
                "8",
            ],
            cwd=tmp_path,
            stderr=subprocess.STDOUT,
        )
        try:

            def scraped():
                ranks = {s["metric"]["rank"] for s in query(prom.url, f'gradwatch_step{{job_id="{job_id}"}}')}
                layers = query(prom.url, f'gradwatch_layer_update_ratio{{job_id="{job_id}"}}')
                noise = query(prom.url, f'gradwatch_gradient_noise_scale{{job_id="{job_id}"}}')
                return ranks == {"0", "1"} and len(layers) == 2 and noise

            wait_for(scraped, timeout=240, interval=1, what="both ranks of the plain script in Prometheus")
            per_rank = [
                "gradwatch_loss",
                "gradwatch_loss_ema",
                "gradwatch_local_grad_norm",
                "gradwatch_step_duration_seconds_count",
                "gradwatch_samples_total",
                "gradwatch_last_step_timestamp_seconds",
            ]
            for name in per_rank:
                ranks = {s["metric"]["rank"] for s in query(prom.url, f'{name}{{job_id="{job_id}"}}')}
                assert ranks == {"0", "1"}, name
            for name in [
                "gradwatch_grad_norm",
                "gradwatch_weight_norm",
                "gradwatch_learning_rate",
                "gradwatch_layer_grad_norm",
                "gradwatch_phase",
                "gradwatch_job_info",
            ]:
                series = query(prom.url, f'{name}{{job_id="{job_id}"}}')
                assert series and {s["metric"]["rank"] for s in series} == {"0"}, name  # rank 0 only
            layers = {s["metric"]["layer"] for s in query(prom.url, f'gradwatch_layer_grad_norm{{job_id="{job_id}"}}')}
            assert layers == {"0", "2"}
            out, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out[-3000:]
    # Ray Train's placement-group cleaner finds the State API of the dashboard the script starts: it does
    # not warn every few seconds that it cannot query the controller
    assert "Failed to query Ray Train Controller actor state" not in out, out[-3000:]
    assert list(sd_dir.iterdir()) == [], "a rank left its file_sd entry behind"
