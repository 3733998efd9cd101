"""What every gradwatch panel shares: the datasource, query targets, size and look."""

from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import (
    dashboard,
    heatmap,
    prometheus,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    AnnotationQuery,
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from gradwatch.names import DATASOURCE_UID

# The Prometheus datasource that deploy/grafana/provisioning/datasources/gradwatch.yaml creates.
DATASOURCE_NAME = "gradwatch-prometheus"
TAG = "gradwatch"

FLEET_UID = "gradwatch-fleet"
RUN_UID = "gradwatch-run"
RANKS_UID = "gradwatch-ranks"

BY_RANK = "rank {{rank}}"  # legend of per-rank series

# The colour of each training phase wherever a board shows one.
PHASE_COLORS = {
    "warmup": "blue",
    "rapid_learning": "green",
    "refinement": "super-light-green",
    "converged": "dark-green",
    "stalled": "orange",
    "diverging": "red",
}


def prometheus_ref() -> DataSourceRef:
    """A fresh reference to gradwatch's Prometheus (panels must not share one mutable object)."""
    return DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


def promql(
    expr: str,
    legend: str = "",
    *,
    ref_id: str = "A",
    instant: bool = False,
    as_table: bool = False,
    as_heatmap: bool = False,
) -> Builder[Dataquery]:
    """One PromQL target on gradwatch's Prometheus, as panels take their targets."""
    query = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(prometheus_ref())
    if legend:
        query = query.legend_format(legend)
    if as_table:
        query = query.format(PromQueryFormat.TABLE)
    if as_heatmap:
        query = query.format(PromQueryFormat.HEATMAP)
    return query.instant() if instant or as_table else query.range()


ModelT = TypeVar("ModelT")
PanelT = TypeVar(
    "PanelT",
    timeseries.Panel,
    stat.Panel,
    table.Panel,
    statetimeline.Panel,
    heatmap.Panel,
    dashboard.Panel,
)


def styled(panel: PanelT, title: str, description: str, unit: str, *, width: int, height: int) -> PanelT:
    """The one place that sets what every panel has: title, description, unit, datasource and size."""
    return (
        panel.title(title).description(description).unit(unit).datasource(prometheus_ref()).span(width).height(height)
    )


def timeseries_panel(
    title: str, description: str, unit: str, *, width: int = 12, height: int = 8, log_scale: bool = False
) -> timeseries.Panel:
    """A line chart in gradwatch's house style: thin lines, no points, a sorted shared tooltip."""
    panel = (
        timeseries.Panel()
        .line_width(1)
        .fill_opacity(8)
        .show_points(common.VisibilityMode.NEVER)
        .draw_style(common.GraphDrawStyle.LINE)
        .span_nulls(False)
        .legend(
            common_builder.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builder.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)
        )
    )
    if log_scale:
        panel = panel.scale_distribution(
            common_builder.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10)
        )
    return styled(panel, title, description, unit, width=width, height=height)


def alert_list_panel(
    title: str, description: str, *, max_items: int, height: int, label_filter: str = ""
) -> dashboard.Panel:
    """Grafana's alert list of the Prometheus datasource's rules (firing, pending, recovering, error)."""
    return styled(dashboard.Panel().type("alertlist"), title, description, "none", width=24, height=height).options(
        {
            "viewMode": "list",
            "groupMode": "default",
            "groupBy": [],
            "maxItems": max_items,
            "sortOrder": 3,
            "dashboardAlerts": False,
            "alertName": "",
            "alertInstanceLabelFilter": label_filter,
            "datasource": DATASOURCE_NAME,
            "showInactiveAlerts": False,
            "stateFilter": {
                "firing": True,
                "pending": True,
                "recovering": True,
                "noData": False,
                "normal": False,
                "error": True,
            },
        }
    )


def stat_panel(title: str, description: str, unit: str, *, width: int = 6, height: int = 5) -> stat.Panel:
    """Big numbers with their series name, no sparkline."""
    panel = (
        stat.Panel()
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builder.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    return styled(panel, title, description, unit, width=width, height=height)


def timeline_panel(
    title: str,
    description: str,
    *,
    states: dict[str, str] | None = None,
    on: tuple[str, str] = ("on", "red"),
    width: int = 24,
    height: int = 6,
) -> statetimeline.Panel:
    """One timeline row per series of a 0/1 gauge: 1 draws a coloured bar, 0 draws nothing.

    `states` maps a series name (the legend) to the colour of its bar, which shows that name;
    other series show `on` = (text, colour).
    """
    panel = (
        statetimeline.Panel()
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .fill_opacity(80)
        .line_width(0)
        .row_height(0.8)
        .legend(common_builder.VizLegendOptions().show_legend(False).display_mode(common.LegendDisplayMode.HIDDEN))
        .mappings([on_off_mapping(*on)])
    )
    for name, color in (states or {}).items():
        panel = panel.override_by_name(
            name, [DynamicConfigValue(id_val="mappings", value=[on_off_mapping(name, color)])]
        )
    return styled(panel, title, description, "none", width=width, height=height)


def on_off_mapping(text: str, color: str) -> ValueMap:
    """0 draws nothing, 1 draws `text` in `color`."""
    return ValueMap(
        options={
            "0": ValueMappingResult(text="-", color="transparent", index=0),
            "1": ValueMappingResult(text=text, color=color, index=1),
        }
    )


def thresholds(*steps: tuple[float | None, str]) -> dashboard.ThresholdsConfig:
    """Absolute thresholds; the first step's value is None (from minus infinity)."""
    return (
        dashboard.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def run_link(value: str) -> dashboard.DashboardLink:
    """A data link that opens the run board for the job id in `value` (a Grafana data-link variable)."""
    return (
        dashboard.DashboardLink("Open run")
        .type(DashboardLinkType.LINK)
        .url(f"/d/{RUN_UID}?var-job_id={value}&${{__url_time_range}}")
    )


def label_variable(name: str, label: str, query: str, *, include_all: bool) -> dashboard.QueryVariable:
    """A template variable filled from a label's values in Prometheus."""
    variable = (
        dashboard.QueryVariable(name)
        .label(label)
        .query(query)
        .datasource(prometheus_ref())
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )
    if include_all:
        # ".*" also matches runs whose label is empty (team/project unset in the spec).
        variable = (
            variable.include_all(True)
            .all_value(".*")
            .multi(True)
            .current(VariableOption(selected=True, text="All", value="$__all"))
        )
    return variable


def new_dashboard(uid: str, title: str, description: str) -> dashboard.Dashboard:
    """A dashboard with gradwatch's defaults and links to its sibling boards."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .link(
            dashboard.DashboardLink("gradwatch")
            .type(DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


class PrometheusAnnotation(AnnotationQuery):
    """A Prometheus annotation query with the fields Grafana's Prometheus plugin reads.

    The SDK's AnnotationQuery model has `expr` but not titleFormat, textFormat, tagKeys or step,
    without which every event would show an empty title.
    """

    def __init__(self, name: str, expr: str, *, title_format: str, text_format: str, tag_keys: str, color: str):
        super().__init__(name=name, datasource=prometheus_ref(), enable=True, icon_color=color, expr=expr)
        self.title_format = title_format
        self.text_format = text_format
        self.tag_keys = tag_keys
        self.step = "60s"

    def to_json(self) -> dict[str, object]:
        payload = super().to_json()
        payload.update(
            {
                "titleFormat": self.title_format,
                "textFormat": self.text_format,
                "tagKeys": self.tag_keys,
                "step": self.step,
            }
        )
        return payload


class Built(Builder[ModelT]):
    """Wraps a ready model object where a builder method expects a builder."""

    def __init__(self, model: ModelT) -> None:
        self._model = model

    def build(self) -> ModelT:
        return self._model
