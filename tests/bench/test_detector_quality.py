"""bench/detector_quality.py on the public training logs: the rows it prints and the goals it says are missed."""

import io

from bench import detector_quality as dq
from bench.corpus import MEANT_FOR, REAL_MEANT_FOR, real_logs
from gradwatch.names import ANOMALIES


def test_the_public_logs_make_one_row_per_family_and_the_misses_are_named() -> None:
    verdicts, lines = dq.judge_real_logs()
    assert len(lines) == len(real_logs()) and sum(map(len, verdicts.values())) == len(lines)
    MEANT_FOR.update(REAL_MEANT_FOR)
    table = dq.rate_rows(verdicts)
    healthy = table["real_healthy_logs"]
    assert healthy["healthy"] and healthy["runs"] == 7
    assert all(healthy[kind]["rate"] == 0.0 for kind in ANOMALIES)
    assert table["real_overfit_logs"]["overfitting"]["rate"] == 1.0
    assert table["real_overfit_logs"]["overfitting"]["p50"] == 1000.0  # the third evaluation, 1000 after the turn
    out = io.StringIO()
    misses = dq.print_tables(table, out)
    text = out.getvalue()
    assert "| real_healthy_logs | 7 |" in text and "| real_diverged_logs | 2 | divergence | 100% |" in text
    assert "| real_mild_overfit_logs | 1 | overfitting | 100% |" in text
    assert not any("(goal >= 95%)" in m for m in misses), (
        misses
    )  # every public log caught (delays beside anchors aside)
    # a log its detector sleeps through is named as a miss
    slept = {
        **verdicts,
        "real_diverged_logs": [dq.Verdict(v.family, v.onset, {}) for v in verdicts["real_diverged_logs"]],
    }
    missed = dq.print_tables(dq.rate_rows(slept), io.StringIO())
    assert [m for m in missed if "real_diverged_logs" in m] == [
        "divergence catches 0% of real_diverged_logs (goal >= 95%)"
    ], missed
