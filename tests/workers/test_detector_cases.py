"""Each failure the detectors were built for, replayed through them: the right kind within its goal delay,
and each false alarm once fixed kept fixed. The curves are bench/corpus.py's families (the bench measures
them on many seeds), a real run's quoted numbers, and the public training logs of bench/data/real: each
sick one caught by its detector within its delay, each healthy one raising nothing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.corpus import HEALTHY, UNHEALTHY, Curve, RealLog, real_logs
from gradwatch.spec_telemetry import DetectorSpec
from workers.detectors import DynamicsMonitor
from workers.replay import ReplayResult, replay_rows

SEEDS = range(3)


def replay(curve: Curve, *, max_steps: int | None | bool = True) -> ReplayResult:
    """Replay a curve as `gradwatch replay` does; `max_steps=True` passes the curve's own planned length."""
    steps = curve.max_steps if max_steps is True else (max_steps or None)
    rows = ((f"{curve.family}:{curve.seed}", row) for row in curve.rows)
    return replay_rows(rows, warmup_steps=curve.warmup_steps, max_steps=steps)


def caught(curve: Curve, kind: str, within: int, **kw) -> ReplayResult:
    result = replay(curve, **kw)
    assert kind in result.anomalies, (result.anomalies, result.phases[-3:])
    assert curve.onset is not None and curve.onset <= result.anomalies[kind] <= curve.onset + within, (
        result.anomalies,
        curve.onset,
    )
    early = {k: s for k, s in result.anomalies.items() if s < curve.onset}
    assert early == {}
    return result


def changes(result: ReplayResult) -> int:
    return len(result.phases) - 1


# ---------------------------------------------------------------- a dead run
@pytest.mark.parametrize("seed", SEEDS)
def test_a_loss_bit_identical_from_some_step_on_is_a_dead_run_and_stalled(seed):
    result = caught(UNHEALTHY["dead_run"](seed), "dead_run", DetectorSpec().dead_run_steps + 10)
    assert result.phases[-1][0] == "stalled"


def test_every_gradient_exactly_zero_is_a_dead_run():
    monitor = DynamicsMonitor()
    rng = np.random.default_rng(0)
    for step in range(1, 200):
        monitor.observe_step(step, 2.0 + 0.05 * rng.standard_normal(), grad_norm=0.0 if step > 100 else 1.0)
    assert monitor.anomalies_raised.get("dead_run", 0) == 101 + DetectorSpec().dead_run_steps


def test_a_loss_of_exactly_zero_is_a_perfect_fit_not_a_dead_run():
    monitor = DynamicsMonitor()
    for step in range(1, 300):
        monitor.observe_step(step, 0.0 if step > 50 else 1.0 / step)
    assert "dead_run" not in monitor.anomalies_raised


# ---------------------------------------------------------------- a learning-rate schedule that ends early
@pytest.mark.parametrize("seed", SEEDS)
def test_a_logged_lr_at_zero_mid_run_is_a_schedule_bug_not_converged(seed):
    result = caught(UNHEALTHY["lr_drops_to_zero"](seed), "lr_schedule", DetectorSpec().lr_schedule_steps + 10)
    assert result.phases[-1][0] != "converged"


def test_an_lr_at_zero_is_a_bug_even_when_the_run_length_is_unknown():
    caught(UNHEALTHY["lr_drops_to_zero"](0), "lr_schedule", DetectorSpec().lr_schedule_steps + 10, max_steps=None)


@pytest.mark.parametrize("family", ["warmup_cosine", "linear_decay_to_zero"])
def test_a_schedule_that_reaches_zero_at_its_planned_end_is_not_a_bug(family):
    for seed in SEEDS:
        curve = HEALTHY[family](seed)
        assert "lr_schedule" not in replay(curve, max_steps=len(curve.rows)).anomalies


# ---------------------------------------------------------------- a creeping divergence
@pytest.mark.parametrize("seed", SEEDS)
def test_a_loss_creeping_up_30_to_60_percent_over_3000_steps_is_a_divergence(seed):
    caught(UNHEALTHY["creeping_divergence"](seed), "divergence", 3000)


def test_a_sustained_rise_of_a_fifth_is_caught_on_a_clean_curve():
    rng = np.random.default_rng(3)
    t = np.arange(1, 4001, dtype=float)
    loss = (0.5 + 1.5 * (1 + t / 30) ** -0.6) * np.where(t > 1500, 1 + 0.2 * np.clip((t - 1500) / 1500, 0, 1), 1.0)
    monitor = DynamicsMonitor(max_steps=4000)
    for step, value in zip(t, loss * (1 + 0.02 * rng.standard_normal(len(t))), strict=True):
        monitor.observe_step(int(step), float(value))
    assert 1500 < monitor.anomalies_raised["divergence"] <= 3500


def test_a_rise_too_small_for_trend_rise_is_caught_by_its_length_since_the_best_level():
    """The seeds of the creeping family whose loss ends only 3-5 % above its best (the power law still falls
    under the creep): the whole window since the best rises, so the rise's length, not its size, says it."""
    for seed in (31, 72, 80, 83):
        curve = UNHEALTHY["creeping_divergence"](seed)
        result = caught(curve, "divergence", 4500)
        crept = next(e for e in result.events if e.name == "divergence" and e.raised)
        assert "kept rising since it was there" in crept.detail, crept.detail


def test_a_loss_that_wanders_at_its_floor_is_not_a_creeping_divergence():
    """A long flat tail with slow wander (an AR(1) level, no trend) never rises over the whole window."""
    rng = np.random.default_rng(5)
    monitor = DynamicsMonitor(max_steps=8000)
    level = 0.0
    for step in range(1, 8001):
        level = 0.999 * level + 0.001 * rng.standard_normal()
        trend = 1.0 + 2.0 * math.exp(-step / 300)
        monitor.observe_step(step, trend * math.exp(level) * (1 + 0.03 * rng.standard_normal()))
    assert "divergence" not in monitor.anomalies_raised


# ---------------------------------------------------------------- a growing gradient norm
@pytest.mark.parametrize("seed", SEEDS)
def test_a_grad_norm_growing_100x_warns_first_then_is_exploding(seed):
    result = caught(UNHEALTHY["grad_norm_growth_100x"](seed), "grad_norm_growth", 700)
    assert result.anomalies["grad_norm_growth"] < result.anomalies["exploding_gradients"]  # lead time
    assert "divergence" not in result.anomalies  # the loss still looks fine


def test_healthy_noisy_grad_norms_raise_nothing():
    for seed in range(5):
        result = replay(HEALTHY["healthy_grad_norms"](seed))
        assert not {"grad_norm_growth", "exploding_gradients"} & set(result.anomalies), result.anomalies


# ---------------------------------------------------------------- overfitting on few evaluations
def test_a_fine_tune_whose_eval_loss_rises_over_5_evaluations_is_overfitting():
    """The real fine-tune: eval loss 0.31 -> 0.47 over 5 evaluations while the train loss falls to 2e-4."""
    monitor = DynamicsMonitor(max_steps=1000)
    evals = dict(zip((200, 400, 600, 800, 1000), (0.31, 0.33, 0.36, 0.41, 0.47), strict=True))
    for step in range(1, 1001):
        monitor.observe_step(step, 0.7 * math.exp(-step / 80) + 2e-4)
        if step in evals:
            monitor.observe_validation(step, evals[step])
    assert 600 <= monitor.anomalies_raised["overfitting"] <= 1000


@pytest.mark.parametrize("seed", SEEDS)
def test_overfitting_with_sparse_evaluations_is_caught_within_three_of_them(seed):
    caught(UNHEALTHY["finetune_overfit_few_evals"](seed), "overfitting", 2 * 400)


def test_an_eval_loss_that_creeps_up_1_percent_at_each_of_four_evaluations_is_overfitting():
    """The continued pre-training log (cpt_summaries.csv) in miniature: 10 evaluations, the eval loss at its
    best at the sixth, then 4 small rises (+1.3 % in all, under overfit_min_rise) while the train loss falls."""
    evals = (0.660, 0.555, 0.519, 0.494, 0.489, 0.4853, 0.4873, 0.4906, 0.4907, 0.4917)
    monitor = DynamicsMonitor(max_steps=5490)
    for step in range(1, 5491):
        monitor.observe_step(step, 0.25 + 1.0 * math.exp(-step / 1000))
        if step % 549 == 0:
            monitor.observe_validation(step, evals[step // 549 - 1])
    assert monitor.anomalies_raised.get("overfitting") == 5490
    # the same four rises, smaller than a hundredth of what the evaluations had learned: no alarm
    tiny = (*evals[:6], *(0.4853 + 0.00002 * k for k in (1, 2, 3, 4)))
    quiet = DynamicsMonitor(max_steps=5490)
    for step in range(1, 5491):
        quiet.observe_step(step, 0.25 + 1.0 * math.exp(-step / 1000))
        if step % 549 == 0:
            quiet.observe_validation(step, tiny[step // 549 - 1])
    assert "overfitting" not in quiet.anomalies_raised


def test_a_run_with_many_evaluations_to_come_does_not_judge_overfitting_on_its_first_few():
    """A healthy trainer run evaluated every 20 of 600 steps: its eval loss jumps 0.023 -> 0.029 -> 0.037 at
    the 5th-7th evaluations and comes back. With 30 evaluations planned the noise is measured first (8), so
    it is no alarm; the same evaluations in a run that ends after them are a fine-tune's few: overfitting."""
    evals = (0.0322, 0.0342, 0.0324, 0.0228, 0.0242, 0.0289, 0.0366, 0.0384, 0.0474, 0.0281, 0.0239, 0.0254)
    evals = (*evals, *(0.0231 + 0.0005 * math.sin(k) for k in range(18)))

    def run(max_steps: int) -> DynamicsMonitor:
        monitor = DynamicsMonitor(max_steps=max_steps)
        for step in range(1, max_steps + 1):
            monitor.observe_step(step, 0.004 + 0.2 * math.exp(-step / 30))
            if step % 20 == 0:
                monitor.observe_validation(step, evals[step // 20 - 1])
        return monitor

    assert "overfitting" not in run(600).anomalies_raised
    assert run(140).anomalies_raised.get("overfitting") == 120


def test_a_few_evaluations_that_wobble_are_not_overfitting():
    for seed in range(10):
        assert "overfitting" not in replay(HEALTHY["finetune_few_evals"](seed)).anomalies


# ---------------------------------------------------------------- a sparse log: time in steps, not rows
@pytest.mark.parametrize("max_steps", [True, False])
def test_a_stalled_language_model_logged_every_50_steps_is_stalled_not_converged(max_steps):
    curve = UNHEALTHY["sparse_stalled_lm"](0)
    result = caught(curve, "plateau", 1500, max_steps=max_steps)
    assert "converged" not in dict(result.phases)


def test_the_same_curve_logged_every_1_or_every_10_steps_gets_the_same_verdict():
    dense = UNHEALTHY["flat_from_start"](0)
    sparse = Curve(dense.family, 0, [row for row in dense.rows if row["step"] % 10 == 0], dense.onset)
    at_dense, at_sparse = replay(dense).anomalies["plateau"], replay(sparse).anomalies["plateau"]
    assert abs(at_dense - at_sparse) <= 100, (at_dense, at_sparse)


def test_a_stall_is_not_judged_before_a_share_of_a_long_run():
    curve = UNHEALTHY["flat_from_start"](0)
    early = replay(curve, max_steps=20_000).anomalies
    assert "plateau" not in early  # 2000 steps are a tenth of a 20k-step run
    assert replay(curve, max_steps=2000).anomalies["plateau"] >= 200


# ---------------------------------------------------------------- converged too early, flapping
@pytest.mark.parametrize("seed", SEEDS)
def test_a_long_gpt_like_run_that_keeps_falling_is_not_converged_early_and_does_not_flap(seed):
    curve = HEALTHY["gpt_long"](seed)
    result = replay(curve)
    converged = [s for p, s in result.phases if p == "converged"]
    assert not converged or converged[0] > 0.5 * len(curve.rows) * 10, result.phases
    assert changes(result) <= 4, result.phases
    assert result.anomalies == {}


@pytest.mark.parametrize("family", ["power_law_5pct", "warm_restarts", "fine_tuning", "plateau_then_descent"])
def test_healthy_curves_change_phase_only_a_handful_of_times(family):
    for seed in SEEDS:
        assert changes(replay(HEALTHY[family](seed))) <= 6


def test_a_run_that_never_learned_is_stalled_not_converged():
    result = replay(UNHEALTHY["flat_from_start"](1))
    assert "converged" not in dict(result.phases) and "stalled" in dict(result.phases)


# ---------------------------------------------------------------- a bounded oscillation
def test_a_bounded_gan_like_oscillation_is_neither_divergence_nor_plateau():
    for seed in range(20):
        result = replay(HEALTHY["gan_oscillation"](seed))
        assert not {"divergence", "plateau"} & set(result.anomalies), (seed, result.anomalies)
        assert changes(result) <= 10, (seed, result.phases)


# ---------------------------------------------------------------- dead layers, a divergence that stays
@pytest.mark.parametrize("seed", SEEDS)
def test_layers_whose_gradient_went_to_exactly_zero_are_named_vanishing(seed):
    curve = UNHEALTHY["dead_layers"](seed)
    result = caught(curve, "vanishing_gradients", DetectorSpec().dead_layer_steps + 20)
    detail = next(e.detail for e in result.events if e.name == "vanishing_gradients" and e.raised)
    assert "dead" in detail and "layer0" in detail
    assert result.phases[-1][0] == "stalled"  # collapsed is not converged


def test_a_layer_frozen_from_the_start_is_not_a_dead_layer():
    for seed in SEEDS:
        assert "vanishing_gradients" not in replay(HEALTHY["frozen_layer"](seed)).anomalies


def test_a_divergence_that_stays_high_is_raised_once_and_not_cleared():
    monitor = DynamicsMonitor()
    rng = np.random.default_rng(0)
    for step in range(1, 3001):
        level = 2.3 * math.exp(-step / 100) + 0.1 if step < 1000 else 2.3 * 1.2  # then stuck above its start
        monitor.observe_step(step, level * (1 + 0.03 * rng.standard_normal()))
    assert monitor.raise_counts.get("divergence") == 1 and monitor.anomalies["divergence"]
    assert monitor.phase == "diverging"


# ---------------------------------------------------------------- recurring spikes, mixed precision
@pytest.mark.parametrize("seed", SEEDS)
def test_spikes_that_recur_and_grow_are_a_divergence(seed):
    caught(UNHEALTHY["recurring_growing_spikes"](seed), "divergence", 700)


@pytest.mark.parametrize("seed", SEEDS)
def test_gradscaler_isolated_skips_are_counted_not_alarmed(seed):
    curve = HEALTHY["amp_isolated_skips"](seed)
    monitor = DynamicsMonitor(max_steps=curve.max_steps)
    for row in curve.rows:
        monitor.observe_step(row["step"], row["loss"], grad_norm=row.get("grad_norm"))
    assert monitor.anomalies_raised == {}
    assert monitor.skipped_steps >= 2  # past warm-up, each scale growth's skip


@pytest.mark.parametrize("seed", SEEDS)
def test_frequent_skipped_steps_are_a_nonfinite_alarm(seed):
    caught(UNHEALTHY["frequent_amp_skips"](seed), "nonfinite", 80 * DetectorSpec().nonfinite_skips)


# ---------------------------------------------------------------- checkpoints
def test_new_detectors_survive_a_checkpoint_on_a_sparse_log():
    curve = UNHEALTHY["sparse_stalled_lm"](0)
    half = len(curve.rows) // 2
    whole = replay(curve)
    first = DynamicsMonitor(max_steps=curve.max_steps)
    for row in curve.rows[:half]:
        first.observe_step(row["step"], row["loss"])
    resumed = DynamicsMonitor(max_steps=curve.max_steps)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.stride == 50
    for row in curve.rows[half:]:
        resumed.observe_step(row["step"], row["loss"])
    assert resumed.anomalies_raised == whole.anomalies
    assert resumed.phases_entered == whole.phases


# ---------------------------------------------------------------- public training logs (bench/data/real)
REAL = real_logs()


@pytest.mark.parametrize("log", [r for r in REAL if r.curve.onset is None], ids=lambda r: r.file)
def test_a_healthy_public_log_raises_nothing(log: RealLog):
    result = replay(log.curve)
    assert result.anomalies == {}, result.anomalies
    assert "diverging" not in dict(result.phases) and "stalled" not in dict(result.phases), result.phases


@pytest.mark.parametrize("log", [r for r in REAL if r.curve.onset is not None], ids=lambda r: r.file)
def test_a_sick_public_log_is_caught_within_its_delay(log: RealLog):
    assert log.kind is not None and log.within is not None
    caught(log.curve, log.kind, log.within)


def test_both_losses_worse_than_at_the_start_during_warm_up_is_a_divergence():
    """The Whisper fine-tune at a hundred times its learning rate (whisper_small_braj.csv): its train loss
    is logged first at step 500, in the middle of a 1000-step warm-up, so the train rules cannot judge it;
    the eval loss 2.55, then 3.2-4.5, and the train loss 1.24 -> 2.03 say it by step 1056."""
    log = next(r for r in REAL if r.file == "whisper_small_braj.csv")
    result = caught(log.curve, "divergence", 1000)
    worse = next(e for e in result.events if e.name == "divergence" and e.raised)
    assert "worse than at its start on both" in worse.detail and worse.step < 1000 + 500  # before warm-up's end
    # a run whose losses rise after a restart but stay below where they began is not diverging
    for seed in range(5):
        assert "divergence" not in replay(HEALTHY["warm_restarts"](seed)).anomalies


def test_the_japanese_whisper_fine_tune_is_overfitting_at_its_third_evaluation_not_a_dead_run():
    """Eval loss 0.321, 0.358, 0.394 at steps 1000-3000; the train loss logged to 4 decimals sits at
    0.0002-0.0004 for thousands of steps: rounding, not a dead run, and its 0.0001 steps no spikes."""
    log = next(r for r in REAL if r.file == "whisper_large_v2_japanese.csv")
    result = replay(log.curve)
    assert result.anomalies == {"overfitting": 3000}
    assert "stalled" not in dict(result.phases)


def test_a_schedule_decaying_linearly_to_zero_at_its_planned_end_is_not_an_lr_bug():
    for file in ("distilbert_lora_imdb.csv", "lora_finetune_250.csv", "bert_weibo_rumor.csv"):
        log = next(r for r in REAL if r.file == file)
        lrs = [row["lr"] for row in log.curve.rows if "lr" in row]
        assert lrs[-1] < 0.05 * max(lrs)  # it did reach about 0
        for max_steps in (True, False):
            assert "lr_schedule" not in replay(log.curve, max_steps=max_steps).anomalies, (file, max_steps)


def test_a_rounded_loss_repeating_is_not_a_dead_run_but_a_precise_one_is():
    monitor = DynamicsMonitor()
    for step in range(1, 200):
        monitor.observe_step(step, 0.0003)  # 4 decimals: 1 significant digit
    assert "dead_run" not in monitor.anomalies_raised
    monitor = DynamicsMonitor()
    for step in range(1, 200):
        monitor.observe_step(step, 2.302585092994046 if step > 20 else 3.0 - step / 20)
    assert "dead_run" in monitor.anomalies_raised


def test_a_few_rounding_steps_in_a_rounded_log_are_not_a_spike_but_a_real_jump_is():
    rng = np.random.default_rng(0)
    quiet = DynamicsMonitor()
    for step in range(1, 400):
        quiet.observe_step(step, float(rng.choice([0.0002, 0.0003])) if step != 300 else 0.0008)
    assert "loss_spike" not in quiet.anomalies_raised
    loud = DynamicsMonitor()
    for step in range(1, 400):
        loud.observe_step(step, float(rng.choice([0.0002, 0.0003])) if step != 300 else 0.01)
    assert loud.anomalies_raised.get("loss_spike") == 300
