"""The alert rules: valid, unit-tested with promtool, generated from one source, true to the contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.rules import generate, source
from gradwatch.names import DATASOURCE_UID
from tests.promstack import PROMTOOL, require

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rules/gradwatch.rules.yml"
RULE_TESTS = REPO / "deploy/prometheus/rules/tests/gradwatch.test.yml"
GRAFANA = REPO / "deploy/grafana/provisioning/alerting/gradwatch.yaml"

# The alerts contract (gradwatch/ARCHITECTURE.md, "Contracts")
CONTRACT = {
    "TrainingLossNonFinite",
    "TrainingDiverging",
    "TrainingLossSpike",
    "TrainingStalled",
    "TrainingNoProgress",
    "TrainingOverfitting",
    "VanishingGradients",
    "ExplodingGradients",
    "GradNormGrowing",
    "TrainingStraggler",
    "TrainingHang",
    "TrainingJobFailed",
}
DASHBOARD = "/d/gradwatch-run?var-job_id={{ $labels.job_id }}"


def _alerts(path: Path = RULES) -> dict[str, dict]:
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def _grafana_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(GRAFANA.read_text())["groups"] for rule in group["rules"]]


def test_promtool_check_rules_is_clean():
    result = subprocess.run([require(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in (result.stdout + result.stderr).upper()


def test_promtool_unit_tests_pass():
    result = subprocess.run([require(PROMTOOL), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_files_are_not_stale():
    result = subprocess.run(
        [sys.executable, "-m", "deploy.rules.generate", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, f"run `python -m deploy.rules.generate` and commit:\n{result.stderr}"


def test_check_names_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "gradwatch.rules.yml"
    stale.write_text("groups: []\n")
    monkeypatch.setattr(generate, "rendered", lambda: {stale: generate._dump(generate.prometheus_rules())})
    assert generate.main(["--check"]) == 1
    assert str(stale) in capsys.readouterr().err
    assert stale.read_text() == "groups: []\n"  # --check writes nothing


def test_every_contract_alert_is_defined_once_with_labels_and_annotations():
    alerts = _alerts()
    assert set(alerts) == CONTRACT
    assert len(source.ALERT_NAMES) == len(set(source.ALERT_NAMES))
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert "{{ $labels.job_id }}" in annotations["summary"], name
        assert annotations["dashboard"] == DASHBOARD, name
        assert "job_id" in rule["expr"], f"{name}: its expression must keep job_id"


def test_recording_rules_follow_level_metric_operations():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = [rule["record"] for group in groups for rule in group["rules"] if "record" in rule]
    assert records, "shared expressions belong in recording rules"
    for record in records:
        assert re.fullmatch(r"[a-z_]+:gradwatch_[a-z_]+:[a-z0-9_]+", record), record


def _rule_tests() -> list[dict]:
    return yaml.safe_load(RULE_TESTS.read_text())["tests"]


@pytest.mark.parametrize("alert", sorted(CONTRACT))
def test_every_alert_fires_and_stays_quiet_in_the_unit_tests(alert):
    fired, quiet = [], []
    for group in _rule_tests():
        for case in group.get("alert_rule_test", []):
            if case["alertname"] == alert:
                (fired if case.get("exp_alerts") else quiet).append(case)
    assert fired, f"{alert}: no promtool case where it fires"
    assert quiet, f"{alert}: no promtool case where it stays quiet"
    for case in fired:
        for expected in case["exp_alerts"]:
            assert {"job_id", "severity"} <= set(expected["exp_labels"]), case
            assert {"summary", "description", "dashboard"} <= set(expected["exp_annotations"]), case


def test_healthy_runs_are_checked_for_every_alert():
    healthy = next(group for group in _rule_tests() if group["name"] == "healthy runs")
    checked = {case["alertname"] for case in healthy["alert_rule_test"] if not case.get("exp_alerts")}
    assert checked == CONTRACT


# ---- Grafana-managed copies (file provisioning, apiVersion 1)


def test_grafana_alerting_file_structure():
    document = yaml.safe_load(GRAFANA.read_text())
    assert document["apiVersion"] == 1
    for group in document["groups"]:
        assert group["name"] and group["folder"] and re.fullmatch(r"\d+[smh]", group["interval"])
    rules = _grafana_rules()
    uids = [rule["uid"] for rule in rules]
    assert len(uids) == len(set(uids)), "rule uids must be unique"
    assert {rule["title"] for rule in rules} == CONTRACT
    for rule in rules:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", rule["uid"]), rule["uid"]
        refs = {node["refId"]: node for node in rule["data"]}
        assert rule["condition"] in refs, rule["title"]
        query = rule["data"][0]
        assert query["datasourceUid"] == DATASOURCE_UID, rule["title"]
        assert query["model"]["datasource"]["uid"] == DATASOURCE_UID, rule["title"]
        assert query["model"]["instant"] is True and query["relativeTimeRange"]["from"] > 0
        for node in rule["data"][1:]:
            assert node["datasourceUid"] == "__expr__", rule["title"]
            model = node["model"]
            assert model["type"] in ("math", "reduce", "threshold"), rule["title"]
            used = set(re.findall(r"\$(\w+)", model["expression"])) or {model["expression"]}
            assert used <= set(refs) - {node["refId"]}, f"{rule['title']}: {model['expression']}"
        assert rule["noDataState"] == "OK" and rule["execErrState"] == "Error"
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert {"summary", "description", "dashboard"} <= set(rule["annotations"])
        for text in rule["annotations"].values():
            assert not re.search(r"\$value\b", text), f"{rule['title']}: $value means nothing in Grafana"


def test_grafana_and_prometheus_alerts_say_the_same():
    alerts = _alerts()
    for rule in _grafana_rules():
        prom = alerts[rule["title"]]
        assert rule["data"][0]["model"]["expr"] == prom["expr"]
        assert rule["for"] == prom["for"]
        assert rule["labels"] == prom["labels"]
        assert rule["annotations"]["dashboard"] == prom["annotations"]["dashboard"]
