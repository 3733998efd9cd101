"""deploy/compose.yaml: valid Compose, every mounted path present, ports and settings that fit.

There is no Docker engine here, so the file is checked against the Compose Specification's JSON
schema. tests/deploy/compose-spec.json is that schema as the compose-spec project published it
in 2021 (shipped as compose/config/compose_spec.json in the docker-compose 1.29.2 package,
Apache-2.0); newer keys such as a top-level `name` are unknown to it, so compose.yaml avoids them.
"""

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def host_mounts(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(service, host path, container path) of every bind mount (named volumes left out)."""
    mounts = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts.append((name, source, target))
    return mounts


def test_is_valid_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_catches_a_misspelt_key(compose: dict[str, Any]) -> None:
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text(encoding="utf-8"))
    broken = {**compose, "services": {**compose["services"], "grafana": {**compose["services"]["grafana"]}}}
    broken["services"]["grafana"]["port"] = ["3000:3000"]
    assert not jsonschema.Draft201909Validator(schema).is_valid(broken)


def test_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"ray-head", "gradwatch", "prometheus", "alertmanager", "grafana"} <= set(services)
    assert services["grafana"]["image"] == "grafana/grafana:11.6.0"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["alertmanager"]["image"].startswith("prom/alertmanager:")
    assert services["gradwatch"]["command"] == ["gradwatch", "up", "--host", "0.0.0.0", "--port", "8765"]
    assert services["ray-head"]["command"].startswith("ray start --head --dashboard-host 0.0.0.0")
    assert "--block" in services["ray-head"]["command"]


def test_ray_nodes_and_service_run_one_image_built_on_rays(compose: dict[str, Any]) -> None:
    services = compose["services"]
    build = services["gradwatch"]["build"]
    assert services["ray-head"]["image"] == services["gradwatch"]["image"]
    dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == DEPLOY / "Dockerfile"
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-cpu$", dockerfile.read_text(), re.MULTILINE)


def test_every_mounted_host_path_exists(compose: dict[str, Any]) -> None:
    mounts = host_mounts(compose)
    assert mounts
    missing = [f"{name}: {source}" for name, source, _ in mounts if not (COMPOSE.parent / source).exists()]
    assert missing == []


def test_grafana_mounts_match_its_provisioning(compose: dict[str, Any]) -> None:
    grafana = {target: source for name, source, target in host_mounts(compose) if name == "grafana"}
    assert (COMPOSE.parent / grafana["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gradwatch.yaml").read_text())
    dashboards_target = provider["providers"][0]["options"]["path"]
    assert (COMPOSE.parent / grafana[dashboards_target]).resolve() == REPO / "dashboards"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_target}/fleet.json"
    assert (REPO / "dashboards/fleet.json").exists()


def test_grafana_is_not_open_to_anonymous_viewers(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["PROMETHEUS_URL"] == "${PROMETHEUS_URL:-http://prometheus:9090}"


def test_service_and_ray_share_auth_and_data(compose: dict[str, Any]) -> None:
    head, service = compose["services"]["ray-head"], compose["services"]["gradwatch"]
    assert service["environment"]["RAY_ADDRESS"] == "http://ray-head:8265"
    assert service["environment"]["GRADWATCH_TOKEN"].startswith("${GRADWATCH_TOKEN:?")
    config = compose["services"]["config"]
    assert "GRADWATCH_TOKEN" not in config["environment"]  # the operator's token never reaches them
    for consumer in ("PROMETHEUS", "ALERTMANAGER"):
        path = service["environment"][f"GRADWATCH_{consumer}_TOKEN_FILE"]
        assert path == f"/etc/gradwatch/{consumer.lower()}.token"
    assert "gradwatch-config:/etc/gradwatch:ro" in service["volumes"]
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "GRADWATCH_DATA_DIR"):
        assert head["environment"][key] == service["environment"][key], key
    assert "gradwatch-data:/var/lib/gradwatch" in head["volumes"]
    assert "gradwatch-data:/var/lib/gradwatch" in service["volumes"]


def test_every_variable_has_a_default_or_an_error_message() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    variables = re.findall(r"\$\{([^}]*)\}", text)
    assert variables
    bare = [v for v in variables if ":-" not in v and ":?" not in v]
    assert bare == []


def test_published_ports(compose: dict[str, Any]) -> None:
    """Only the API (every route behind a token) on every interface; the rest on loopback."""
    published = {
        name: [port.rsplit(":", 1)[0] for port in service.get("ports", [])]
        for name, service in compose["services"].items()
    }
    assert published["gradwatch"] == ["8765"]
    assert published["ray-head"] == ["127.0.0.1:8265"]
    assert published["prometheus"] == ["127.0.0.1:9090"]
    assert published["alertmanager"] == ["127.0.0.1:9093"]
    assert published["grafana"] == ["127.0.0.1:3000"]


def test_prometheus_has_no_lifecycle_api(compose: dict[str, Any]) -> None:
    assert not any("lifecycle" in arg for arg in compose["services"]["prometheus"]["command"])


def test_config_points_the_shipped_configs_at_compose_services(tmp_path: Path) -> None:
    from deploy.compose_init import RULE_FILE, write_configs

    write_configs(tmp_path, "5s", prometheus_token="prom-s3cret")
    assert (tmp_path / "prometheus.token").read_text() == "prom-s3cret"
    made = (tmp_path / "alertmanager.token").read_text()
    assert len(made) >= 40 and made != "prom-s3cret"
    write_configs(tmp_path, "5s")  # run again: the tokens the service already read are kept
    assert (tmp_path / "prometheus.token").read_text() == "prom-s3cret"
    assert (tmp_path / "alertmanager.token").read_text() == made
    prometheus = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    auth = {"type": "Bearer", "credentials_file": str(tmp_path / "prometheus.token")}
    assert [job.get("authorization") for job in prometheus["scrape_configs"]][0] == auth
    assert prometheus["scrape_configs"][1]["http_sd_configs"][0]["authorization"] == auth
    alertmanager = yaml.safe_load((tmp_path / "alertmanager.yml").read_text())
    hook = alertmanager["receivers"][0]["webhook_configs"][0]
    assert hook["http_config"]["authorization"]["credentials_file"] == str(tmp_path / "alertmanager.token")
    assert prometheus["global"]["scrape_interval"] == "5s"
    assert prometheus["rule_files"] == [RULE_FILE]
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    text = (tmp_path / "prometheus.yml").read_text() + (tmp_path / "alertmanager.yml").read_text()
    assert "127.0.0.1" not in text and "gradwatch:8765" in text
    # The rule file path is where compose.yaml mounts deploy/prometheus/ in the Prometheus container.
    assert RULE_FILE.startswith("/etc/prometheus/")
    assert (DEPLOY / "prometheus" / RULE_FILE.removeprefix("/etc/prometheus/")).exists()
