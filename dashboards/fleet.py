"""Fleet board: every run at once, filtered by team, project and job state."""

from grafana_foundation_sdk.builders import common as common_builder
from grafana_foundation_sdk.builders import dashboard, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.models.dashboard import (
    DataTransformerConfig,
    DynamicConfigValue,
    ValueMap,
    ValueMappingResult,
)

from dashboards.style import (
    FLEET_UID,
    PHASE_COLORS,
    alert_list_panel,
    label_variable,
    new_dashboard,
    promql,
    run_link,
    stat_panel,
    styled,
    thresholds,
    timeline_panel,
    timeseries_panel,
)

# Runs hidden by the filters. Written as an exclusion (`unless`) so that "All" filters nothing,
# even for a run whose gradwatch_job_info or gradwatch_job_state is not there (yet or any more).
_EXCLUDED = (
    'gradwatch_job_info{team!~"$team"} or gradwatch_job_info{project!~"$project"}'
    ' or (gradwatch_job_state{state!~"$state"} == 1)'
)


def in_view(expr: str) -> str:
    """Keep the series of `expr` whose run passes the team, project and state filters."""
    return f"({expr}) unless on (job_id) ({_EXCLUDED})"


def jobs_by_state() -> stat.Panel:
    return stat_panel(
        "Jobs by state",
        "Jobs the service knows, counted by state (gradwatch_jobs from the service). "
        "Team and project filters do not apply: the service counts every job.",
        "none",
        width=12,
    ).with_target(promql('sum by (state) (gradwatch_jobs{state=~"$state"})', "{{state}}", instant=True))


def runs_by_phase() -> stat.Panel:
    return stat_panel(
        "Runs by phase",
        "Running jobs counted by the training phase their rank 0 reports (gradwatch_phase == 1).",
        "none",
        width=12,
    ).with_target(promql(f"count by (phase) ({in_view('gradwatch_phase == 1')})", "{{phase}}", instant=True))


# Table columns: query ref id -> (column title, unit). A and B only carry labels.
_RUN_COLUMNS = {
    "C": ("loss (EMA)", "none"),
    "D": ("loss trend /min", "percentunit"),
    "E": ("grad norm", "none"),
    "F": ("samples/s", "suffix: samples/s"),
    "G": ("firing alerts", "none"),
}


def runs_table() -> table.Panel:
    """One row per run; job_id links to the run board."""
    panel = (
        styled(
            table.Panel(),
            "Runs",
            "Every running job: its phase, smoothed loss and how fast it moves, global gradient norm, "
            "throughput and firing alerts. Click a job_id to open its run board.",
            "none",
            width=24,
            height=10,
        )
        .targets(_runs_queries())
        .with_transformation(DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(_runs_columns())
    )
    return _runs_cells(panel).sort_by([common_builder.TableSortByFieldState().display_name("job_id")])


def _runs_queries() -> list:
    """One instant query per column group, each a table keyed by job_id (merged into rows)."""
    return [
        promql(in_view("max by (job_id, name, owner) (gradwatch_job_info)"), ref_id="A", as_table=True),
        promql(in_view("max by (job_id, phase) (gradwatch_phase == 1)"), ref_id="B", as_table=True),
        promql(in_view("avg by (job_id) (gradwatch_loss_ema)"), ref_id="C", as_table=True),
        # Relative change of the smoothed loss per minute: negative is learning.
        promql(
            in_view("avg by (job_id) (deriv(gradwatch_loss_ema[5m])) * 60 / avg by (job_id) (gradwatch_loss_ema)"),
            ref_id="D",
            as_table=True,
        ),
        promql(in_view("max by (job_id) (gradwatch_grad_norm)"), ref_id="E", as_table=True),
        promql(in_view("sum by (job_id) (rate(gradwatch_samples_total[1m]))"), ref_id="F", as_table=True),
        promql(
            in_view('count by (job_id) (ALERTS{alertstate="firing"}) or 0 * max by (job_id) (gradwatch_job_info)'),
            ref_id="G",
            as_table=True,
        ),
    ]


def _runs_columns() -> DataTransformerConfig:
    """The merged table's columns: in order, named, the queries' own values left out."""
    order = ["job_id", "name", "owner", "phase"] + [f"Value #{ref}" for ref in _RUN_COLUMNS]
    return DataTransformerConfig(
        id_val="organize",
        options={
            "excludeByName": {"Time": True, "Value #A": True, "Value #B": True},
            "indexByName": {name: i for i, name in enumerate(order)},
            "renameByName": {f"Value #{ref}": title for ref, (title, _) in _RUN_COLUMNS.items()},
        },
    )


def _runs_cells(panel: table.Panel) -> table.Panel:
    """How cells look: job_id links to its run board, phases and alerts in colour, units per column."""
    panel = (
        panel.override_by_name(
            "job_id", [DynamicConfigValue(id_val="links", value=[run_link("${__value.raw}").build()])]
        )
        .override_by_name(
            "phase",
            [
                DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                DynamicConfigValue(id_val="mappings", value=[_PHASE_COLORS]),
            ],
        )
        .override_by_name(
            "loss trend /min",
            [
                DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                DynamicConfigValue(id_val="thresholds", value=thresholds((None, "green"), (0, "orange")).build()),
                DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
            ],
        )
        .override_by_name(
            "firing alerts",
            [
                DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background"}),
                DynamicConfigValue(id_val="thresholds", value=thresholds((None, "green"), (1, "red")).build()),
                DynamicConfigValue(id_val="color", value={"mode": "thresholds"}),
            ],
        )
    )
    for title, unit in _RUN_COLUMNS.values():
        if unit != "none":
            panel = panel.override_by_name(title, [DynamicConfigValue(id_val="unit", value=unit)])
    return panel


_PHASE_COLORS = ValueMap(
    options={
        phase: ValueMappingResult(color=color, index=index) for index, (phase, color) in enumerate(PHASE_COLORS.items())
    }
)


def loss_per_run() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Loss (EMA) per run",
            "Smoothed training loss (gradwatch_loss_ema), averaged over a run's ranks. Click a line to open the run.",
            "none",
            width=8,
        )
        .with_target(promql(in_view("avg by (job_id) (gradwatch_loss_ema)"), "{{job_id}}"))
        .data_links([run_link("${__field.labels.job_id}")])
    )


def grad_norm_per_run() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Global grad norm per run",
            "L2 norm of the all-reduced gradient (gradwatch_grad_norm, rank 0). Spikes precede divergence; "
            "a slide toward zero means vanishing gradients.",
            "none",
            width=8,
            log_scale=True,
        )
        .with_target(promql(in_view("max by (job_id) (gradwatch_grad_norm)"), "{{job_id}}"))
        .data_links([run_link("${__field.labels.job_id}")])
    )


def throughput_per_run() -> timeseries.Panel:
    return (
        timeseries_panel(
            "Throughput per run",
            "Training samples per second, summed over a run's ranks (rate of gradwatch_samples_total).",
            "suffix: samples/s",
            width=8,
        )
        .with_target(promql(in_view("sum by (job_id) (rate(gradwatch_samples_total[$__rate_interval]))"), "{{job_id}}"))
        .data_links([run_link("${__field.labels.job_id}")])
    )


def firing_alerts_timeline() -> statetimeline.Panel:
    return timeline_panel(
        "Firing alerts",
        'When each alert fired, per run (ALERTS{alertstate="firing"} from Prometheus\'s rules).',
        on=("firing", "red"),
        height=8,
    ).with_target(
        promql(
            in_view('max by (alertname, job_id) (ALERTS{alertstate="firing"})'),
            "{{alertname}} {{job_id}}",
        )
    )


def alert_list() -> dashboard.Panel:
    """Grafana's alert list, limited to the rules Prometheus evaluates (not Grafana-managed copies)."""
    return alert_list_panel(
        "Alert rules",
        "Firing and pending alerts from gradwatch's Prometheus rules, most important first.",
        max_items=50,
        height=8,
    )


def fleet() -> dashboard.Dashboard:
    """The fleet board."""
    return (
        new_dashboard(FLEET_UID, "gradwatch / Fleet", "All gradwatch training runs: state, phase, loss, alerts.")
        .with_variable(label_variable("team", "Team", "label_values(gradwatch_job_info, team)", include_all=True))
        .with_variable(
            label_variable(
                "project",
                "Project",
                'label_values(gradwatch_job_info{team=~"$team"}, project)',
                include_all=True,
            )
        )
        .with_variable(label_variable("state", "State", "label_values(gradwatch_jobs, state)", include_all=True))
        .with_row(dashboard.Row("Overview"))
        .with_panel(jobs_by_state())
        .with_panel(runs_by_phase())
        .with_panel(runs_table())
        .with_row(dashboard.Row("Training"))
        .with_panel(loss_per_run())
        .with_panel(grad_norm_per_run())
        .with_panel(throughput_per_run())
        .with_row(dashboard.Row("Alerts"))
        .with_panel(firing_alerts_timeline())
        .with_panel(alert_list())
    )
