"""What `gradwatch run` prints while a job runs: each event, and one progress line per step reached."""

from gradwatch.status import RunStatus
from workers.driver import _print_listener


def test_a_progress_line_per_step_reached_and_every_event(capsys):
    status = RunStatus(
        job_id="gw-print", state="running", updated_at=0.0, step=5, max_steps=10, train_loss=0.25, phase="warmup"
    )
    _print_listener(status, [])
    _print_listener(status, [])  # the same step again: nothing new
    _print_listener(status.model_copy(update={"step": 6, "train_loss": None}), [])
    other = RunStatus(job_id="gw-other", state="running", updated_at=0.0, step=6, max_steps=8)
    _print_listener(other, [])  # another job at the same step gets its own line
    assert capsys.readouterr().out.splitlines() == [
        "[gw-print] step 5/10 loss 0.2500 phase warmup",
        "[gw-print] step 6/10 loss None phase warmup",
        "[gw-other] step 6/8 loss None phase None",
    ]
