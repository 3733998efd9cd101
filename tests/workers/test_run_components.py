"""The parts of `Run` (workers/run/), each driven alone in one process: no Ray, no job, no loop."""

from __future__ import annotations

import json

import pytest
import torch

from gradwatch.spec import RollbackSpec, load_spec
from tests.conftest import small_spec
from workers.heartbeat import Heartbeat
from workers.run.checkpoints import STATE_FILE, Checkpoints
from workers.run.guard import RECOVERY_STEPS, GuardedOptimizer, UpdateGuard
from workers.run.progress import Progress, rank_report, reports_for_tests
from workers.run.recording import MAX_NAMED_SERIES, Pending, Recorder
from workers.rundir import LocalRunDir
from workers.session import LocalSession
from workers.telemetry import Telemetry

SPEC = load_spec(small_spec(scaling={"num_workers": 1}, telemetry={"interval": 1000}))


def _model_and_telemetry() -> tuple[torch.nn.Linear, Telemetry]:
    spec = SPEC
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, Telemetry(spec, "gw-parts", 0, 1, model, torch.device("cpu"))


def _guard(max_skipped_steps: int | None = 5) -> UpdateGuard:
    return UpdateGuard(1, torch.device("cpu"), Heartbeat("gw-parts", 0, SPEC.telemetry.hang_after), max_skipped_steps)


def _grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)).item()


# ------------------------------------------------------------------ the update guard
def test_the_guard_skips_a_non_finite_gradient_and_the_guarded_optimizer_leaves_the_weights():
    model, tel = _model_and_telemetry()
    guard = _guard()
    guard.attach(list(model.parameters()), grad_clip=None)
    optimizer = GuardedOptimizer(guard, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(8, 4)

    loss = model(x).pow(2).mean()
    loss.backward()
    decision = guard.decide(tel, loss, {"half": loss / 2}, step=0)
    assert decision.safe and guard.safe and guard.skipped_steps == 0
    assert decision.loss == pytest.approx(loss.item()) and decision.global_loss == decision.loss
    assert decision.terms["half"] == pytest.approx(loss.item() / 2)
    assert decision.grad_norm == pytest.approx(_grad_norm(model), rel=1e-5)

    optimizer.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(x).pow(2).mean()
    loss.backward()
    grad = model.weight.grad
    assert grad is not None
    grad[0, 0] = float("nan")
    decision = guard.decide(tel, loss, {}, step=1)
    assert not decision.safe and not guard.safe and guard.skipped_steps == 1
    optimizer.step()  # skipped: the weights stay as they were
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_the_guard_clips_a_safe_update_and_skips_inside_a_rollback_window():
    model, tel = _model_and_telemetry()
    guard = _guard()
    guard.attach(list(model.parameters()), grad_clip=0.01)
    (model(torch.randn(8, 4)) * 100).pow(2).mean().backward()
    assert guard.decide(tel, 1.0, {}, step=0).safe
    assert _grad_norm(model) == pytest.approx(0.01, rel=1e-3)
    guard.skip_until_step = 3
    assert not guard.decide(tel, 1.0, {}, step=2).safe  # a finite step, but inside the skip window
    assert guard.decide(tel, 1.0, {}, step=3).safe
    guard.stale = True  # the gradient came from the weights before a rollback
    assert not guard.decide(tel, 1.0, {}, step=4).safe and not guard.stale
    assert guard.skipped_steps == 2


def test_a_stretch_of_skipped_updates_ends_the_run_unless_it_recovers():
    guard = _guard(max_skipped_steps=5)
    assert guard.check_skipped(1, True, 2.5) is None
    for step in range(2, 6):
        assert guard.check_skipped(step, False, float("nan")) is None
    reason = guard.check_skipped(6, False, float("nan"))
    assert reason == "diverged: 5 consecutive non-finite steps since step 2; last finite loss 2.5 at step 1"

    recovering = _guard(max_skipped_steps=50)
    recovering.check_skipped(1, False, float("nan"))
    for step in range(2, 2 + RECOVERY_STEPS):
        assert recovering.check_skipped(step, True, 1.0) is None
    # recovered: a later stretch is counted from its own start
    assert recovering.check_skipped(20, False, float("nan")) is None
    assert recovering._skipped_since == 20

    unlimited = _guard(max_skipped_steps=None)
    assert all(unlimited.check_skipped(step, False, float("inf")) is None for step in range(1, 200))


# ------------------------------------------------------------------ recording
def _no_telemetry() -> Telemetry:
    raise RuntimeError("call run.watch(model, optimizer) first")


def test_the_recorder_records_a_step_its_terms_and_the_validation_into_the_telemetry(tmp_path):
    _, tel = _model_and_telemetry()
    recorder = Recorder(lambda: tel, 1, torch.device("cpu"))
    recorder.check_name("recon", "loss term")
    pending = Pending(1, 0.5, 0.5, 2.0, None, None, {"recon": 0.25}, 32, 0.0, 0.1, True, 0.0, None, None)
    recorder.record(pending, epoch=0)
    recorder.validation(1, 0.75, 0.5, reduce=True)  # one rank: nothing to reduce
    recorder.validation(2, 0.5, None, reduce=False)
    recorder.log(2, {"temperature": 3})
    tel.flush()
    registry, labels = tel.metrics.registry, {"job_id": "gw-parts", "rank": "0"}
    assert registry.get_sample_value("gradwatch_step", labels) == 1
    assert registry.get_sample_value("gradwatch_loss", {**labels, "split": "train"}) == 0.5
    assert recorder.samples == 32
    assert recorder.first_val_loss == 0.75 and recorder.last_val == (0.5, None)
    assert registry.get_sample_value("gradwatch_loss_term", {**labels, "term": "recon"}) == 0.25
    assert registry.get_sample_value("gradwatch_scalar", {**labels, "name": "temperature"}) == 3.0


def test_the_recorder_refuses_bad_names_and_more_than_the_bounded_number_of_series():
    recorder = Recorder(_no_telemetry, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="name 'bad-name': use letters, digits and '_'"):
        recorder.check_name("bad-name", "scalar")
    with pytest.raises(ValueError, match=r"run.log\(lr=...\): give a number, got str"):
        Recorder(lambda: _model_and_telemetry()[1], 1, torch.device("cpu")).log(0, {"lr": "high"})
    with pytest.raises(RuntimeError, match="run.watch"):  # a series needs the telemetry
        recorder.gauge("scalar", "x")
    _, tel = _model_and_telemetry()
    full = Recorder(lambda: tel, 1, torch.device("cpu"))
    for i in range(MAX_NAMED_SERIES):
        full.gauge("scalar", f"s{i}")
    full.check_name("s0", "scalar")  # a known name is fine
    with pytest.raises(ValueError, match=f"named series number {MAX_NAMED_SERIES + 1}"):
        full.check_name("one_more", "loss term")


# ------------------------------------------------------------------ checkpoints, rollback, rewind
def _watched(tmp_path) -> tuple[torch.nn.Linear, Checkpoints, LocalSession]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100)
    session = LocalSession(tmp_path / "ckpt")
    checkpoints = Checkpoints(session, 0, torch.device("cpu"))
    checkpoints.attach(model, optimizer, scheduler)
    return model, checkpoints, session


def _train_a_step(model: torch.nn.Linear, checkpoints: Checkpoints) -> None:
    assert checkpoints.optimizer is not None
    checkpoints.optimizer.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    checkpoints.optimizer.step()


def test_a_saved_checkpoint_is_read_back_and_a_suspect_one_is_not_the_rollback_target(tmp_path):
    model, checkpoints, session = _watched(tmp_path)
    assert checkpoints.latest() is None
    _train_a_step(model, checkpoints)
    state = checkpoints.snapshot({"step": 7, "epoch": 1}, {"note": "mine"})
    checkpoints.save(state, {}, {"step": 7})
    assert checkpoints.good is state and session.reports == [{"step": 7}]
    suspect = checkpoints.snapshot({"step": 9, "epoch": 1}, {})
    checkpoints.save(suspect, {"loss_spike": True}, {"step": 9})
    assert checkpoints.good is state  # saved, but the weights are suspect: not where a rollback goes
    read = checkpoints.latest()
    assert read is not None and read["step"] == 9 and read["extra"] == {}
    assert torch.equal(read["model"]["weight"], model.weight.detach())
    assert (tmp_path / "ckpt" / "checkpoint_000001" / STATE_FILE).is_file()


def test_a_rollback_restores_the_good_weights_and_lowers_the_learning_rate(tmp_path):
    model, checkpoints, _ = _watched(tmp_path)
    checkpoints.good = checkpoints.snapshot({"step": 0, "epoch": 0}, {})
    good_weight = model.weight.detach().clone()
    _train_a_step(model, checkpoints)
    assert not torch.equal(model.weight, good_weight)
    back = checkpoints.rollback(RollbackSpec(lr_factor=0.5))
    assert back["step"] == 0 and torch.equal(model.weight, good_weight)
    assert checkpoints.rollbacks == 1 and checkpoints.lr_scale == 0.5
    assert checkpoints.optimizer is not None and checkpoints.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert checkpoints.scheduler.base_lrs == [pytest.approx(0.05)]
    checkpoints.rollback(RollbackSpec(lr_factor=0.5))  # the good state had scale 1: the lr is scaled from it
    assert checkpoints.lr_scale == 0.25 and checkpoints.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_a_rewind_goes_back_to_the_good_state_and_leaves_out_the_batches_before_the_anomaly(tmp_path):
    model, checkpoints, _ = _watched(tmp_path)
    for step in range(1, 4):
        checkpoints.batch_log.fed(step, epoch=0, batch=step - 1, indices=[step])
    checkpoints.good = checkpoints.snapshot({"step": 3, "epoch": 0}, {})
    good_weight = model.weight.detach().clone()
    for step in range(4, 7):
        checkpoints.batch_log.fed(step, epoch=0, batch=step - 1, indices=[step])
        _train_a_step(model, checkpoints)
    back, left_out = checkpoints.rewind(seen_at=6, skip_steps=2)
    assert back["step"] == 3 and torch.equal(model.weight, good_weight) and checkpoints.rewinds == 1
    assert [b.step for b in left_out] == [5, 6]
    assert checkpoints.batch_log.skips(0, 4) and checkpoints.batch_log.skips(0, 5)
    assert not checkpoints.batch_log.skips(0, 3)
    resumed = Checkpoints(LocalSession(tmp_path / "other"), 0, torch.device("cpu"))
    resumed.resume(checkpoints.snapshot({"step": 3, "epoch": 0}, {}))
    assert resumed.rewinds == 1 and resumed.batch_log.skipped == {(0, 4), (0, 5)}


# ------------------------------------------------------------------ progress and the end
def test_progress_posts_at_most_twice_a_second_and_the_end_writes_the_result_once(tmp_path):
    _, tel = _model_and_telemetry()
    local = LocalRunDir(tmp_path / "run", "gw-parts", SPEC)
    progress = Progress(0, 1, local.client())
    progress.own_run_dir, progress.local_dir = True, local

    def post(step: int, rank: Progress = progress, force: bool = False) -> None:
        rank.post(tel, step=step, max_steps=10, epoch=0, last_val=(0.5, 0.9), samples=64, rollbacks=1, force=force)

    post(3)
    post(4)  # under half a second later: not posted
    assert local.board.progress["step"] == 3 and local.board.progress["val_accuracy"] == 0.9
    post(5, force=True)
    assert local.board.progress["step"] == 5 and local.board.progress["rollbacks"] == 1
    post(9, rank=Progress(1, 2, local.client()), force=True)  # only rank 0 posts
    assert local.board.progress["step"] == 5

    mine = rank_report(tel, "gw-parts", 0, 5, 2, [torch.ones(3)])
    assert {k: mine[k] for k in ("rank", "steps", "skipped_steps", "mean_step_seconds")} == {
        "rank": 0,
        "steps": 5,
        "skipped_steps": 2,
        "mean_step_seconds": None,  # no step recorded
    }
    assert ("param_sum" in mine) == reports_for_tests() and mine.get("param_sum", 3.0) == 3.0
    outcome = {"steps": 5, "train_loss": 0.4, "val_loss": 0.5, "val_accuracy": 0.9, "rollbacks": 1}
    posted = []
    progress.finish(tel, outcome, mine, error=None, post_progress=lambda: posted.append("progress"))
    progress.finish(tel, outcome, mine, error="too late", post_progress=lambda: posted.append("again"))
    assert posted == ["progress"] and local.board.final == outcome and local.board.ranks[0] == mine
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["state"] == "succeeded" and result["steps"] == 5 and result["error"] is None
