"""The online detectors: each healthy curve family stays silent, each failure is caught in time.

The curve families are bench/corpus.py's (the ones bench/detector_quality.py measures with 100 seeds
each); here a few seeds of each pin the behaviour, replayed through `workers.replay` as
`gradwatch replay` does.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.corpus import HEALTHY, MEANT_FOR, UNHEALTHY, Curve
from gradwatch.names import ANOMALIES, PHASES
from gradwatch.spec_telemetry import DetectorSpec, TelemetrySpec
from workers.detectors import (
    DynamicsMonitor,
    GradientDetector,
    Latch,
    LossTracker,
    SpikeDetector,
)
from workers.replay import replay_rows

INITIAL = 2.3  # cross-entropy of a 10-class guess
SEEDS = range(3)
# The most steps after its onset each failure may take to be caught (the bench's p90 with room).
MAX_DELAY = {
    "slow_exponential_divergence": 250,
    "linear_divergence": 300,
    "persistent_3x_jump": 10,
    "one_step_2x_spike": 0,
    "one_nan": 0,
    "persistent_nan": DetectorSpec().nonfinite_steps,
    "validation_turns_up": 350,
    "flat_from_start": 300,
    "lr_far_too_high": 120,
    "lr_far_too_low": 60,
    "dead_run": 60,
    "lr_drops_to_zero": 30,
    "creeping_divergence": 3000,
    "grad_norm_growth_100x": 600,
    "finetune_overfit_few_evals": 800,
    "sparse_stalled_lm": 1200,
    "recurring_growing_spikes": 700,
    "frequent_amp_skips": 400,
    "dead_layers": 60,
}


def decaying_losses(
    n: int = 1500, seed: int = 0, tau: float = 100.0, floor: float = 0.05, noise: float = 0.03
) -> np.ndarray:
    """A healthy run: exponential decay to a small floor with multiplicative batch noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return INITIAL * (floor + (1 - floor) * np.exp(-t / tau)) * (1 + noise * rng.standard_normal(n))


def feed(monitor: DynamicsMonitor, losses, start: int = 0) -> None:
    for i, loss in enumerate(losses):
        monitor.observe_step(start + i, float(loss))


def replay(curve: Curve):
    rows = ((f"{curve.family}:{curve.seed}", row) for row in curve.rows)
    return replay_rows(rows, warmup_steps=curve.warmup_steps, max_steps=curve.max_steps)


# ---------------------------------------------------------------- the corpus
@pytest.mark.parametrize("family", sorted(HEALTHY))
@pytest.mark.parametrize("seed", SEEDS)
def test_a_healthy_run_raises_nothing(family, seed):
    result = replay(HEALTHY[family](seed))
    assert result.anomalies == {}, [e.detail for e in result.events if e.kind == "anomaly"]
    assert "stalled" not in dict(result.phases) and "diverging" not in dict(result.phases)


@pytest.mark.parametrize("family", sorted(UNHEALTHY))
@pytest.mark.parametrize("seed", SEEDS)
def test_a_broken_run_is_caught_by_its_detector_after_its_onset(family, seed):
    curve = UNHEALTHY[family](seed)
    result = replay(curve)
    kind, _ = MEANT_FOR[family]
    assert kind in result.anomalies, result.anomalies
    assert curve.onset <= result.anomalies[kind] <= curve.onset + MAX_DELAY[family]
    early = {k: s for k, s in result.anomalies.items() if s < curve.onset}
    assert early == {}


def test_one_skipped_nan_is_a_nonfinite_event_not_a_divergence():
    result = replay(UNHEALTHY["one_nan"](0))
    assert set(result.anomalies) == {"nonfinite"}
    assert "diverging" not in dict(result.phases)


def test_a_loss_that_rises_above_its_start_and_stays_is_diverging_not_refinement():
    result = replay(UNHEALTHY["lr_far_too_high"](0))
    assert "divergence" in result.anomalies
    assert "diverging" in dict(result.phases)
    assert dict(result.phases).get("refinement", math.inf) > result.anomalies["divergence"]


def test_a_learning_rate_far_too_low_is_named_and_not_vanishing_gradients():
    result = replay(UNHEALTHY["lr_far_too_low"](0))
    assert "lr_too_low" in result.anomalies and "vanishing_gradients" not in result.anomalies


@pytest.mark.parametrize("family", ["fine_tuning", "finetune_few_evals"])
def test_runs_that_flatten_far_above_a_tenth_of_their_start_converge(family):
    curve = HEALTHY[family](1)
    result = replay(curve)
    assert result.phases[-1][0] == "converged"
    assert curve.rows[-1]["loss"] > 0.1 * curve.rows[0]["loss"]


def test_a_language_model_still_falling_at_its_end_is_not_converged():
    curve = HEALTHY["llm_constant_lr"](1)
    losses = [row["loss"] for row in curve.rows]
    assert sum(losses[-250:]) < 0.985 * sum(losses[875:1125])  # still falling over the last half, by 2 % or so
    assert replay(curve).phases[-1][0] == "refinement"


def test_the_warmup_phase_lasts_while_the_schedule_warms_up():
    curve = HEALTHY["warmup_cosine"](0)
    peak = max(range(len(curve.rows)), key=lambda i: curve.rows[i]["lr"])
    without_spec_warmup = replay(Curve(curve.family, 0, curve.rows))  # the lr column alone tells
    assert without_spec_warmup.phases[0] == ("warmup", 1)
    assert without_spec_warmup.phases[1][1] > peak


def test_detector_state_survives_a_checkpoint():
    rows = UNHEALTHY["slow_exponential_divergence"](0).rows
    whole = replay_rows(("x", r) for r in rows)
    first = DynamicsMonitor()
    half = len(rows) // 2
    for row in rows[:half]:
        first.observe_step(row["step"], row["loss"])
        if "val_loss" in row:
            first.observe_validation(row["step"], row["val_loss"])
    import json

    resumed = DynamicsMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for row in rows[half:]:
        resumed.observe_step(row["step"], row["loss"])
        if "val_loss" in row:
            resumed.observe_validation(row["step"], row["val_loss"])
    assert resumed.anomalies_raised == whole.anomalies
    assert resumed.phases_entered == whole.phases


def test_events_report_each_change_once():
    monitor = DynamicsMonitor()
    losses = decaying_losses()
    feed(monitor, losses[:300])
    events = monitor.events()
    assert [(e.kind, e.name, e.step) for e in events] == [("phase", p, s) for p, s in monitor.phases_entered]
    assert monitor.events() == []  # drained
    monitor.observe_step(300, float(losses[300]))
    assert monitor.events() == []  # nothing changed


def test_a_spike_is_raised_at_its_step_and_clears():
    monitor = DynamicsMonitor()
    losses = decaying_losses()
    losses[400] *= 3.0
    feed(monitor, losses[:420])
    assert monitor.anomalies_raised == {"loss_spike": 400}
    assert not monitor.anomalies["loss_spike"]
    assert monitor.raise_counts == {"loss_spike": 1}


def test_a_blow_up_during_the_warmup_is_a_divergence_at_once():
    monitor = DynamicsMonitor(warmup_steps=500)
    feed(monitor, [2.3] * 20 + [2.3 * 100 * 2**i for i in range(12)])
    assert "divergence" in monitor.anomalies_raised
    assert monitor.anomalies_raised["divergence"] < 40


def sigmoid_mlp_norms(depth: int = 12) -> dict[str, float]:
    """Layer grad norms shaped like a deep sigmoid MLP's: each layer back loses a factor of ~6."""
    return {f"layers.{i}": 0.5 * 0.16 ** (depth - 1 - i) for i in range(depth)}


HEALTHY_NORMS = {"fc1": 0.42, "fc2": 0.31, "fc3": 0.55, "head": 0.9}
HEALTHY_RATIOS = {"fc1": 2e-3, "fc2": 3e-3, "fc3": 1.5e-3, "head": 4e-3}


def observe_gradients_after_warmup(grad_norm, norms, ratios=None) -> DynamicsMonitor:
    monitor = DynamicsMonitor()
    feed(monitor, decaying_losses()[:30])
    monitor.observe_gradients(30, grad_norm, norms, ratios or {})
    return monitor


def test_healthy_gradients_raise_nothing():
    monitor = observe_gradients_after_warmup(1.2, HEALTHY_NORMS, HEALTHY_RATIOS)
    assert not monitor.anomalies["vanishing_gradients"]
    assert not monitor.anomalies["exploding_gradients"]


def test_early_layers_of_a_deep_sigmoid_net_vanish():
    norms = sigmoid_mlp_norms()
    assert min(norms.values()) < 1e-9
    monitor = observe_gradients_after_warmup(0.5, norms)
    assert monitor.anomalies["vanishing_gradients"]
    event = [e for e in monitor.events() if e.name == "vanishing_gradients"][0]
    assert "layers.0" in event.detail


def test_layer_grads_far_below_the_largest_vanish_even_above_the_absolute_floor():
    monitor = observe_gradients_after_warmup(1.0, {"early": 5e-5, "late": 1.0})
    assert monitor.anomalies["vanishing_gradients"]
    assert "below 0.0001 of late" in monitor.events()[-1].detail


def test_tiny_update_ratios_with_healthy_gradients_are_a_learning_rate_too_low_not_vanishing():
    monitor = DynamicsMonitor()
    feed(monitor, decaying_losses()[:30])
    tiny = dict.fromkeys(HEALTHY_RATIOS, 1e-9)
    for step in (30, 40, 50):
        monitor.observe_gradients(step, 1.0, HEALTHY_NORMS, tiny)
    assert monitor.anomalies["lr_too_low"]
    assert not monitor.anomalies["vanishing_gradients"]
    assert "raise the learning rate" in monitor.events()[-1].detail


def test_a_layer_that_took_no_step_is_not_a_learning_rate_too_low():
    monitor = DynamicsMonitor()
    feed(monitor, decaying_losses()[:30])
    for step in (30, 40, 50):
        monitor.observe_gradients(step, 1.0, HEALTHY_NORMS, {**HEALTHY_RATIOS, "fc1": 0.0})
    assert monitor.anomalies_raised == {}


def test_no_gradient_anywhere_is_vanishing():
    monitor = observe_gradients_after_warmup(0.0, dict.fromkeys(HEALTHY_NORMS, 0.0))
    assert monitor.anomalies["vanishing_gradients"]


def test_real_deep_sigmoid_mlp_vanishes_and_a_relu_mlp_does_not():
    torch = pytest.importorskip("torch")
    from workers.gns import group_layers

    def layer_norms(model: torch.nn.Module) -> dict[str, float]:
        torch.manual_seed(0)
        x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        named = list(model.named_parameters())
        groups = group_layers([n for n, _ in named], 32)
        squares: dict[str, float] = {}
        for name, p in named:
            squares[groups[name]] = squares.get(groups[name], 0.0) + float(p.grad.pow(2).sum())
        return {g: math.sqrt(s) for g, s in squares.items()}

    def mlp(depth: int, activation) -> torch.nn.Module:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for i in range(depth):
            layers += [torch.nn.Linear(32 if i == 0 else 64, 64), activation()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(64, 10))

    deep = layer_norms(mlp(12, torch.nn.Sigmoid))
    healthy = layer_norms(mlp(3, torch.nn.ReLU))
    assert observe_gradients_after_warmup(1.0, deep).anomalies["vanishing_gradients"]
    assert not observe_gradients_after_warmup(1.0, healthy).anomalies["vanishing_gradients"]


def test_exploding_gradients_from_the_global_norm_or_a_layer_update_ratio():
    assert observe_gradients_after_warmup(5e4, HEALTHY_NORMS).anomalies["exploding_gradients"]
    big_step = observe_gradients_after_warmup(1.0, HEALTHY_NORMS, {**HEALTHY_RATIOS, "head": 2.0})
    assert big_step.anomalies["exploding_gradients"]
    assert "head" in big_step.events()[-1].detail


def test_gradient_anomalies_wait_for_warmup_and_a_non_finite_loss_is_a_nonfinite_event():
    monitor = DynamicsMonitor()
    monitor.observe_gradients(0, 5e4, HEALTHY_NORMS)
    monitor.observe_gradients(1, 0.5, sigmoid_mlp_norms())
    assert monitor.anomalies_raised == {}
    monitor.observe_step(2, 2.3, grad_norm=math.inf)  # a finite loss, a non-finite gradient: a loss scaler's skip
    assert monitor.anomalies_raised == {}
    monitor.observe_step(3, math.nan)
    assert monitor.anomalies_raised == {"nonfinite": 3}


def test_gradient_anomalies_clear_after_healthy_observations():
    monitor = observe_gradients_after_warmup(5e4, HEALTHY_NORMS)
    monitor.observe_gradients(35, 1.0, HEALTHY_NORMS)
    assert monitor.anomalies["exploding_gradients"]  # 5 steps is not yet anomaly_clear_steps
    monitor.observe_gradients(40, 1.0, HEALTHY_NORMS)
    assert not monitor.anomalies["exploding_gradients"]


def test_gradient_detector_alone():
    findings = GradientDetector(DetectorSpec()).update(1.0, HEALTHY_NORMS, HEALTHY_RATIOS)
    assert not any(f.holds for f in findings)


# ---------------------------------------------------------------- pieces
def test_latch_holds_until_the_condition_is_false_for_clear_steps():
    latch = Latch(clear_steps=3)
    assert latch.update(10, True) and latch.held
    assert not latch.update(11, False) and latch.held
    assert not latch.update(12, True)
    assert not latch.update(14, False) and latch.held
    assert latch.update(15, False) and not latch.held


def test_loss_tracker_ema_ignores_non_finite_losses():
    tracker = LossTracker(DetectorSpec(ema_alpha=0.5))
    assert tracker.ema is None
    for loss in (4.0, math.nan, 2.0):
        tracker.update(loss)
    assert tracker.ema == pytest.approx((0.5 * 4.0 * 0.5 + 0.5 * 2.0) / 0.75)  # bias-corrected
    assert tracker.initial == 3.0
    assert tracker.steps == 3


def test_spike_detector_on_a_flat_history_needs_a_real_jump():
    spikes = SpikeDetector(DetectorSpec())
    for _ in range(20):
        assert not spikes.update(1.0).holds
    assert not spikes.update(1.05).holds
    assert spikes.update(1.6).holds


def test_spec_rejects_inconsistent_thresholds():
    with pytest.raises(ValidationError, match="lr_too_low_update_ratio"):
        DetectorSpec(lr_too_low_update_ratio=0.6, exploding_update_ratio=0.5)
    with pytest.raises(ValidationError, match="extra"):
        DetectorSpec(spike_sigma=3)
    assert TelemetrySpec(detectors={"phase_patience": 5}).detectors.phase_patience == 5


# ---------------------------------------------------------------- never raises
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
small_specs = st.builds(
    DetectorSpec,
    warmup_steps=st.integers(0, 5),
    spike_window=st.integers(8, 16),
    plateau_window=st.integers(4, 12),
    phase_window=st.integers(2, 6),
    phase_patience=st.integers(1, 3),
    anomaly_clear_steps=st.integers(0, 3),
    divergence_patience=st.integers(1, 8),
    ema_alpha=st.floats(0.01, 1.0),
)


@settings(max_examples=150, deadline=None)
@given(
    spec=small_specs,
    losses=st.lists(floats, max_size=60),
    val=st.lists(floats, max_size=10),
    grads=st.lists(
        st.tuples(
            floats, st.dictionaries(st.sampled_from("abc"), floats), st.dictionaries(st.sampled_from("abc"), floats)
        ),
        max_size=5,
    ),
)
def test_the_monitor_never_raises_on_any_floats(spec, losses, val, grads):
    monitor = DynamicsMonitor(spec)
    for step, loss in enumerate(losses):
        monitor.observe_step(step, loss, lr=abs(loss) if step % 3 else None)
        if step < len(val):
            monitor.observe_validation(step, val[step])
        if step < len(grads):
            monitor.observe_gradients(step, *grads[step])
        assert monitor.phase in PHASES
    assert set(monitor.anomalies) == set(ANOMALIES)
    for event in monitor.events():
        assert event.kind in ("phase", "anomaly")
        assert event.name in PHASES + ANOMALIES
    assert monitor.loss_ema is None or math.isfinite(monitor.loss_ema)
