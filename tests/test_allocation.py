"""Allocation by score and by measured sensitivity: budgets met exactly, limits kept, rivals reproduced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixmatch_plugin import baselines
from mixmatch_plugin.allocation import curve_ratios, lamp, score_ratios, sorted_scores
from mixmatch_plugin.budget import exact_counts
from mixmatch_plugin.errors import BudgetError, MixMatchError
from mixmatch_plugin.layers import inventory
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


def test_wanda_is_the_weight_times_its_input_channel_norm_for_linear_and_grouped_conv(calib):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, groups=2),
                                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(24, 10))
    batches = list(calib)
    scores = compute_signals(model, batches)
    x = torch.cat([b[0] for b in batches])
    h1 = model[1](model[0](x))
    h2 = model[4](model[3](model[2](h1)))
    conv = model[2].weight.detach().abs()
    n1 = h1.pow(2).sum(dim=(0, 2, 3)).sqrt()  # 4 input channels, 2 groups of 2; outputs 0-2 read channels 0-1
    want = conv * torch.stack([n1[0:2]] * 3 + [n1[2:4]] * 3).view(6, 2, 1, 1)
    assert torch.allclose(scores.score("2", "wanda"), want, rtol=1e-4)
    lin = model[5].weight.detach().abs() * h2.pow(2).sum(0).sqrt()
    assert torch.allclose(scores.score("5", "wanda"), lin, rtol=1e-4)
    assert "wanda" in scores.available and "wanda" not in compute_signals(model, signals=("magnitude",)).available


def test_a_budget_plan_holds_the_score_and_measured_families_at_the_exact_budget(trained_tiny_resnet, calib):
    from mixmatch_plugin.planning import PlanOptions, plan

    p = plan(trained_tiny_resnet, calib, target=0.6, on_unreachable="extend", options=PlanOptions(measure="wanda"))
    n = sum(x.params for x in p.layers)
    score = [s for s in p.strategies if s.meta.get("family") == "score"]
    measured = [s for s in p.strategies if s.meta.get("family") == "measured"]
    assert {s.signal for s in score} == {"magnitude", "product", "wanda"}
    assert [s.name for s in measured] == ["wanda:measured-ranges", "wanda:measured-bounds", "wanda:measured-free"]
    hard, size = dict(p.bounds), {x.name: x.params for x in p.layers}
    for s in score + measured:
        assert round(s.global_sparsity * n) == round(0.6 * n)
        if s.meta["clip"] != "free":  # inside the hard bounds; "free" may leave the small-layer clamp
            assert all(hard[m][0] - 1 / size[m] <= r <= hard[m][1] + 1 / size[m] for m, r in s.ratios.items())  # whole weights
        assert all(s.ratios[x.name] == 0.0 for x in p.layers if x.kind == "norm")
    assert p.meta["measured"]["forwards"] > len(p.layers)
    # the free score allocations differ from the ranged ones: the ranges do bind somewhere
    by = {s.name: s for s in score}
    assert by["product:score-raw-free"].ratios != by["product:score-raw-ranges"].ratios
    # saved and loaded like any other strategy
    from mixmatch_plugin.planning import Plan

    assert Plan.from_dict(p.to_dict()).strategy("wanda:measured-free").ratios == measured[2].ratios


def test_choose_screens_the_pool_then_ranks_the_best_on_validation(trained_tiny_resnet, calib, digits_loaders):
    from dataclasses import replace

    from mixmatch_plugin.evaluation import choose, rank
    from mixmatch_plugin.planning import plan
    from mixmatch_plugin.strategies import distinct, twins

    _, val, _ = digits_loaders
    screen = [next(iter(val))]
    p = plan(trained_tiny_resnet, calib, target=0.6, on_unreachable="extend")
    # a pool merged from two plans holds twins: the same masks under another name are evaluated once
    first = p.strategies[0]
    layer = next(k for k, v in first.ratios.items() if v > 0)
    twin, other = replace(first, name="twin"), replace(first, name="other", layer_signals={layer: "wanda"})
    names = [s.name for s in distinct([*p.strategies, twin, other])]
    assert "twin" not in names and "other" in names and names[:-1] == [s.name for s in distinct(p.strategies)]
    c = choose(trained_tiny_resnet, [*p.strategies, twin], screen, val, signals=p.signals, top_k=3, masks=("magnitude", "wanda"))
    names = [r.strategy for r in c.screen]
    assert len(names) == len(p.strategies) + 1 and names[names.index(first.name) + 1] == "twin"  # listed with its twin's scores
    assert c.screen[names.index("twin")].accuracy == c.screen[names.index(first.name)].accuracy
    assert "twin" not in {r.strategy for r in c.finals} and c.twins == {**twins(p.strategies), "twin": first.name}
    plain = [r for r in c.finals if "@" not in r.strategy]
    assert {r.strategy for r in plain} == {r.strategy for r in c.screen if r.strategy != "twin"}.intersection(
        [r.strategy for r in c.screen if r.strategy != "twin"][:3])
    remasked = [r.strategy for r in c.finals if "@" in r.strategy]
    assert sorted(remasked) == sorted(f"{plain[0].strategy}@{m}" for m in ("magnitude", "wanda") if m != p.strategy(plain[0].strategy).signal)
    assert c.evaluations == len(distinct(p.strategies)) + 3 + len(remasked)
    # the winner is the best finalist, and measuring it again gives the same accuracy
    assert c.finals[0].strategy == c.strategy.name
    assert c.finals[0].accuracy == max(r.accuracy for r in c.finals)
    assert rank(trained_tiny_resnet, [c.strategy], val, signals=p.signals)[0].accuracy == c.finals[0].accuracy


def test_plan_choose_is_choose_with_the_plans_strategies_signals_and_held_batches(trained_tiny_resnet, calib, digits_loaders):
    from mixmatch_plugin.evaluation import choose, hold_batches
    from mixmatch_plugin.planning import MASK_SIGNALS, plan

    train, val, _ = digits_loaders
    p = plan(trained_tiny_resnet, calib, target=0.6, on_unreachable="extend", signals=("magnitude", "gradient"))
    before = {k: v.clone() for k, v in trained_tiny_resnet.state_dict().items()}
    bn = hold_batches(train, 4)
    c = p.choose(trained_tiny_resnet, val, bn_loader=bn, top_k=3)
    ref = choose(trained_tiny_resnet, p.strategies, [next(iter(val))], val, signals=p.signals, bn_loader=bn, bn_batches=4,
                 top_k=3, masks=MASK_SIGNALS)
    assert c.strategy == ref.strategy and c.finals == ref.finals and c.evaluations == ref.evaluations
    # the winner's allocation is tried with the other signals' masks; the model is not changed
    assert {r.strategy.partition("@")[2] for r in c.finals} == {"", *MASK_SIGNALS} - {p.strategy(c.finals[0].strategy.partition("@")[0]).signal}
    assert all(torch.equal(v, before[k]) for k, v in trained_tiny_resnet.state_dict().items())
    with pytest.raises(MixMatchError, match="holds no signals"):  # a saved plan keeps none
        type(p).from_dict(p.to_dict()).choose(trained_tiny_resnet, val)


def test_large_layers_are_allocated_from_a_sample_that_keeps_their_fraction_and_lamp_scale():
    from mixmatch_plugin import allocation

    torch.manual_seed(0)
    big = torch.randn(4 * allocation.SAMPLE) * 0.5
    small = torch.randn(allocation.SAMPLE // 2)
    for norm in ("raw", "lamp"):
        s_big, s_small = sorted_scores(big, norm), sorted_scores(small, norm)
        assert len(s_big) == allocation.SAMPLE and len(s_small) == len(small)
        # the same threshold prunes about the same fraction of the sample as of the whole layer
        full = lamp(big) if norm == "lamp" else big.double().abs().sort().values.numpy()
        for q in (0.3, 0.7, 0.95):
            t = full[int(q * len(full))]
            assert abs(np.searchsorted(s_big, t) / len(s_big) - q) < 0.01, (norm, q)
