"""Gradient noise scale against a known answer, and the grouping of parameters into layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.gns import OTHER_GROUP, GradientNoiseScale, group_layers, noise_scale_estimates

DIM = 32
BATCH_SMALL = 16
WORLD = 4


def gradient_problem(seed: int = 0, noise_trace: float = 64.0):
    """A true gradient G with |G|^2 = 1 and per-example noise of covariance Sigma with tr(Sigma) given,
    so B_simple = tr(Sigma) / |G|^2 = noise_trace."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(DIM)
    g /= np.linalg.norm(g)
    a = rng.standard_normal((DIM, DIM)) * np.linspace(0.2, 2.0, DIM)  # correlated, uneven noise
    a *= math.sqrt(noise_trace / np.trace(a @ a.T))
    return rng, g, a


def ddp_norms(rng, g, a, steps: int, world: int = WORLD, batch: int = BATCH_SMALL):
    """What DDP sees each step: per-example gradients G + A z averaged per rank (the local gradients),
    then averaged over ranks (the all-reduce). Returns (mean over ranks of |local|^2, |global|^2)."""
    examples = g + rng.standard_normal((steps, world, batch, DIM)) @ a.T
    local = examples.mean(axis=2)
    local_sq_mean = (local**2).sum(axis=-1).mean(axis=1)
    global_sq = (local.mean(axis=1) ** 2).sum(axis=-1)
    return local_sq_mean, global_sq


def test_single_step_estimates_are_unbiased():
    rng, g, a = gradient_problem()
    local_sq, global_sq = ddp_norms(rng, g, a, steps=20_000)
    grad_sq, trace = noise_scale_estimates(local_sq, global_sq, BATCH_SMALL, WORLD * BATCH_SMALL)
    assert grad_sq.mean() == pytest.approx(1.0, rel=0.1)
    assert trace.mean() == pytest.approx(64.0, rel=0.05)
    assert (grad_sq < 0).any()  # one step alone is noisy enough to go negative: hence the EMAs


# the estimate gets noisier as B_simple grows past the global batch (64 here): a slower EMA then
@pytest.mark.parametrize("seed, noise_trace", [(0, 64.0), (1, 16.0), (2, 128.0)])
def test_smoothed_noise_scale_converges_to_the_true_one(seed, noise_trace):
    rng, g, a = gradient_problem(seed, noise_trace)
    gns = GradientNoiseScale(ema_decay=0.995)
    for local_sq, global_sq in zip(*ddp_norms(rng, g, a, steps=3000), strict=True):
        value = gns.update(float(local_sq), float(global_sq), BATCH_SMALL, WORLD)

    assert value == gns.value
    assert gns.value == pytest.approx(noise_trace, rel=0.15)
    assert gns.critical_batch_hint == round(gns.value)
    assert gns.grad_sq_norm == pytest.approx(1.0, rel=0.15)
    assert gns.noise_trace == pytest.approx(noise_trace, rel=0.15)


def test_one_worker_gives_no_estimate():
    gns = GradientNoiseScale()
    assert gns.update(2.0, 1.0, batch_small=32, world_size=1) is None
    assert gns.value is None and gns.critical_batch_hint is None and gns.updates == 0


def test_undefined_until_both_estimates_are_positive():
    gns = GradientNoiseScale(ema_decay=0.0)
    assert gns.value is None
    # the all-reduced norm far below the local one: |G|^2 estimate negative, noise dominates
    assert gns.update(10.0, 0.1, batch_small=8, world_size=2) is None
    assert gns.update(2.0, 1.5, batch_small=8, world_size=2) == pytest.approx(
        ((2.0 - 1.5) / (1 / 8 - 1 / 16)) / ((16 * 1.5 - 8 * 2.0) / 8)
    )


def test_non_finite_norms_are_skipped():
    gns = GradientNoiseScale(ema_decay=0.5)
    first = gns.update(2.0, 1.5, 8, 2)
    assert gns.update(math.nan, 1.5, 8, 2) == first
    assert gns.update(2.0, math.inf, 8, 2) == first
    assert gns.updates == 1


def test_bad_arguments_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)
    with pytest.raises(ValueError, match="batch_small"):
        GradientNoiseScale().update(1.0, 1.0, batch_small=0, world_size=2)
    with pytest.raises(ValueError, match="batch_big > batch_small"):
        noise_scale_estimates(1.0, 1.0, 8, 8)


# ---------------------------------------------------------------- layer groups
GPT = (
    ["wte.weight", "wpe.weight"]
    + [
        f"blocks.{i}.{module}.{leaf}"
        for i in range(12)
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for leaf in ("weight", "bias")
    ]
    + ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
)


def test_small_models_keep_their_full_module_names():
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight"]
    assert group_layers(names, 32) == {
        "fc1.weight": "fc1",
        "fc1.bias": "fc1",
        "fc2.weight": "fc2",
        "fc2.bias": "fc2",
        "head.weight": "head",
    }


def test_large_models_are_cut_to_shorter_module_paths_until_they_fit():
    full = group_layers(GPT, 1000)
    assert full["blocks.3.attn.c_attn.weight"] == "blocks.3.attn.c_attn"
    assert len(set(full.values())) == 76

    assert group_layers(GPT, 60)["blocks.3.attn.c_attn.weight"] == "blocks.3.attn"  # 2 + 12*4 + 2 = 52
    capped = group_layers(GPT, 32)
    assert capped["blocks.3.attn.c_attn.weight"] == "blocks.3"
    assert capped["wte.weight"] == "wte" and capped["lm_head.weight"] == "lm_head"
    assert len(set(capped.values())) == 16
    assert group_layers(GPT, 5)["blocks.3.attn.c_attn.weight"] == "blocks"


def test_when_even_top_level_modules_are_too_many_the_rest_share_one_group():
    groups = group_layers(GPT, 3)
    assert set(groups.values()) == {"wte", "wpe", OTHER_GROUP}
    assert groups["lm_head.weight"] == OTHER_GROUP
    assert set(group_layers(GPT, 1).values()) == {"model"}


def test_wrapper_prefixes_and_root_parameters():
    ddp = group_layers(["module._orig_mod.fc.weight", "module._orig_mod.fc.bias"], 8)
    assert ddp == {"module._orig_mod.fc.weight": "fc", "module._orig_mod.fc.bias": "fc"}
    assert group_layers(["weight", "bias"], 8) == {"weight": "model", "bias": "model"}  # a bare nn.Linear
    assert group_layers(["cls_token", "head.weight"], 8) == {"cls_token": "cls_token", "head.weight": "head"}
    assert group_layers([], 4) == {}
    with pytest.raises(ValueError, match="max_layers"):
        group_layers(["a.weight"], 0)


module_names = st.lists(
    st.sampled_from(["enc", "dec", "blocks", "0", "1", "2", "attn", "mlp", "q", "k"]), min_size=1, max_size=4
).map(".".join)


@settings(max_examples=200, deadline=None)
@given(modules=st.lists(module_names, min_size=1, max_size=40, unique=True), cap=st.integers(1, 40))
def test_groups_respect_the_cap_keep_biases_with_weights_and_are_deterministic(modules, cap):
    names = [f"{m}.{leaf}" for m in modules for leaf in ("weight", "bias")]
    groups = group_layers(names, cap)

    assert set(groups) == set(names)
    assert len(set(groups.values())) <= cap
    for module in modules:
        assert groups[f"{module}.weight"] == groups[f"{module}.bias"]
        group = groups[f"{module}.weight"]
        assert group in (OTHER_GROUP, "model") or module == group or module.startswith(group + ".")
    assert group_layers(list(names), cap) == groups
