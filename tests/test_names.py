"""The shared names (gradwatch.names) are the only list of job states, phases and anomaly kinds:
every table elsewhere that gives them words or colours covers those names and no others."""

from __future__ import annotations

import re
from pathlib import Path

from dashboards import run, style
from gradwatch.names import ANOMALIES, JOB_STATES, NONFINITE_KINDS, PHASES, TERMINAL_STATES
from service.cli import jobs as cli_jobs
from service.report import report
from service.store import jobs as store_jobs
from workers import detectors, heartbeat


def test_phase_and_anomaly_tables_cover_exactly_the_shared_names():
    assert set(report.PHASE_WORDS) == set(report.PHASE_COLORS) == set(style.PHASE_COLORS) == set(PHASES)
    assert set(report.ANOMALY_WORDS) == set(report.ANOMALY_COLORS) == set(ANOMALIES)
    assert set(run.ANOMALY_COLORS) <= set(ANOMALIES)  # the run board colours the kinds it draws


def test_job_state_tables_cover_exactly_the_shared_states():
    assert set(cli_jobs.STATE_STYLE) == set(JOB_STATES)
    assert set(store_jobs.ALLOWED) | {s for targets in store_jobs.ALLOWED.values() for s in targets} == set(JOB_STATES)
    assert set(store_jobs.ALLOWED).isdisjoint(TERMINAL_STATES)  # no way out of an ended state


def test_the_detectors_hold_every_anomaly_kind_and_no_other():
    monitor = detectors.DynamicsMonitor()
    assert set(monitor.latches) == set(ANOMALIES)
    assert monitor.current_phase in PHASES


def test_the_rules_and_boards_name_only_shared_phases_and_kinds():
    repo = Path(__file__).resolve().parents[1]
    texts = [(repo / "deploy/prometheus/rules/gradwatch.rules.yml").read_text()]
    texts += [path.read_text() for path in sorted((repo / "dashboards").glob("*.json"))]
    text = "\n".join(texts).replace('\\"', '"')
    kinds = set(re.findall(r'\bkind="(\w+)"', text))
    phases = set(re.findall(r'\bphase="(\w+)"', text))  # not step_phase (workers/heartbeat.py)
    assert kinds and phases
    assert kinds <= set(ANOMALIES) | set(NONFINITE_KINDS), kinds - set(ANOMALIES)
    assert phases <= set(PHASES), phases - set(PHASES)
    step_phases = set(re.findall(r'\bstep_phase(?:=|!=)"(\w+)"', text))  # a step's phases: the heartbeat's
    assert step_phases and step_phases <= set(heartbeat.PHASES), step_phases - set(heartbeat.PHASES)
