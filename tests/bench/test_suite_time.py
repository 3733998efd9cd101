"""bench/suite_time.py reads pytest's own output: its closing counts and its --durations rows."""

from __future__ import annotations

from bench.suite_time import _counts, slowest, verdict

OUTPUT = """
============================= slowest 3 durations ==============================
61.20s call     tests/test_e2e_alerts.py::test_divergence_alert
12.03s setup    tests/service/test_api_fuzz.py::test_schemathesis_finds_no_failure
0.51s teardown tests/test_spec.py::test_x
================= 1 failed, 711 passed, 1 warning in 1056.31s (0:17:36) =================
"""


def test_the_closing_line_gives_the_counts() -> None:
    assert _counts(OUTPUT) == {"failed": 1, "passed": 711, "warning": 1}
    assert _counts("no pytest here") == {}


def test_the_slowest_tests_come_first() -> None:
    rows = slowest(OUTPUT, n=2)
    assert rows == [
        (61.2, "tests/test_e2e_alerts.py::test_divergence_alert (call)"),
        (12.03, "tests/service/test_api_fuzz.py::test_schemathesis_finds_no_failure (setup)"),
    ]


def test_the_goal_needs_every_run_passing_under_it_not_only_the_median() -> None:
    assert verdict([850.0, 860.0, 899.0], ok=True).endswith("it meets the goal.")
    assert verdict([853.0, 900.0, 922.0], ok=True).endswith("it misses the goal.")  # median 900, one run over
    assert "slowest 922 s (1.02)" in verdict([853.0, 900.0, 922.0], ok=True)
    assert verdict([850.0, 860.0, 870.0], ok=False).endswith("it misses the goal.")  # a run failed
