"""Linear CKA: the properties the method relies on, for the biased, debiased and minibatch forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mixmatch_plugin import cka
from mixmatch_plugin.errors import MixMatchError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(p: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=_gen(seed), dtype=torch.float64))
    return q


def _related(n: int = 200, p: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Y is a noisy nonlinear function of X: CKA well inside (0, 1)."""
    g = _gen(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(p, 20, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(n, 20, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_features_with_themselves_is_one(debiased):
    x, _ = _related()
    assert cka.linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)
    acc = cka.MinibatchCKA(debiased=debiased)
    for i in range(0, 200, 50):
        acc.update(x[i:i + 50], x[i:i + 50])
    assert acc.compute() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(debiased):
    x, y = _related()
    base = cka.linear_cka(x, y, debiased=debiased)
    assert 0.2 < base < 0.95
    q = _orthogonal(x.shape[1], 1)
    assert cka.linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(x, y @ _orthogonal(y.shape[1], 2), debiased=debiased) == pytest.approx(base, rel=1e-10)
    assert cka.linear_cka(7.5 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, rel=1e-10)
    # not invariant to an arbitrary (anisotropic) linear map: the property is specific
    d = torch.diag(torch.logspace(-2, 2, x.shape[1], dtype=torch.float64))
    assert abs(cka.linear_cka(x @ d, y, debiased=debiased) - base) > 1e-3


def test_debiased_cka_of_independent_features_is_near_zero_while_biased_is_not_when_n_below_p():
    g = _gen(3)
    n, p = 64, 1000
    biased, debiased = [], []
    for _ in range(5):
        x = torch.randn(n, p, generator=g, dtype=torch.float64)
        y = torch.randn(n, p, generator=g, dtype=torch.float64)
        biased.append(cka.linear_cka(x, y))
        debiased.append(cka.linear_cka(x, y, debiased=True))
    assert min(biased) > 0.8, biased  # drifts towards 1 when n << p
    assert max(abs(v) for v in debiased) < 0.05, debiased
    # with n >> p both agree that independent features are unrelated
    x = torch.randn(1500, 5, generator=g, dtype=torch.float64)
    y = torch.randn(1500, 5, generator=g, dtype=torch.float64)
    assert cka.linear_cka(x, y) < 0.01 and abs(cka.linear_cka(x, y, debiased=True)) < 0.01


def test_biased_feature_form_equals_gram_form():
    x, y = _related(n=40, p=8)
    k, l = cka.gram_linear(x), cka.gram_linear(y)  # noqa: E741
    gram = cka.hsic_biased(k, l) / math.sqrt(cka.hsic_biased(k, k) * cka.hsic_biased(l, l))
    assert cka.linear_cka(x, y) == pytest.approx(gram, rel=1e-10)
    # feature-space formula with column-centred features
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = float(torch.linalg.matrix_norm(yc.T @ xc) ** 2
                   / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)))
    assert cka.linear_cka(x, y) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
def test_minibatch_agrees_with_the_full_computation(debiased):
    x, y = _related(n=600, p=30, seed=5)
    full = cka.linear_cka(x, y, debiased=debiased)
    one = cka.MinibatchCKA(debiased=debiased)
    one.update(x, y)
    assert one.compute() == pytest.approx(full, rel=1e-10)  # one minibatch = the whole data: identical
    acc = cka.MinibatchCKA(debiased=debiased)
    for i in range(0, 600, 150):
        acc.update(x[i:i + 150], y[i:i + 150])
    assert acc.batches == 4 and acc.samples == 600
    # several minibatches: an estimate of the same quantity (debiased: unbiased per batch)
    assert acc.compute() == pytest.approx(full, abs=0.03 if debiased else 0.06)


def test_minibatch_debiased_skips_batches_below_four_samples_and_errors_when_none_is_usable():
    x, y = _related(n=23)
    acc = cka.MinibatchCKA()
    for i in range(0, 23, 10):  # batches of 10, 10, 3
        acc.update(x[i:i + 10], y[i:i + 10])
    assert acc.batches == 2 and acc.skipped == 1
    empty = cka.MinibatchCKA()
    empty.update(x[:3], y[:3])
    with pytest.raises(MixMatchError, match="at least 4 samples"):
        empty.compute()


def test_cka_rejects_mismatched_and_constant_features():
    x, y = _related()
    with pytest.raises(MixMatchError, match="same inputs"):
        cka.linear_cka(x, y[:-1])
    with pytest.raises(MixMatchError, match="no variance"):
        cka.linear_cka(x, torch.ones_like(y))
    with pytest.raises(MixMatchError, match="NaN"):
        cka.linear_cka(x, torch.full_like(y, float("nan")))


def test_penultimate_features_of_timm_and_plain_models(trained_tiny_resnet, digits_loaders):
    from .helpers import MLP

    _, val, _ = digits_loaders
    x = next(iter(val))[0]
    f = cka.penultimate(trained_tiny_resnet, x)
    assert f.shape == (x.shape[0], trained_tiny_resnet.num_features)
    mlp = MLP().eval()
    g = cka.penultimate(mlp, x)
    assert g.shape == (x.shape[0], 64)  # the input of `out`, caught by a pre-hook
    assert torch.allclose(mlp.out(g), mlp(x))


def test_cka_to_parent_is_one_for_the_parent_and_drops_with_damage(trained_tiny_resnet, digits_loaders):
    _, val, _ = digits_loaders
    model = trained_tiny_resnet
    assert cka.cka_to_parent(model, model, val) == pytest.approx(1.0, abs=1e-9)
    import copy

    light, heavy = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for m, scale in ((light, 0.05), (heavy, 1.0)):
            g = _gen(0)
            for p in m.parameters():
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    a = cka.cka_to_parent(model, light, val)
    b = cka.cka_to_parent(model, heavy, val)
    assert 1.0 > a > b
    ref = cka.collect_features(model, val)
    assert cka.cka_to_parent(model, light, val, parent_features=ref) == pytest.approx(a, rel=1e-12)
    assert not model.training and isinstance(model, nn.Module)


def test_rank_by_cka_orders_strategies_and_leaves_the_model_alone(trained_tiny_resnet, digits_loaders, calib):
    import mixmatch_plugin as mm

    _, val, _ = digits_loaders
    model = trained_tiny_resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = mm.plan(model, calib, target=0.6, on_unreachable="extend", signals=("magnitude",),
                options=mm.PlanOptions(shapes=("all-min", "midpoint", "late-heavy")))
    ranked = cka.rank_by_cka(model, p.strategies, val, signals=p.signals)
    assert [r.cka for r in ranked] == sorted((r.cka for r in ranked), reverse=True)
    assert {r.strategy for r in ranked} == {s.name for s in p.strategies}
    assert all(r.cka < 1.0 for r in ranked)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank_with_key_cka_is_the_cka_ranking_option(trained_tiny_resnet, digits_loaders, calib):
    import mixmatch_plugin as mm

    _, val, _ = digits_loaders
    model = trained_tiny_resnet
    p = mm.plan(model, calib, target=0.6, on_unreachable="extend", signals=("magnitude",),
                options=mm.PlanOptions(shapes=("all-min", "midpoint", "late-heavy", "early-heavy")))
    by_key = mm.rank(model, p.strategies, val, signals=p.signals, key="cka")
    direct = cka.rank_by_cka(model, p.strategies, val, signals=p.signals)
    assert [r.strategy for r in by_key] == [r.strategy for r in direct]
    assert [r.cka for r in by_key] == pytest.approx([r.cka for r in direct], rel=1e-12)
    by_acc = {r.strategy: r for r in mm.rank(model, p.strategies, val, signals=p.signals)}
    assert all(r.accuracy == by_acc[r.strategy].accuracy and by_acc[r.strategy].cka is None for r in by_key)
    with pytest.raises(ValueError, match="'accuracy', 'loss' or 'cka'"):
        mm.rank(model, p.strategies, val, signals=p.signals, key="kl")
