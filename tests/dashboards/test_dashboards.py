"""The generated dashboards: current, well-formed for Grafana 11.6, and only about contract metrics.

Grafana itself cannot be installed here; what Grafana would check is checked by loading each JSON
into grafana-foundation-sdk's model. Whether each query returns data is a live test's job
(`panel_queries` and `substitute` exist for it).
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from dashboards import build
from tests.contract import SERIES, SYSTEM, SYSTEM_WHERE_KNOWN, series_names

REPO = Path(__file__).resolve().parents[2]
BOARD_FILES = ["fleet.json", "run.json", "ranks.json"]
DATASOURCE_UID = "gradwatch-prometheus"

# The metrics contract, written out by hand in tests/contract.py.
CONTRACT_METRICS = series_names()
# Labels a query may match or group on: the contract's bounded labels, job_info's descriptive ones,
# the histogram's le, and what Prometheus puts on ALERTS.
CONTRACT_LABELS = {
    "job_id", "rank", "layer", "phase", "kind", "split", "state",
    "name", "owner", "model", "world_size", "team", "project",
    "le", "alertname", "alertstate", "severity",
    "node",  # the Ray node of a rank: a label of its scrape target (/v1/targets, file_sd)
    "step_phase",  # the phase of a rank's step, from its heartbeat (workers/heartbeat.py)
}  # fmt: skip
PANEL_VARIABLES = {"job_id", "team", "project", "state"}
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}


def load(name: str) -> dict[str, Any]:
    return json.loads((REPO / "dashboards" / name).read_text(encoding="utf-8"))


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in board.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def promql_name_tokens(expr: str) -> set[str]:
    """Identifiers in `expr` outside string literals and label matchers."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_strings))


@pytest.fixture(scope="module", params=BOARD_FILES)
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_written_dashboards_are_current() -> None:
    assert build.stale_files() == [], "run `python -m dashboards.build` and commit the JSON"


def test_check_names_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--out", str(tmp_path)]) == 0
    assert build.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "run.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "ranks.json").unlink()
    assert build.main(["--check", "--out", str(tmp_path)]) == 1
    assert "run.json, ranks.json" in capsys.readouterr().err


def test_json_is_written_with_sorted_keys() -> None:
    for name in BOARD_FILES:
        text = (REPO / "dashboards" / name).read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def test_uids_are_fixed_and_unique() -> None:
    uids = [load(name)["uid"] for name in BOARD_FILES]
    assert uids == ["gradwatch-fleet", "gradwatch-run", "gradwatch-ranks"]


def test_panel_ids_are_unique(board: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(board)]
    assert len(ids) == len(set(ids)), ids


def test_every_panel_has_a_description_and_a_unit(board: dict[str, Any]) -> None:
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        assert panel.get("description"), panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_everything_queries_gradwatch_prometheus(board: dict[str, Any]) -> None:
    for panel in all_panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
            assert target["refId"], panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]
    for annotation in board["annotations"].get("list", []):
        assert annotation["datasource"]["uid"] == DATASOURCE_UID, annotation["name"]


def test_ref_ids_are_unique_within_a_panel(board: dict[str, Any]) -> None:
    for panel in all_panels(board):
        ref_ids = [target["refId"] for target in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_loads_into_the_sdk_model_without_losing_anything(board: dict[str, Any]) -> None:
    """Decode with the SDK (as Grafana 11.6's schema describes a dashboard) and encode again.

    Everything we wrote must come back; the SDK may only add defaults. The one known loss is the
    Prometheus annotation fields (titleFormat, textFormat, tagKeys, step) that its AnnotationQuery
    model does not declare.
    """
    register_default_plugins()
    decoded = Dashboard.from_json(board)
    again = json.loads(json.dumps(decoded, cls=JSONEncoder))
    assert decoded.uid == board["uid"]
    assert decoded.schema_version == 41

    unknown_to_sdk = {"titleFormat", "textFormat", "tagKeys", "step"}

    def contained(ours: Any, theirs: Any, path: str) -> None:
        if isinstance(ours, dict):
            assert isinstance(theirs, dict), path
            for key, value in ours.items():
                if path.startswith("/annotations/list") and key in unknown_to_sdk:
                    continue
                assert key in theirs, f"{path}/{key} lost by the SDK model"
                contained(value, theirs[key], f"{path}/{key}")
        elif isinstance(ours, list):
            assert isinstance(theirs, list) and len(ours) == len(theirs), path
            for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                contained(a, b, f"{path}[{index}]")
        else:
            assert ours == theirs, path

    contained(board, again, "")


def test_every_query_uses_only_contract_metrics_and_labels(board: dict[str, Any]) -> None:
    queries = build.panel_queries(board)
    assert queries
    promql_words = {
        "sum", "avg", "max", "min", "count", "quantile", "by", "on", "group_left", "unless", "and", "or",
        "rate", "deriv", "time", "histogram_quantile",
    }  # fmt: skip
    for title, expr in queries:
        metrics = set(re.findall(r"\b(?:gradwatch_\w+|ALERTS)\b", expr))
        assert metrics, f"{title}: {expr}"
        assert metrics <= CONTRACT_METRICS | {"ALERTS"}, f"{title}: {metrics - CONTRACT_METRICS}"
        matchers = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)
        grouping = [label for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr) for label in group.split(",")]
        labels = {label.strip() for label in matchers + grouping if label.strip()}
        assert labels <= CONTRACT_LABELS, f"{title}: {labels - CONTRACT_LABELS}"
        # Neither Prometheus's own job/instance labels nor an unknown function sneak in.
        words = promql_name_tokens(expr) - metrics - labels - promql_words
        assert words <= {"m", "s", "__rate_interval"} | PANEL_VARIABLES, (title, words)


def test_variables_used_are_defined_and_substitute_replaces_them(board: dict[str, Any]) -> None:
    defined = {variable["name"] for variable in board["templating"]["list"]}
    for title, expr in build.panel_queries(board):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= defined | GRAFANA_VARIABLES, f"{title}: {used - defined - GRAFANA_VARIABLES}"
        concrete = build.substitute(expr, {"job_id": "gw-1"})
        assert "$" not in concrete, concrete


def test_substitute_follows_grafana_syntax() -> None:
    expr = 'rate(x{job_id="$job_id", a="${job_id}", b="[[job_id]]", c="${job_id:raw}"}[$__rate_interval])'
    assert build.substitute(expr, {"job_id": "j"}) == 'rate(x{job_id="j", a="j", b="j", c="j"}[1m])'
    assert build.substitute('x{team=~"$team"}[$__range]') == 'x{team=~".*"}[1h]'
    assert build.substitute("$__range_s") == "3600"
    with pytest.raises(KeyError, match="job_id"):
        build.substitute('x{job_id="$job_id"}')


def test_panel_queries_cover_every_target_and_annotation() -> None:
    run = load("run.json")
    titles = [title for title, _ in build.panel_queries(run)]
    targets = sum(len(panel.get("targets", [])) for panel in all_panels(run))
    assert len(titles) == targets + 1
    assert titles[-1] == "annotation: Alerts"


def test_run_board_shows_the_asked_for_signals() -> None:
    exprs = " ".join(expr for _, expr in build.panel_queries(load("run.json")))
    for metric in (
        "gradwatch_loss{",
        "gradwatch_loss_ema",
        "gradwatch_accuracy_ratio",
        "gradwatch_learning_rate",
        "gradwatch_grad_norm",
        "gradwatch_weight_norm",
        "gradwatch_layer_grad_norm",
        "gradwatch_layer_update_ratio",
        "gradwatch_gradient_noise_scale",
        "gradwatch_global_batch_size",
        "gradwatch_phase",
        "gradwatch_anomaly",
        "gradwatch_nonfinite_total",
        "gradwatch_restarts_total",
        "gradwatch_step{",
        "gradwatch_epoch",
        "ALERTS{",
    ):
        assert metric in exprs, metric
    types = {panel["title"]: panel["type"] for panel in all_panels(load("run.json"))}
    assert types["Phase"] == types["Anomalies"] == "state-timeline"


def test_fleet_table_links_job_ids_to_the_run_board() -> None:
    table = next(panel for panel in load("fleet.json")["panels"] if panel["title"] == "Runs")
    links = [
        prop["value"]
        for override in table["fieldConfig"]["overrides"]
        if override["matcher"] == {"id": "byName", "options": "job_id"}
        for prop in override["properties"]
        if prop["id"] == "links"
    ]
    assert links and links[0][0]["url"].startswith("/d/gradwatch-run?var-job_id=${__value.raw}")


def test_fleet_filters_are_template_variables() -> None:
    variables = {variable["name"]: variable for variable in load("fleet.json")["templating"]["list"]}
    assert set(variables) == {"team", "project", "state"}
    assert "gradwatch_job_info" in variables["team"]["query"]
    assert all(variable["allValue"] == ".*" for variable in variables.values())


def test_alert_lists_name_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/gradwatch.yaml").read_text(encoding="utf-8")
    )["datasources"][0]
    assert provisioned["uid"] == DATASOURCE_UID
    for name in BOARD_FILES:
        for panel in all_panels(load(name)):
            if panel["type"] == "alertlist":
                assert panel["options"]["datasource"] == provisioned["name"], panel["title"]


def test_datasource_provisioning_follows_grafanas_format() -> None:
    document = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/gradwatch.yaml").read_text(encoding="utf-8")
    )
    assert document["apiVersion"] == 1
    (source,) = document["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "${PROMETHEUS_URL}"
    known = {"name", "uid", "type", "access", "url", "isDefault", "editable", "jsonData", "orgId", "version"}
    assert set(source) <= known


def test_dashboard_provider_loads_these_files() -> None:
    document = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/gradwatch.yaml").read_text(encoding="utf-8")
    )
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file" and provider["folder"] == "gradwatch"
    assert provider["options"]["foldersFromFilesStructure"] is False
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards/gradwatch"
    assert not (REPO / "deploy/grafana/provisioning/dashboards/alerting").exists()


def stored(families: list[str]) -> set[str]:
    return {name for family in families for name in SERIES.get(family, [family])}


def test_the_run_board_shows_every_system_series_per_rank() -> None:
    queries = build.panel_queries(load("run.json"))
    for series in sorted(stored(SYSTEM + SYSTEM_WHERE_KNOWN) - {"gradwatch_tokens_total"}):  # tokens/s is shown
        per_rank = [expr for _, expr in queries if re.search(rf"\b{series}\b", expr) and "by (rank)" in expr]
        assert per_rank, f"the run board has no per-rank panel of {series}"


def test_the_ranks_board_shows_cpu_memory_and_gpu_per_rank_and_node() -> None:
    exprs = [expr for _, expr in build.panel_queries(load("ranks.json"))]
    for series in (
        "gradwatch_process_cpu_seconds_total",
        "gradwatch_host_cpu_ratio",
        "gradwatch_process_resident_memory_bytes",
        "gradwatch_gpu_utilization_ratio",
        "gradwatch_gpu_memory_used_bytes",
    ):
        assert any(series in expr and "by (rank, node)" in expr for expr in exprs), series


def test_a_panel_of_series_that_exist_only_where_known_says_when_it_has_no_data(board: dict[str, Any]) -> None:
    """Tokens, MFU and the GPU's series exist only for some runs (workers/system.py): their panels say when
    they stay empty, so that an empty GPU panel on CPU reads as expected."""
    where_known = stored(SYSTEM_WHERE_KNOWN)
    checked = 0
    for panel in all_panels(board):
        exprs = [target.get("expr", "") for target in panel.get("targets", [])]
        named = {m for expr in exprs for m in re.findall(r"\bgradwatch_\w+", expr)}
        if named and named <= where_known:
            checked += 1
            assert "no data" in panel["description"].lower(), panel["title"]
            if any(name.startswith("gradwatch_gpu_") for name in named):
                assert "CPU" in panel["description"] and "gpu extra" in panel["description"], panel["title"]
    if board["uid"] != "gradwatch-fleet":
        assert checked >= (6 if board["uid"] == "gradwatch-run" else 2), (board["uid"], checked)
