"""The ten strategies per signal, native and budget-matched, and the budget mover's guarantees."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch

import mixmatch_plugin as mm
from mixmatch_plugin.budget import exact_counts, extend_ranges, move_to_budget, reachable
from mixmatch_plugin.errors import BudgetError

from .helpers import small_swin


@pytest.fixture(scope="module")
def swin_plan(calib_swin):
    return calib_swin


@pytest.fixture(scope="module")
def calib_swin():
    from mixmatch_plugin.app import data

    d = data.load("digits", input_shape=(1, 28, 28))
    model = small_swin()
    return model, d.calibration(samples=64, batch_size=32)


def counts(strategy, layers):
    return sum(round(strategy.ratios[layer.name] * layer.params) for layer in layers)


def test_ten_distinct_named_strategies_per_signal(calib_swin):
    model, calib = calib_swin
    p = mm.plan(model, calib)
    assert len(p.strategies) == 30
    assert [s.name for s in p.strategies[:10]] == [f"magnitude:{s}" for s in mm.SHAPES]
    for sig in mm.DEFAULT_SIGNALS:
        group = [s for s in p.strategies if s.signal == sig]
        assert len(group) == 10
        for a, b in itertools.combinations(group, 2):
            assert max(abs(a.ratios[k] - b.ratios[k]) for k in a.ratios) > 1e-3, (a.name, b.name)


def test_native_strategies_sit_inside_ranges_and_follow_alpha(calib_swin):
    model, calib = calib_swin
    p = mm.plan(model, calib, signals=("magnitude",))
    by = {s.meta["shape"]: s for s in p.strategies}
    for name, (lo, hi) in p.ranges.items():
        assert by["all-min"].ratios[name] == pytest.approx(lo)
        assert by["all-max"].ratios[name] == pytest.approx(hi)
        assert by["midpoint"].ratios[name] == pytest.approx((lo + hi) / 2)
        assert by["alpha-0.3"].ratios[name] == pytest.approx(lo + 0.3 * (hi - lo))
        for s in p.strategies:
            assert lo - 1e-12 <= s.ratios[name] <= hi + 1e-12
    # late-heavy prunes the last stage's MLP at its max and the first stage's at its min
    late = by["late-heavy"].ratios
    assert late["layers.1.blocks.0.mlp.fc1"] == pytest.approx(p.ranges["layers.1.blocks.0.mlp.fc1"][1])
    assert late["layers.0.blocks.0.mlp.fc1"] == pytest.approx(p.ranges["layers.0.blocks.0.mlp.fc1"][0])
    early = by["early-heavy"].ratios
    assert early["patch_embed.proj"] == pytest.approx(p.ranges["patch_embed.proj"][1])


def test_sensitivity_shape_depends_on_the_signal(calib_swin):
    model, calib = calib_swin
    p = mm.plan(model, calib, options=mm.PlanOptions(shapes=("sensitivity",)))
    a = [s.meta["alphas"] for s in p.strategies]
    assert len(a) == 3 and a[0] != a[1] and a[1] != a[2]
    assert sorted(a[0].values())[0] == 0.0 and sorted(a[0].values())[-1] == 1.0


def test_every_rule_strategy_is_a_point_of_the_space(calib_swin):
    model, calib = calib_swin
    p = mm.plan(model, calib, target=0.6, on_unreachable="extend")
    space = p.space()
    for s in p.strategies:
        if "shape" not in s.meta:  # the score family allocates by score, not by alphas
            continue
        again = space.strategy(s.name, s.signal, s.meta["alphas"])
        assert again.ratios == s.ratios


@pytest.mark.parametrize("target", [0.22, 0.27, 0.32])
def test_budget_matched_hits_the_target_inside_the_ranges(calib_swin, target):
    model, calib = calib_swin
    p = mm.plan(model, calib, target=target, signals=("magnitude", "product"))
    n_total = sum(layer.params for layer in p.layers)
    assert {s.meta.get("clip") for s in p.strategies} == {None, "ranges", "bounds", "free"}
    for s in p.strategies:
        assert counts(s, p.layers) == round(target * n_total)
        assert abs(s.global_sparsity - target) <= 0.005 * target
        if s.meta.get("clip", "ranges") != "ranges":  # the score family's other limits leave the ranges on purpose
            continue
        assert "out_of_range" not in s.meta
        for name, (lo, hi) in p.ranges.items():
            size = next(layer.params for layer in p.layers if layer.name == name)
            assert lo - 1 / size <= s.ratios[name] <= hi + 1 / size


def test_unreachable_target_states_the_interval(calib_swin):
    model, calib = calib_swin
    with pytest.raises(BudgetError, match=r"outside the reachable interval \[0\.\d+, 0\.\d+\]"):
        mm.plan(model, calib, target=0.8, signals=("magnitude",))


def test_extended_ranges_reach_the_target_and_report_it():
    m = timm.create_model("resnet18", num_classes=10)
    p = mm.plan(m, signals=("magnitude",), target=0.93, on_unreachable="extend")
    n_total = sum(layer.params for layer in p.layers)
    assert p.meta["range_shift"] is not None and p.meta["range_shift"] > 0 and "range" in p.meta["range_extension"]
    assert p.meta["reachable"][1] < 0.93
    for s in p.strategies:
        assert counts(s, p.layers) == round(0.93 * n_total)
        assert s.meta.get("out_of_range"), s.name
        if s.meta.get("clip") == "free":  # lifts the small-layer clamp on purpose
            continue
        for layer in p.layers:  # hard bounds are never left
            lo, hi = p.bounds[layer.name]
            assert lo - 1 / layer.params <= s.ratios[layer.name] <= hi + 1 / layer.params


def test_move_to_budget_properties():
    rng = np.random.default_rng(0)
    n = rng.integers(100, 10_000, 12).astype(float)
    lo = rng.uniform(0, 0.5, 12)
    hi = lo + rng.uniform(0, 0.4, 12)
    rho = lo + rng.uniform(0, 1, 12) * (hi - lo)
    a, b = reachable(n, lo, hi)
    for t in np.linspace(a, b, 7):
        out = move_to_budget(rho, n, lo, hi, t)
        assert (n * out).sum() / n.sum() == pytest.approx(t, abs=1e-9)
        assert (out >= lo - 1e-12).all() and (out <= hi + 1e-12).all()
        # the shift is monotone: layer order by log-odds is kept among layers not at a range end
        inside = (out > lo + 1e-9) & (out < hi - 1e-9)
        order_in, order_out = np.argsort(rho[inside]), np.argsort(out[inside])
        assert (order_in == order_out).all()


def test_extend_ranges_meets_midpoint_and_keeps_zero_ends():
    n = np.array([1000.0, 5000.0, 300.0, 50.0])
    lo = np.array([0.0, 0.3, 0.1, 0.0])
    hi = np.array([0.3, 0.5, 0.2, 0.0])
    floor = np.zeros(4)
    ceil = np.array([0.99, 0.99, 0.99, 0.0])
    new_lo, new_hi, how = extend_ranges(n, lo, hi, floor, ceil, 0.8)
    assert how.kind == "log-odds" and how.amount > 0 and new_lo[0] == 0.0 and new_hi[3] == 0.0
    assert ((n * (new_lo + new_hi)).sum() / (2 * n.sum())) == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(BudgetError, match="hard bounds"):
        extend_ranges(n, lo, hi, floor, np.full(4, 0.5), 0.8)


def test_extend_ranges_scales_kept_fractions_where_the_log_odds_shift_saturates():
    # LeViT-like: every role's range starts at 0 but one; the log-odds midpoints cannot reach 0.7
    n = np.array([4000.0, 8000.0, 2000.0, 50.0, 800.0])
    lo = np.array([0.0, 0.0, 0.5, 0.0, 0.1])
    hi = np.array([0.3, 0.4, 0.8, 0.0, 0.1])
    floor = np.zeros(5)
    ceil = np.array([0.99, 0.99, 0.99, 0.0, 0.99])
    new_lo, new_hi, how = extend_ranges(n, lo, hi, floor, ceil, 0.7)
    assert how.kind == "density" and how.amount > 0 and "kept fraction" in str(how)
    assert ((n * (new_lo + new_hi)).sum() / (2 * n.sum())) == pytest.approx(0.7, abs=1e-6)
    assert new_hi[3] == 0.0 and new_lo[4] == new_hi[4] == 0.1  # fixed layers stay
    free = slice(0, 3)  # one factor on every kept fraction, ends at 0 included; nothing driven to the ceiling
    ratio = (1 - np.r_[new_lo[free], new_hi[free]]) / (1 - np.r_[lo[free], hi[free]])
    assert ratio == pytest.approx(np.full(6, np.exp(-how.amount))) and new_hi[2] < 0.99
    # below the ranges' reach they move down
    low_lo, low_hi, low = extend_ranges(n, np.array([0.0, 0.4, 0.5, 0.0, 0.1]), hi + np.array([0, 0.2, 0, 0, 0]), floor, ceil, 0.1)
    assert ((n * (low_lo + low_hi)).sum() / (2 * n.sum())) == pytest.approx(0.1, abs=1e-6) and low.amount < 0


def test_exact_counts_meet_the_global_count():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 500, 30)
    rho = rng.uniform(0, 0.9, 30)
    t = float((rho * n).sum() / n.sum())
    k = exact_counts(rho, n, t)
    assert k.sum() == round(t * n.sum())
    assert (np.abs(k - rho * n) <= 1.0).all()


def test_from_ratios_puts_another_allocation_into_the_space(calib_swin):
    model, calib = calib_swin
    p = mm.plan(model, calib, target=0.3, signals=("magnitude", "product"), options=mm.PlanOptions(ranges="rules"))
    space = p.space()
    rule = p.strategies[3]
    again = space.from_ratios("again", rule.signal, rule.ratios)
    assert again.ratios == rule.ratios  # a point of the space comes back unchanged
    snip = mm.baselines.make("snip", p.layers, p.signals, 0.3)  # a free allocation, partly outside the ranges
    inside = space.from_ratios("snip-in-ranges", "product", snip.ratios, {"method": "snip"})
    n_total = sum(layer.params for layer in p.layers)
    assert counts(inside, p.layers) == counts(snip, p.layers) == round(0.3 * n_total)
    assert inside.meta["method"] == "snip" and "out_of_range" not in inside.meta
    moved = [n for n in snip.ratios if abs(snip.ratios[n] - inside.ratios[n]) > 1e-3]
    assert moved and all(p.ranges[n][0] - 1e-3 <= inside.ratios[n] <= p.ranges[n][1] + 1e-3 for n in inside.ratios)
    with pytest.raises(mm.MixMatchError, match="no sparsity for layer"):
        space.from_ratios("short", "product", dict(list(snip.ratios.items())[:2]))


def test_a_signal_that_is_zero_wherever_the_limits_allow_pruning_gives_no_score_strategy_and_the_plan_goes_on():
    """Found by the property test: gradients non-zero only in a protected layer made the whole plan fail."""
    import mixmatch_plugin as mm
    from mixmatch_plugin.signals import Signals

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    mag = {n: m.weight.detach().abs() for n, m in model.named_children() if isinstance(m, torch.nn.Linear)}
    grad = {"0": torch.zeros(8, 8), "2": torch.ones(4, 8)}  # zero wherever pruning is allowed: layer 2 is protected
    p = mm.plan(model, signals=("magnitude", "gradient"), target=0.3, scores=Signals(mag, gradient=grad),
                options=mm.PlanOptions(protect=("^2$",), disable_constraints=("small_layers",)))
    names = [s.name for s in p.strategies]
    assert any(n.startswith("magnitude:score-") for n in names)
    assert not any(n.startswith(("product:score-", "gradient:score-")) for n in names)
    assert all(s.ratios["2"] == 0.0 and abs(s.global_sparsity - 0.3) < 0.02 for s in p.strategies)
