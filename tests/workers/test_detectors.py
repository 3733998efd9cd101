"""The online detectors on synthetic training curves: what a healthy run and each failure look like."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gradwatch.names import ANOMALIES, PHASES
from gradwatch.spec_telemetry import DetectorSpec, TelemetrySpec
from workers.detectors import (
    DynamicsMonitor,
    Event,
    GradientDetector,
    Latch,
    LossTracker,
    SpikeDetector,
)

INITIAL = 2.3  # cross-entropy of a 10-class guess


def decaying_losses(n: int = 1500, seed: int = 0, tau: float = 100.0, floor: float = 0.05,
                    noise: float = 0.03) -> np.ndarray:
    """A healthy run: exponential decay to a small floor with multiplicative batch noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    return INITIAL * (floor + (1 - floor) * np.exp(-t / tau)) * (1 + noise * rng.standard_normal(n))


def feed(monitor: DynamicsMonitor, losses, start: int = 0) -> None:
    for i, loss in enumerate(losses):
        monitor.observe_step(start + i, float(loss))


def phase_names(monitor: DynamicsMonitor) -> list[str]:
    return [phase for phase, _ in monitor.phases_entered]


# ---------------------------------------------------------------- healthy run
@pytest.mark.parametrize("seed", range(5))
def test_healthy_decay_goes_warmup_rapid_refinement_converged_without_anomalies(seed):
    monitor = DynamicsMonitor()
    feed(monitor, decaying_losses(seed=seed))

    assert phase_names(monitor) == ["warmup", "rapid_learning", "refinement", "converged"]
    spec = DetectorSpec()
    assert spec.warmup_steps <= monitor.phases_entered[1][1] < spec.warmup_steps + spec.phase_patience
    assert monitor.phase == "converged"
    assert monitor.anomalies_raised == {}
    assert monitor.anomalies == dict.fromkeys(ANOMALIES, False)
    assert monitor.loss_ema == pytest.approx(0.05 * INITIAL, rel=0.1)


def test_events_report_each_change_once():
    monitor = DynamicsMonitor()
    losses = decaying_losses()
    feed(monitor, losses[:300])
    events = monitor.events()

    assert [(e.kind, e.name, e.step) for e in events] == [("phase", p, s) for p, s in monitor.phases_entered]
    assert all(isinstance(e, Event) and e.raised and e.detail for e in events)
    assert monitor.events() == []  # drained
    monitor.observe_step(300, float(losses[300]))
    assert monitor.events() == []  # nothing changed


def test_a_run_that_never_learns_much_is_stalled_with_a_plateau():
    rng = np.random.default_rng(1)
    monitor = DynamicsMonitor()
    feed(monitor, INITIAL * (1 + 0.03 * rng.standard_normal(400)))

    assert monitor.phase == "stalled"
    assert monitor.anomalies["plateau"]
    assert monitor.anomalies_raised["plateau"] >= DetectorSpec().plateau_window
    assert "rapid_learning" not in phase_names(monitor)
    assert "converged" not in phase_names(monitor)
    raised = [e for e in monitor.events() if e.kind == "anomaly"]
    assert [(e.name, e.raised) for e in raised] == [("plateau", True)]
    assert "not converged" in raised[0].detail


def test_a_flat_loss_halfway_down_is_a_plateau_unless_it_reached_converged_loss():
    t = np.arange(800)
    losses = INITIAL * (0.3 + 0.7 * np.exp(-t / 50))  # settles at 30% of where it started

    monitor = DynamicsMonitor()
    feed(monitor, losses)
    assert monitor.phase == "refinement"  # learned something, so not stalled; not low, so not converged
    assert monitor.anomalies["plateau"]

    monitor = DynamicsMonitor(DetectorSpec(converged_loss=0.8))
    feed(monitor, losses)
    assert monitor.phase == "converged"
    assert not monitor.anomalies["plateau"]


# ---------------------------------------------------------------- spikes and divergence
def test_a_spike_is_raised_at_its_step_and_clears():
    losses = decaying_losses()[:600]
    losses[400] *= 10
    monitor = DynamicsMonitor()
    feed(monitor, losses[:401])

    assert monitor.anomalies["loss_spike"]
    assert monitor.anomalies_raised == {"loss_spike": 400}
    spike = [e for e in monitor.events() if e.kind == "anomaly"]
    assert len(spike) == 1 and spike[0].raised and "median" in spike[0].detail

    feed(monitor, losses[401:], start=401)
    assert not monitor.anomalies["loss_spike"]
    cleared = [e for e in monitor.events() if e.kind == "anomaly"]
    assert [(e.name, e.raised, e.step) for e in cleared] == [("loss_spike", False, 410)]
    assert not monitor.anomalies["divergence"]


def test_one_huge_spike_is_not_a_divergence_and_barely_moves_the_ema():
    losses = decaying_losses()[:500]
    monitor = DynamicsMonitor()
    feed(monitor, losses[:400])
    ema = monitor.loss_ema
    monitor.observe_step(400, float(losses[400] * 50))

    assert monitor.anomalies["loss_spike"]
    assert not monitor.anomalies["divergence"]
    assert monitor.loss_ema < 1.2 * ema
    feed(monitor, losses[401:], start=401)
    assert set(monitor.anomalies_raised) == {"loss_spike"}
    assert monitor.phase == "refinement"


def test_a_lasting_jump_is_a_divergence_within_a_few_steps():
    losses = decaying_losses()[:400]
    monitor = DynamicsMonitor()
    feed(monitor, losses[:300])
    feed(monitor, losses[300:] * 10, start=300)
    assert monitor.anomalies_raised["loss_spike"] == 300
    assert 300 < monitor.anomalies_raised["divergence"] <= 305
    assert monitor.phase == "diverging"


def test_a_spike_during_warmup_is_not_reported():
    losses = decaying_losses()[:100]
    losses[15] *= 10
    monitor = DynamicsMonitor()
    feed(monitor, losses)
    assert "loss_spike" not in monitor.anomalies_raised


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("at", [3, 300])
def test_a_non_finite_loss_is_divergence_at_once_even_in_warmup(bad, at):
    losses = list(decaying_losses()[:at])
    monitor = DynamicsMonitor()
    feed(monitor, losses)
    ema_before = monitor.loss_ema
    monitor.observe_step(at, bad)

    assert monitor.anomalies["divergence"]
    assert monitor.anomalies_raised["divergence"] == at
    assert monitor.phase == "diverging"
    assert monitor.loss_ema == ema_before  # the EMA is not poisoned
    assert any(e.name == "divergence" and e.raised and str(bad) in e.detail for e in monitor.events())


def test_a_loss_that_blows_up_is_divergence_and_phase_diverging():
    losses = decaying_losses()[:300]
    t = np.arange(300)
    blow_up = losses[-1] * np.exp(t / 20.0)
    monitor = DynamicsMonitor()
    feed(monitor, losses)
    best = monitor.loss.best_ema
    for i, loss in enumerate(blow_up):
        monitor.observe_step(300 + i, float(loss))
        if monitor.loss_ema > 5 * best:
            break
    else:
        pytest.fail("the loss EMA never reached 5x its best")

    assert monitor.anomalies["divergence"]
    assert monitor.phase == "diverging"
    assert 300 < monitor.anomalies_raised["divergence"] < 300 + i
    assert phase_names(monitor)[-1] == "diverging"


def test_divergence_clears_and_the_phase_recovers_when_the_loss_comes_back():
    losses = decaying_losses()[:400]
    monitor = DynamicsMonitor()
    feed(monitor, losses[:300])
    monitor.observe_step(300, math.nan)
    feed(monitor, losses[301:], start=301)

    assert not monitor.anomalies["divergence"]
    assert monitor.phase != "diverging"
    assert [(e.name, e.raised) for e in monitor.events() if e.kind == "anomaly"] == [
        ("divergence", True), ("divergence", False)]


# ---------------------------------------------------------------- validation
def run_with_validation(val_curve, train=None, every: int = 50) -> DynamicsMonitor:
    train = decaying_losses(n=every * len(val_curve)) if train is None else train
    monitor = DynamicsMonitor()
    for step, loss in enumerate(train):
        monitor.observe_step(step, float(loss))
        if (step + 1) % every == 0:
            monitor.observe_validation(step, float(val_curve[step // every]))
    return monitor


def test_val_loss_rising_while_train_falls_is_overfitting():
    evals = np.arange(20)
    val = 0.5 + 0.01 * (evals - 8) ** 2  # U-shaped: lowest at the 9th evaluation
    monitor = run_with_validation(val)

    assert monitor.anomalies["overfitting"]
    # evaluations 9, 10, 11 rise: raised at the third, evaluation index 11 -> step 599
    assert monitor.anomalies_raised["overfitting"] == 11 * 50 + 49


def test_overfitting_clears_when_val_loss_comes_back():
    val = [1.0, 0.8, 0.6, 0.65, 0.7, 0.75, 0.8, 0.55, 0.5, 0.45, 0.4]
    monitor = run_with_validation(val)
    assert monitor.anomalies_raised["overfitting"] == 5 * 50 + 49  # 0.65, 0.7, 0.75 rose
    assert not monitor.anomalies["overfitting"]


def test_val_and_train_rising_together_is_not_overfitting():
    train = np.linspace(1.0, 1.5, 1000)
    val = np.linspace(1.0, 1.5, 20)
    monitor = run_with_validation(val, train=train)
    assert not monitor.anomalies_raised.get("overfitting")


def test_noisy_val_loss_without_a_trend_is_not_overfitting():
    rng = np.random.default_rng(3)
    monitor = run_with_validation(0.5 + 0.01 * rng.standard_normal(30))
    assert "overfitting" not in monitor.anomalies_raised


# ---------------------------------------------------------------- gradients
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


def test_tiny_update_ratios_vanish_but_a_layer_that_took_no_step_does_not():
    assert observe_gradients_after_warmup(1.0, HEALTHY_NORMS, {**HEALTHY_RATIOS, "fc1": 1e-9}).anomalies[
        "vanishing_gradients"]
    assert not observe_gradients_after_warmup(1.0, HEALTHY_NORMS, {**HEALTHY_RATIOS, "fc1": 0.0}).anomalies[
        "vanishing_gradients"]


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


def test_gradient_anomalies_wait_for_warmup_except_non_finite_ones():
    monitor = DynamicsMonitor()
    monitor.observe_gradients(0, 5e4, HEALTHY_NORMS)
    monitor.observe_gradients(1, 0.5, sigmoid_mlp_norms())
    assert monitor.anomalies_raised == {}
    monitor.observe_gradients(2, math.inf, {**HEALTHY_NORMS, "fc2": math.inf})
    assert monitor.anomalies_raised == {"exploding_gradients": 2}


def test_gradient_anomalies_clear_after_healthy_observations():
    monitor = observe_gradients_after_warmup(5e4, HEALTHY_NORMS)
    monitor.observe_gradients(35, 1.0, HEALTHY_NORMS)
    assert monitor.anomalies["exploding_gradients"]  # 5 steps is not yet anomaly_clear_steps
    monitor.observe_gradients(40, 1.0, HEALTHY_NORMS)
    assert not monitor.anomalies["exploding_gradients"]


def test_gradient_detector_alone():
    vanishing, exploding = GradientDetector(DetectorSpec()).update(1.0, HEALTHY_NORMS, HEALTHY_RATIOS)
    assert not vanishing.holds and not exploding.holds


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
    assert spikes.update(1.5).holds


def test_spec_rejects_inconsistent_thresholds():
    with pytest.raises(ValidationError, match="converged_fraction"):
        DetectorSpec(converged_fraction=0.6, stalled_fraction=0.5)
    with pytest.raises(ValidationError, match="extra"):
        DetectorSpec(spike_sigma=3)
    assert TelemetrySpec(detectors={"phase_patience": 5}).detectors.phase_patience == 5


# ---------------------------------------------------------------- never raises
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
small_specs = st.builds(DetectorSpec, warmup_steps=st.integers(0, 5), spike_window=st.integers(8, 16),
                        plateau_window=st.integers(4, 12), phase_window=st.integers(2, 6),
                        phase_patience=st.integers(1, 3), anomaly_clear_steps=st.integers(0, 3),
                        ema_alpha=st.floats(0.01, 1.0))


@settings(max_examples=150, deadline=None)
@given(spec=small_specs, losses=st.lists(floats, max_size=60), val=st.lists(floats, max_size=10),
       grads=st.lists(st.tuples(floats, st.dictionaries(st.sampled_from("abc"), floats),
                                st.dictionaries(st.sampled_from("abc"), floats)), max_size=5))
def test_the_monitor_never_raises_on_any_floats(spec, losses, val, grads):
    monitor = DynamicsMonitor(spec)
    for step, loss in enumerate(losses):
        monitor.observe_step(step, loss)
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
