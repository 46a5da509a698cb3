"""Allocation by score and by measured sensitivity: budgets met exactly, limits kept, rivals reproduced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmatch_plugin import baselines
from mixmatch_plugin.allocation import curve_ratios, lamp, score_ratios, sorted_scores
from mixmatch_plugin.budget import exact_counts
from mixmatch_plugin.errors import BudgetError
from mixmatch_plugin.inventory import inventory
from mixmatch_plugin.sensitivity import measure_curves
from mixmatch_plugin.signals import compute_signals


def _vectors(layers):
    n = np.array([layer.params for layer in layers], dtype=np.float64)
    norm = np.array([layer.kind == "norm" for layer in layers])
    return n, np.zeros(len(layers)), np.where(norm, 0.0, 1.0 - 1.0 / n)  # every layer keeps a weight, as the rivals do


@pytest.mark.parametrize(("signal", "norm", "baseline"), [("magnitude", "raw", "global_magnitude"),
                                                           ("product", "raw", "snip"), ("magnitude", "lamp", "lamp")])
def test_free_score_allocation_is_the_global_rival(tiny_resnet, calib, signal, norm, baseline):
    # one threshold over raw |w|, |w*g| or LAMP scores, with nothing but normalization held dense,
    # is global magnitude, SNIP and LAMP: their per-layer counts, to a weight
    for m in tiny_resnet.modules():  # timm zero-initialises each block's last BatchNorm: no gradient would reach it
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    layers = inventory(tiny_resnet)
    scores = compute_signals(tiny_resnet, calib, layers=layers)
    n, lo, hi = _vectors(layers)
    rho = score_ratios([None if x.kind == "norm" else sorted_scores(scores.score(x.name, signal), norm) for x in layers],
                       n, lo, hi, 0.8)
    k = exact_counts(rho, n.astype(np.int64), 0.8)
    rival = baselines.make(baseline, layers, scores, 0.8)
    assert int(k.sum()) == round(0.8 * n.sum())
    diff = [abs(int(k[i]) - round(rival.ratios[x.name] * x.params)) for i, x in enumerate(layers)]
    assert max(diff) <= 1


def test_score_allocation_keeps_each_layer_in_its_limits_and_meets_the_budget():
    rng = np.random.default_rng(0)
    scores = [np.sort(rng.lognormal(mu, 1.0, size)) for mu, size in ((0.0, 500), (2.0, 300), (-6.0, 2000))]
    n = np.array([500.0, 300.0, 2000.0])
    lo, hi = np.array([0.1, 0.0, 0.2]), np.array([0.5, 0.9, 0.95])
    rho = score_ratios(scores, n, lo, hi, 0.75)
    assert np.all(rho >= lo - 1e-12) and np.all(rho <= hi + 1e-12)
    assert (n * rho).sum() / n.sum() == pytest.approx(0.75, abs=1e-9)
    # the layer with the smallest scores is pruned hardest, up to its limit
    assert rho[2] == pytest.approx(0.95)
    with pytest.raises(BudgetError, match="outside what the limits reach"):
        score_ratios(scores, n, lo, hi, 0.9)


def test_lamp_scores_are_sorted_and_end_at_one():
    v = lamp(torch.tensor([3.0, -1.0, 2.0, 0.5]))
    assert np.all(np.diff(v) >= 0)
    assert v[-1] == pytest.approx(1.0)  # the largest weight: w^2 / w^2
    assert v[0] == pytest.approx(0.25 / (9 + 1 + 4 + 0.25))


def test_curve_allocation_fills_the_cheapest_segments_first_and_convexifies():
    grid = [np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0])]
    cost = [np.array([0.0, 1.0, 2.0]),     # linear: 2 per unit of sparsity
            np.array([0.0, 3.0, 3.5])]     # concave: its hull is the chord, 3.5 per unit
    n = np.array([100.0, 100.0])
    lo, hi = np.zeros(2), np.array([0.99, 0.99])
    rho = curve_ratios(grid, cost, n, lo, hi, 0.25)
    assert rho == pytest.approx([0.5, 0.0])  # the cheaper layer takes the whole budget
    rho = curve_ratios(grid, cost, n, lo, hi, 0.7)
    assert rho[0] == pytest.approx(0.99) and (n * rho).sum() / n.sum() == pytest.approx(0.7)
    # a lower limit is always taken, whatever it costs
    rho = curve_ratios(grid, cost, n, np.array([0.0, 0.3]), hi, 0.3)
    assert rho == pytest.approx([0.3, 0.3])


def test_measured_curves_leave_the_model_alone_and_start_at_zero(tiny_resnet, calib):
    layers = inventory(tiny_resnet)
    scores = compute_signals(tiny_resnet, calib, layers=layers)
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    hi = {x.name: (0.0 if x.kind == "norm" else 0.9) for x in layers}
    curves = measure_curves(tiny_resnet, layers, scores, calib, signal="magnitude", hi=hi, max_batches=1)
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(curves.grid) == {x.name for x in layers if x.kind != "norm"}
    for name, pts in curves.grid.items():
        assert pts[0] == 0.0 and pts[-1] == pytest.approx(0.9) and list(pts) == sorted(pts)
        assert curves.cost[name][0] == pytest.approx(0.0, abs=1e-6)
        assert min(curves.cost[name]) >= -1e-6  # a KL divergence
    # pruning a layer to 90 % does some damage somewhere
    assert max(c[-1] for c in curves.cost.values()) > 1e-3
    assert curves.forwards == 1 + sum(len(p) - 1 for p in curves.grid.values())
