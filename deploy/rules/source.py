"""gradwatch's recording and alert rules, defined once.

`python -m deploy.rules.generate` turns these into the Prometheus rule file
(deploy/prometheus/rules/gradwatch.rules.yml) and Grafana's alert provisioning
(deploy/grafana/provisioning/alerting/gradwatch.yaml). Edit here, never there.

Alerts lean on the workers' online detectors (`gradwatch_anomaly`, `gradwatch_phase`):
they see every step, with the job's own thresholds from its spec, where a rule
only sees one sample per scrape. The rules add persistence (`for`), one alert per
job, and silence for jobs that are over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUP = "gradwatch"
# Matches Prometheus' default evaluation_interval in deploy/prometheus/prometheus.yml.
INTERVAL = "15s"
GRAFANA_FOLDER = "gradwatch"
# The run board (dashboards/): relative, so it works behind whatever Grafana URL serves it.
RUN_DASHBOARD_UID = "gradwatch-run"
DASHBOARD_LINK = f"/d/{RUN_DASHBOARD_UID}?var-job_id={{{{ $labels.job_id }}}}"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


@dataclass(frozen=True)
class AlertRule:
    alert: str
    expr: str
    for_: str
    severity: str  # critical: the run is wasting compute now; warning: look at it today
    summary: str
    description: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def annotations(self) -> dict[str, str]:
        return {"summary": self.summary, "description": self.description, "dashboard": DASHBOARD_LINK}

    @property
    def all_labels(self) -> dict[str, str]:
        return {"severity": self.severity, **self.labels}


# ---- recording rules: what several alerts (and the dashboards) share
def _cause_share(cause: str, phases: str) -> str:
    return (
        "label_replace(sum by (job_id, rank) "
        f'(rate(gradwatch_step_phase_seconds_total{{step_phase=~"{phases}"}}[2m])), "cause", "{cause}", "", "")'
    )


_CAUSE_SHARES = (
    _cause_share("data loading", "data")
    + "\nor\n"
    + _cause_share("compute", "forward|backward|optimizer")
    + "\nor\n"
    + _cause_share("communication", "collective")
)

RECORDING_RULES = [
    # 1 for a job the service reports as over; alerts drop such jobs, so nothing keeps
    # firing during the workers' grace period after the last step.
    RecordingRule(
        "job_id:gradwatch_job_state:finished",
        'max by (job_id) (gradwatch_job_state{state=~"succeeded|failed|cancelled|timed_out"}) == 1',
    ),
    RecordingRule(
        "job_id:gradwatch_last_step_timestamp_seconds:max",
        "max by (job_id) (gradwatch_last_step_timestamp_seconds)",
    ),
    RecordingRule(
        "job_id_rank:gradwatch_step_duration_seconds:p50_rate2m",
        "histogram_quantile(0.5,\n  sum by (job_id, rank, le) (rate(gradwatch_step_duration_seconds_bucket[2m])))",
    ),
    RecordingRule(
        "job_id:gradwatch_step_duration_seconds:p50_rate2m",
        "histogram_quantile(0.5,\n  sum by (job_id, le) (rate(gradwatch_step_duration_seconds_bucket[2m])))",
    ),
    # A rank's share of wall time per cause (workers/heartbeat.py CAUSES), how far above the job's median
    # rank it is, and the cause where it is furthest above: what TrainingStraggler names.
    RecordingRule("job_id_rank_cause:gradwatch_step_phase_seconds:rate2m", _CAUSE_SHARES),
    RecordingRule(
        "job_id_rank_cause:gradwatch_step_phase_seconds:excess_rate2m",
        "job_id_rank_cause:gradwatch_step_phase_seconds:rate2m\n"
        "- on (job_id, cause) group_left ()\n"
        "quantile by (job_id, cause) (0.5, job_id_rank_cause:gradwatch_step_phase_seconds:rate2m)",
    ),
    RecordingRule(
        "job_id_rank:gradwatch_step_phase_seconds:slowest_cause",
        "topk by (job_id, rank) (1, job_id_rank_cause:gradwatch_step_phase_seconds:excess_rate2m)",
    ),
    # Each rank past its hang threshold, with the phase it is stuck in; the value is the seconds in it.
    RecordingRule(
        "job_id_rank_step_phase:gradwatch_rank_stuck_seconds:hung",
        "max by (job_id, rank, step_phase) (\n"
        "  (gradwatch_rank_stuck_seconds > on (job_id, rank) group_left () gradwatch_rank_hang_after_seconds)\n"
        "  * on (job_id, rank) group_left (step_phase) (gradwatch_rank_step_phase == 1)\n"
        ")",
    ),
]

_UNLESS_FINISHED = "unless on (job_id) job_id:gradwatch_job_state:finished"
# A rank whose median step time is 1.5x the job's and at least 20 ms more (TrainingStraggler).
_STRAGGLER = (
    "(\n"
    "  job_id_rank:gradwatch_step_duration_seconds:p50_rate2m\n"
    "  / on (job_id) group_left () job_id:gradwatch_step_duration_seconds:p50_rate2m\n"
    "  > 1.5\n"
    ")\n"
    "and on (job_id, rank)\n"
    "(\n"
    "  job_id_rank:gradwatch_step_duration_seconds:p50_rate2m\n"
    "  - on (job_id) group_left () job_id:gradwatch_step_duration_seconds:p50_rate2m\n"
    "  > 0.02\n"
    ")"
)
_UNLESS_CONVERGED = 'unless on (job_id) max by (job_id) (gradwatch_phase{phase="converged"}) == 1'


def _detector(kind: str) -> str:
    return f'max by (job_id) (gradwatch_anomaly{{kind="{kind}"}}) == 1'


def _raised(kind: str, window: str = "1m") -> str:
    """The detector raised `kind` within the window: seen even when it cleared between two scrapes."""
    return f'sum by (job_id) (increase(gradwatch_anomaly_raised_total{{kind="{kind}"}}[{window}])) > 0'


ALERT_RULES = [
    AlertRule(
        "TrainingLossNonFinite",
        # Any NaN/Inf is final for the weights it touches: fire on the first one (for 0s).
        # The counters catch steps the loop skipped; the gauges catch a NaN that got through.
        "(\n"
        "  sum by (job_id) (increase(gradwatch_nonfinite_total[1m])) > 0\n"
        "  or\n"
        "  " + _raised("nonfinite") + "\n"
        "  or\n"
        "  count by (job_id) (\n"
        "      gradwatch_loss_ema != gradwatch_loss_ema\n"
        "    or gradwatch_loss != gradwatch_loss\n"
        "    or abs(gradwatch_loss_ema) == Inf\n"
        "  )\n"
        ")\n" + _UNLESS_FINISHED,
        for_="0s",
        severity="critical",
        summary="Job {{ $labels.job_id }} produced a NaN or infinite loss or gradient",
        description=(
            "Job {{ $labels.job_id }} saw a non-finite loss or gradient (NaN/Inf) in the last minute. "
            "Steps on NaN weights are wasted compute: look at the step on the run board, then lower the "
            "learning rate, enable grad_clip or check the data, and resume from the last checkpoint "
            "(`gradwatch cancel {{ $labels.job_id }}` stops it meanwhile)."
        ),
    ),
    AlertRule(
        "TrainingDiverging",
        # The detector already judges against the run's own noise (0 false alarms on the healthy
        # corpus of bench/detector_quality.py): fire at once, also on a raise a scrape did not see.
        "(\n"
        "  max by (job_id) (\n"
        '      gradwatch_anomaly{kind="divergence"} == 1\n'
        '    or gradwatch_phase{phase="diverging"} == 1\n'
        "  )\n"
        "  or\n"
        "  " + _raised("divergence") + "\n"
        ")\n" + _UNLESS_FINISHED,
        for_="0s",
        severity="critical",
        summary="Job {{ $labels.job_id }} is diverging",
        description=(
            "The smoothed train loss of job {{ $labels.job_id }} has risen well above its best value "
            "(the divergence detector holds). It will not recover on its own: cancel it or let "
            "`on_divergence: rollback` restore the last good checkpoint, then retry with a lower learning "
            "rate, a longer warmup or gradient clipping."
        ),
    ),
    AlertRule(
        "TrainingLossSpike",
        # A spike is an event, often one step long, cleared before the next scrape on a fast job: the
        # raise counter keeps it, so fire at once (for 0s) on any raise in the last minute. It resolves
        # by itself a minute later.
        _raised("loss_spike") + "\n" + _UNLESS_FINISHED,
        for_="0s",
        severity="warning",
        summary="Loss spike in job {{ $labels.job_id }}",
        description=(
            "A train loss of job {{ $labels.job_id }} jumped far above its recent median (robust z-score "
            "of log(loss) over spike_z, default 8, and at least 1.5x). One spike is often a bad batch; "
            "repeated spikes come before "
            "divergence: check the learning rate and grad_clip, and the batches around that step."
        ),
    ),
    AlertRule(
        "TrainingStalled",
        # Detectors only: plateau (flat, and even the upper bound of what the run learned since its
        # first plateau_window steps is under stalled_improvement), lr_too_low (the weights barely
        # move), dead_run (the loss bit-identical or every gradient 0) or lr_schedule (the logged
        # learning rate at 0 before the schedule's planned end). A PromQL fallback on the loss EMA
        # cannot tell a slow healthy tail from a stall and is gone. 30 s rides out a flag that flaps once.
        "(\n"
        "  max by (job_id) (\n"
        '      gradwatch_anomaly{kind=~"plateau|lr_too_low|dead_run|lr_schedule"} == 1\n'
        '    or gradwatch_phase{phase="stalled"} == 1\n'
        "  )\n"
        ")\n" + _UNLESS_CONVERGED + "\n" + _UNLESS_FINISHED,
        for_="30s",
        severity="warning",
        summary="Job {{ $labels.job_id }} stopped improving before converging",
        description=(
            "The smoothed train loss of job {{ $labels.job_id }} has stayed flat without learning (or "
            "its weights barely move, its loss has not changed at all, or its learning rate fell to 0 "
            "before the schedule's end): the remaining steps buy little. Consider a higher learning rate or "
            "a schedule restart, a larger model, or stopping early; set telemetry.detectors.converged_loss if this "
            "loss is good enough."
        ),
    ),
    AlertRule(
        "TrainingNoProgress",
        # The heartbeat is set after every step. 2 minutes is far above a step plus validation plus a
        # checkpoint for the runs we host; 1 minute more lets one slow checkpoint write through.
        # A series is only present while its endpoint answers scrapes, so this fires for a live but
        # hung worker, never for one that is gone; a heartbeat of 0 means no step yet.
        "(time() - job_id:gradwatch_last_step_timestamp_seconds:max > 120)\n"
        "and on (job_id) job_id:gradwatch_last_step_timestamp_seconds:max > 0\n" + _UNLESS_FINISHED,
        for_="1m",
        severity="critical",
        summary="Job {{ $labels.job_id }} has made no step for {{ $value | humanizeDuration }}",
        description=(
            "The workers of job {{ $labels.job_id }} still answer but no optimizer step finished for "
            "{{ $value | humanizeDuration }}: a hung collective (one rank lost), a dead data loader or "
            "a deadlock. Check `gradwatch logs {{ $labels.job_id }}`; cancelling lets the job restart "
            "from its last checkpoint if max_failures allows."
        ),
    ),
    AlertRule(
        "TrainingOverfitting",
        # Detector: val loss up overfit_evals (3) evaluations in a row while train loss falls.
        # It changes only at evaluations, so 30 s just ignores a flag that flaps once.
        _detector("overfitting") + "\n" + _UNLESS_FINISHED,
        for_="30s",
        severity="warning",
        summary="Job {{ $labels.job_id }} is overfitting",
        description=(
            "The validation loss of job {{ $labels.job_id }} keeps rising while its train loss falls. "
            "Further steps make the model worse on unseen data: keep the best checkpoint, and add "
            "regularisation (weight decay, dropout), more data or early stopping."
        ),
    ),
    AlertRule(
        "VanishingGradients",
        # Detector: a layer's grad norm below 1e-6 or update ratio below 1e-7 (spec thresholds).
        # Tiny gradients are expected once converged. 30 s: norms are measured every
        # telemetry.interval steps, so one quiet reading must repeat before anyone is told.
        _detector("vanishing_gradients") + "\n" + _UNLESS_CONVERGED + "\n" + _UNLESS_FINISHED,
        for_="30s",
        severity="warning",
        summary="Vanishing gradients in job {{ $labels.job_id }}",
        description=(
            "Some layers of job {{ $labels.job_id }} get (almost) no gradient, so they no longer learn. "
            "See the per-layer panel of the run board; usual fixes are a different activation or "
            "initialisation, normalisation layers, residual connections or a higher learning rate."
        ),
    ),
    AlertRule(
        "ExplodingGradients",
        # Detector: global grad norm above 1e3 or a layer's update ratio above 0.5 (spec thresholds).
        # 15 s: a single outlier batch does not count, a trend does; divergence/NaN alerts cover what
        # follows if it keeps going.
        _detector("exploding_gradients") + "\n" + _UNLESS_FINISHED,
        for_="15s",
        severity="warning",
        summary="Exploding gradients in job {{ $labels.job_id }}",
        description=(
            "The gradient norm or the relative weight update of job {{ $labels.job_id }} is far above "
            "normal; a NaN or divergence often follows. Enable or lower grad_clip, lower the learning "
            "rate or lengthen warmup."
        ),
    ),
    AlertRule(
        "GradNormGrowing",
        # Detector: the global grad norm grew grad_growth_factor (3x) over grad_growth_horizon steps,
        # significantly, and stands that far above its own baseline: an early warning that most often
        # comes before a blow-up, while the loss still looks fine. 15 s as ExplodingGradients.
        _detector("grad_norm_growth") + "\n" + _UNLESS_FINISHED,
        for_="15s",
        severity="warning",
        summary="The gradient norm of job {{ $labels.job_id }} keeps growing",
        description=(
            "The global gradient norm of job {{ $labels.job_id }} has grown geometrically against its own "
            "baseline while the loss may still look fine; a divergence often follows. Lower the learning "
            "rate, enable grad_clip or check for an unstable layer (the run board's gradient panel)."
        ),
    ),
    AlertRule(
        "TrainingStraggler",
        # DDP runs at the pace of its slowest rank. 1.5x the job's median costs a third of the job's
        # throughput; the 20 ms floor keeps histogram-bucket rounding on millisecond steps from
        # counting. Medians, not means, so a rank that also writes checkpoints is not a straggler.
        # The cause (data loading, compute or communication) comes from the heartbeats' phase times;
        # without them (no phase series) the alert comes without it.
        "(\n"
        "  (" + _STRAGGLER + ")\n"
        "  * on (job_id, rank) group_left (cause) (0 * job_id_rank:gradwatch_step_phase_seconds:slowest_cause + 1)\n"
        "  or\n"
        "  (" + _STRAGGLER + ")\n"
        "  unless on (job_id, rank) job_id_rank:gradwatch_step_phase_seconds:slowest_cause\n"
        ")\n" + _UNLESS_FINISHED,
        for_="1m",
        severity="warning",
        summary="Rank {{ $labels.rank }} of job {{ $labels.job_id }} is a straggler",
        description=(
            'The median step time of rank {{ $labels.rank }} is {{ $value | printf "%.1f" }}x the '
            "median of job {{ $labels.job_id }}, and every rank waits for it at each all-reduce. "
            "{{ if $labels.cause }}It is slower in {{ $labels.cause }} than the job's median rank. {{ end }}"
            "Look for a busy or smaller node, CPU throttling or a slow data loader on that rank (ranks board)."
        ),
    ),
    AlertRule(
        "TrainingHang",
        # The stuck rank is the one not waiting in the gradient all-reduce (the others wait there for it);
        # when all wait in it, all are named. The threshold is the rank's own (telemetry.hang_after, or 10
        # median step times): it already is the persistence, so fire at once.
        "max by (job_id, rank, step_phase) (\n"
        "  (\n"
        "    job_id_rank_step_phase:gradwatch_rank_stuck_seconds:hung\n"
        "    unless on (job_id, rank)\n"
        '      job_id_rank_step_phase:gradwatch_rank_stuck_seconds:hung{step_phase="collective"}\n'
        "  )\n"
        "  or\n"
        "  (\n"
        "    job_id_rank_step_phase:gradwatch_rank_stuck_seconds:hung\n"
        '    unless on (job_id) job_id_rank_step_phase:gradwatch_rank_stuck_seconds:hung{step_phase!="collective"}\n'
        "  )\n"
        ")\n" + _UNLESS_FINISHED,
        for_="0s",
        severity="critical",
        summary="Rank {{ $labels.rank }} of job {{ $labels.job_id }} is stuck in its {{ $labels.step_phase }} phase",
        description=(
            "Rank {{ $labels.rank }} of job {{ $labels.job_id }} has been in the {{ $labels.step_phase }} phase of "
            "one step for {{ $value | humanizeDuration }}, past its hang threshold (telemetry.hang_after, or 10 "
            "median step times), and the other ranks wait for it. The job's hang event names its node and step "
            "and holds its Python stack (`gradwatch logs {{ $labels.job_id }}` too); on_hang says whether "
            "gradwatch restarts it from its last checkpoint or fails it."
        ),
    ),
    AlertRule(
        "TrainingJobFailed",
        # Fires for the 10 minutes after the job enters `failed` (it was not failed 10 minutes ago),
        # then resolves: a failed job is a fact, not a condition that someone can fix by waiting.
        'max by (job_id) (gradwatch_job_state{state="failed"}) == 1\n'
        'unless on (job_id) max by (job_id) (gradwatch_job_state{state="failed"} offset 10m) == 1',
        for_="0s",
        severity="critical",
        summary="Job {{ $labels.job_id }} failed",
        description=(
            "Job {{ $labels.job_id }} ended in state failed (after any retries its max_failures allowed). "
            "`gradwatch status {{ $labels.job_id }}` shows the error and `gradwatch logs "
            "{{ $labels.job_id }}` the workers' output; resubmit once fixed."
        ),
    ),
]

ALERT_NAMES = tuple(rule.alert for rule in ALERT_RULES)
