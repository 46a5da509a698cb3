"""Property-based tests of the core's invariants over random small models, rule sets and targets.

Hypothesis draws a network (an optional conv stem with BatchNorm, Linear blocks with BatchNorm or
LayerNorm, residual blocks whose two Linears may share one weight, a head), a rule set (per-kind and
per-size ranges, a norm constraint, optional size and max-sparsity bounds), layers to protect, a
signal set and a target (none: native mode; a number: budget-matched mode with range extension).

Tolerances, stated once:

* native mode: a layer's ratio lies in its range up to 1e-9 (``lo + alpha * (hi - lo)`` in floats);
* budget mode: ratios are whole weights (``k / n``), so a layer lies in its range up to one weight
  (``1 / n``); the global count is exact, ``sum(k) == round(S * N)`` (:func:`budget.exact_counts`);
* masks: exactly ``round(ratio * n)`` weights are zeroed per layer (one weight of ``ratio * n``), at most
  ``n - 1``: no layer is ever emptied.

A deeper hunt than the suite's 40 examples per test: ``MIXMATCH_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_properties.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.budget import exact_counts, reachable
from mixmatch_plugin.errors import BudgetError
from mixmatch_plugin.masks import prune_count

EXAMPLES = int(os.environ.get("MIXMATCH_HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IN_SHAPE = (2, 4, 4)


# ------------------------------------------------------------------------------------ random models
class Residual(nn.Module):
    def __init__(self, width: int, norm: bool, tied: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        if tied:
            self.fc2.weight = self.fc1.weight  # one tensor, two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class RandomNet(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


@st.composite
def random_nets(draw: st.DrawFn) -> nn.Module:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    c = IN_SHAPE[0]
    if draw(st.booleans()):
        width = draw(st.integers(2, 12))
        k = draw(st.sampled_from([1, 3]))
        parts: list[nn.Module] = [nn.Conv2d(c, width, k, padding=k // 2)]
        if draw(st.booleans()):
            parts.append(nn.BatchNorm2d(width))
        stem: nn.Module = nn.Sequential(*parts, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        width = c * IN_SHAPE[1] * IN_SHAPE[2]
        stem = nn.Flatten()
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "linear_bn", "linear_ln", "residual", "residual_tied"]))
        if kind.startswith("residual"):
            blocks.append(Residual(width, draw(st.booleans()), tied=kind == "residual_tied"))
            continue
        out = draw(st.integers(2, 24))
        norm = {"linear": [], "linear_bn": [nn.BatchNorm1d(out)], "linear_ln": [nn.LayerNorm(out)]}[kind]
        blocks.append(nn.Sequential(nn.Linear(width, out), *norm, nn.ReLU()))
        width = out
    model = RandomNet(stem, blocks, nn.Linear(width, draw(st.integers(2, 5))))
    return model.eval()


# -------------------------------------------------------------------------------------- random rules
def _interval(draw: st.DrawFn, top: float = 0.95) -> list[float]:
    a, b = sorted(round(draw(st.floats(0.0, top)), 3) for _ in range(2))
    return [a, b]


@st.composite
def rule_sets(draw: st.DrawFn) -> dict:
    rules = []
    for kind in draw(st.lists(st.sampled_from(["conv", "linear"]), max_size=2, unique=True)):
        rules.append({"kind": kind, "range": _interval(draw)})
    if draw(st.booleans()):
        rules.append({"max_params": draw(st.integers(10, 300)), "range": _interval(draw, 0.5)})
    if draw(st.booleans()):
        rules.append({"role": "head", "range": _interval(draw, 0.5)})
    rules.insert(draw(st.integers(0, len(rules))), {"role": "norm", "range": [0.0, 0.0]})
    rules.append({"range": _interval(draw)})  # catch-all
    constraints: dict = {"norm": {"role": "norm", "clamp": [0.0, 0.0]}}
    if draw(st.booleans()):
        constraints["small"] = {"max_params": draw(st.integers(10, 200)), "clamp": [0.0, round(draw(st.floats(0.0, 0.5)), 3)]}
    return {"name": "random", "rules": rules, "constraints": constraints,
            "max_layer_sparsity": round(draw(st.floats(0.5, 0.99)), 3)}


def _calib(model: nn.Module, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    classes = model.head.out_features
    return [(torch.randn(6, *IN_SHAPE, generator=g), torch.randint(0, classes, (6,), generator=g))]


def _state(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def _same_state(a: dict, b: dict) -> bool:
    return (a["params"].keys() == b["params"].keys()
            and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
            and a["grad"] == b["grad"] and a["training"] == b["training"])


def _tol(strategy: mm.Strategy, layer: mm.Layer) -> float:
    return 1.0 / layer.params if strategy.meta["mode"] == "budget" else 1e-9


def check_strategy(p: mm.Plan, s: mm.Strategy, protected: set[str]) -> None:
    """Every per-strategy invariant of a plan (ranges, bounds, norms, protection, global count)."""
    layers = p.layers
    assert set(s.ratios) == {layer.name for layer in layers}
    outside = set()
    for layer in layers:
        r, tol = s.ratios[layer.name], _tol(s, layer)
        lo, hi = p.ranges[layer.name]
        floor, ceil = p.bounds[layer.name]
        assert 0.0 <= r < 1.0 and math.isfinite(r)
        if s.meta.get("clip") != "free":  # "free" lifts the constraints that do not keep a layer dense
            assert floor - tol <= r <= ceil + tol, (s.name, layer.name, r, (floor, ceil))  # hard bounds: never left
        elif ceil == 0.0:
            assert r == 0.0, (s.name, layer.name, r)
        if layer.kind == "norm" or layer.name in protected:
            assert r == 0.0, (s.name, layer.name, r)
        if r < lo - tol or r > hi + tol:
            outside.add(layer.name)
    # a layer is outside its original range if and only if the strategy reports it
    assert outside == set(s.meta.get("out_of_range", [])), (s.name, outside, s.meta.get("out_of_range"))
    if "shape" in s.meta and (s.meta["mode"] == "native" or p.meta["range_shift"] is None):  # rule strategies keep the ranges
        assert not outside, (s.name, outside)
    n = np.array([layer.params for layer in layers], dtype=np.int64)
    k = np.array([prune_count(s.ratios[layer.name], layer.params) for layer in layers])
    if s.meta["mode"] == "budget":
        target = p.meta["target"]
        assert int(k.sum()) == round(target * float(n.sum())), (s.name, int(k.sum()), target * n.sum())  # exact
        assert all(s.ratios[layer.name] * layer.params == pytest.approx(k[i], abs=1e-6) for i, layer in enumerate(layers))
    assert s.global_sparsity == pytest.approx(float(k.sum()) / float(n.sum()), abs=1e-12)


def check_apply(model: nn.Module, p: mm.Plan, s: mm.Strategy, protected: set[str]) -> None:
    """Applying: the input is untouched, exactly the planned weights are zeroed, norms and protected layers kept."""
    before = _state(model)
    res = p.apply(model, s)
    assert _same_state(before, _state(model)), "apply changed the input model"
    assert res.model is not model
    zeroed = 0
    for layer in p.layers:
        k = prune_count(s.ratios[layer.name], layer.params)  # round(ratio * n), never the whole layer
        assert abs(k - s.ratios[layer.name] * layer.params) <= 1.0 and k < layer.params  # within one weight
        w0 = before["params"][f"{layer.name}.weight"]
        w1 = res.model.get_submodule(layer.name).weight.detach()
        keep = res.masks.get(layer.name, torch.ones_like(w0, dtype=torch.bool))
        assert int((~keep).sum()) == k, (layer.name, int((~keep).sum()), k)
        assert torch.equal(w1, w0 * keep)  # the masked weights are zero, every other weight is unchanged
        zeroed += k
        if layer.kind == "norm" or layer.name in protected:
            assert k == 0 and torch.equal(w1, w0)
        for alias in layer.aliases:  # a tied weight stays tied and is pruned once
            assert res.model.get_submodule(alias).weight is res.model.get_submodule(layer.name).weight
    # biases and norm statistics are never touched
    for name, t in res.model.state_dict().items():
        if not name.endswith("weight"):
            assert torch.equal(t, before["params"][name]), name
    total = sum(layer.params for layer in p.layers)
    assert res.global_sparsity == pytest.approx(zeroed / total, abs=1e-12)

    inplace = p.apply(model, s, inplace=True)
    assert inplace.model is model
    for layer in p.layers:
        assert torch.equal(model.get_submodule(layer.name).weight.detach(), res.model.get_submodule(layer.name).weight.detach())


def check_round_trip(p: mm.Plan) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = p.save(Path(d) / "plan.json")
        back = mm.load_plan(path)
        assert back == p
        assert back.to_dict() == p.to_dict()
        assert json.dumps(back.to_dict(), sort_keys=True) == json.dumps(json.loads(path.read_text()), sort_keys=True)
        assert [x.name for x in Path(d).iterdir()] == ["plan.json"]  # atomic: no temp file left


# ------------------------------------------------------------------------------------------ the tests
@SETTINGS
@given(model=random_nets(), rules=rule_sets(), data=st.data())
def test_plans_keep_every_invariant(model, rules, data):
    layers = mm.inventory(model)
    prunable = [layer.name for layer in layers if layer.kind != "norm"]
    protected = set(data.draw(st.lists(st.sampled_from(prunable), max_size=2, unique=True), label="protect"))
    with_grad = data.draw(st.booleans(), label="gradient signals")
    signals = mm.SIGNALS if with_grad else ("magnitude",)
    calib = _calib(model, 0) if with_grad else None
    target = data.draw(st.none() | st.floats(0.02, 0.95).map(lambda t: round(t, 4)), label="target")
    protect = [f"^{name}$" for name in sorted(protected)]
    try:
        p = mm.plan(model, calib, signals=signals, preset=rules, target=target, on_unreachable="extend", options=mm.PlanOptions(protect=protect))
    except BudgetError:
        # only a target the ranges cannot reach may fail, and only if even the hard bounds cannot
        native = mm.plan(model, calib, signals=("magnitude",), preset=rules, options=mm.PlanOptions(protect=protect))
        n = np.array([layer.params for layer in native.layers], dtype=np.float64)
        lo, hi = reachable(n, *(np.array([native.ranges[layer.name][i] for layer in native.layers]) for i in (0, 1)))
        assert target is not None and not lo <= target <= hi
        return
    assert p.meta["target"] == target
    for s in p.strategies:
        check_strategy(p, s, protected)
    check_round_trip(p)
    picked = data.draw(st.sampled_from(p.strategies), label="strategy to apply")
    check_apply(model, p, picked, protected)


@SETTINGS
@given(model=random_nets(), rules=rule_sets(), data=st.data())
def test_searched_points_keep_every_invariant(model, rules, data):
    """Any point of the search space (per-group alphas in [0, 1]) is a strategy with the same guarantees."""
    target = data.draw(st.none() | st.floats(0.02, 0.95).map(lambda t: round(t, 4)), label="target")
    try:
        p = mm.plan(model, signals=("magnitude",), preset=rules, target=target, on_unreachable="extend", options=mm.PlanOptions(shapes=("midpoint",)))
    except BudgetError:
        return  # covered by the test above
    space = p.space()
    alphas = {g: data.draw(st.floats(0.0, 1.0), label=g) for g in space.groups}
    s = space.strategy("searched", data.draw(st.sampled_from(["magnitude"])), alphas, {"trial": 0})
    check_strategy(p, s, set())
    p.strategies.append(s)
    check_round_trip(p)
    check_apply(model, p, s, set())


@settings(max_examples=5 * EXAMPLES, deadline=None)
@given(data=st.data())
def test_exact_counts_meet_the_global_count(data):
    """Largest-remainder rounding: every layer within one weight of rho * n and never emptied, the total
    exactly round(S * N), or a BudgetError when that is impossible without emptying a layer."""
    m = data.draw(st.integers(1, 8))
    n = np.array(data.draw(st.lists(st.integers(1, 5000), min_size=m, max_size=m)), dtype=np.int64)
    rho = np.array(data.draw(st.lists(st.floats(0.0, 0.99), min_size=m, max_size=m)))
    target = float((rho * n).sum() / n.sum())
    want = round(target * float(n.sum()))
    try:
        k = exact_counts(rho, n, target)
    except BudgetError:
        assert want > int(np.minimum(np.ceil(rho * n), n - 1).sum())  # only when it is impossible
        return
    assert int(k.sum()) == want
    assert np.all(np.abs(k - rho * n) <= 1.0) and np.all(k >= 0) and np.all(k <= n - 1)
    native = exact_counts(rho, n)
    assert np.all(native <= n - 1) and np.all(np.abs(native - rho * n) <= 1.0)


def test_a_tied_model_is_planned_and_pruned_once_per_tensor():
    """The generator's tie, fixed: one inventory entry, masks applied once, the copy still tied."""
    torch.manual_seed(0)
    model = RandomNet(nn.Flatten(), [Residual(32, norm=True, tied=True)], nn.Linear(32, 3)).eval()
    layers = mm.inventory(model)
    (tied,) = [layer for layer in layers if layer.aliases]
    assert tied.name == "blocks.0.fc1" and tied.aliases == ("blocks.0.fc2",)
    p = mm.plan(model, signals=("magnitude",), preset={"rules": [{"range": [0.3, 0.6]}],
                                                        "constraints": {"norm": {"role": "norm", "clamp": [0.0, 0.0]}}}, target=0.5)
    check_apply(copy.deepcopy(model), p, p.strategies[0], set())
