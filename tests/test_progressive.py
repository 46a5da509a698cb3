"""Progressive SNIP (``PlanOptions(progressive=...)``): the rounds' allocation and masks, on a trained tiny ResNet."""

from __future__ import annotations

import copy

import pytest
import torch

import mixmatch_plugin as mm
from mixmatch_plugin import baselines
from mixmatch_plugin.evaluation import evaluate, reestimate_bn
from mixmatch_plugin.layers import inventory
from mixmatch_plugin.masks import Masker
from mixmatch_plugin.progressive import progressive_scores
from mixmatch_plugin.signals import compute_signals


def test_one_round_is_snip_and_the_scores_encode_the_removed_weights(trained_tiny_resnet, calib):
    model, layers = trained_tiny_resnet, inventory(trained_tiny_resnet)
    before = copy.deepcopy(model.state_dict())
    snip = baselines.make("snip", layers, compute_signals(model, calib), 0.9)
    scores, one_round = progressive_scores(model, calib, layers, 0.9, rounds=1)
    assert one_round == {x.name: round(snip.ratios[x.name] * x.params) for x in baselines.eligible(layers)}
    scores, counts = progressive_scores(model, calib, layers, 0.9, rounds=4)
    assert sum(counts.values()) == baselines.budget_weights(layers, 0.9)
    for name, s in scores.items():  # the lowest `counts` scores are the removed ones: those of the four rounds
        assert int((s < 4).sum()) == counts[name] and bool((s >= 0).all()) and bool((s < 5).all())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    dense = compute_signals(model, calib)
    reused, again = progressive_scores(model, calib, layers, 0.9, rounds=4, dense=dense)
    assert again == counts and all(torch.equal(reused[n], scores[n]) for n in scores)  # the dense signals are round 1
    noisy = compute_signals(model, calib)  # ... and really are used
    noisy.gradient = {n: g * torch.rand_like(g) for n, g in noisy.gradient.items()}
    assert progressive_scores(model, calib, layers, 0.9, rounds=1, dense=noisy)[1] != one_round


def test_a_plan_adds_the_progressive_member_and_masks_by_its_rounds(trained_tiny_resnet, calib, digits_loaders):
    model = trained_tiny_resnet
    _, val, _ = digits_loaders
    opts = mm.PlanOptions(progressive=5, score_family=False, disable_constraints=("small_layers",))
    p = mm.plan(model, calib, target=0.9, on_unreachable="extend", options=opts)
    s = p.strategy("product:progressive")
    assert s.signal == "progressive" and "progressive" in p.signals.available and s.meta["family"] == "progressive"
    assert abs(s.global_sparsity - 0.9) < 1e-3
    snip = baselines.make("snip", p.layers, p.signals, 0.9)
    assert s.ratios != snip.ratios  # rescoring moved the budget between layers
    work, _ = Masker(model, p.signals, layers=p.layers)(s)
    zeros = {x.name: int((dict(work.named_modules())[x.name].weight == 0).sum()) for x in p.layers if x.kind != "norm"}
    assert all(zeros[n] >= round(s.ratios[n] * x.params) for x in p.layers if (n := x.name) in zeros)
    reestimate_bn(work, calib, 4)
    assert evaluate(work, val).accuracy > 0.2  # a working network at 90 %, not a collapsed one


def test_progressive_needs_calibration_and_a_round():
    from mixmatch_plugin.models import tiny_resnet

    with pytest.raises(mm.MixMatchError, match="calibration"):
        mm.plan(tiny_resnet(width=8), target=0.5, signals=("magnitude",), options=mm.PlanOptions(progressive=3, score_family=False))
    with pytest.raises(mm.MixMatchError, match="at least 1"):
        progressive_scores(tiny_resnet(width=8), [], inventory(tiny_resnet(width=8)), 0.5, rounds=0)
