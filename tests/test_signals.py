"""Signals: values checked against hand computation; the user's model is left untouched; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.errors import MixMatchError, SignalError

from .helpers import MLP


def test_gradient_is_the_mean_of_per_batch_absolute_gradients(calib):
    torch.manual_seed(0)
    m = MLP()
    m.eval()
    s = mm.compute_signals(m, calib)
    expect = torch.zeros_like(m.a.weight)
    batches = list(calib)
    for x, y in batches:
        m.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        expect += m.a.weight.grad.abs()
    expect /= len(batches)
    assert torch.allclose(s.score("a", "gradient"), expect, rtol=1e-5, atol=1e-8)
    assert torch.equal(s.score("a", "magnitude"), m.a.weight.detach().abs())
    assert torch.allclose(s.score("a", "product"), m.a.weight.detach().abs() * expect, rtol=1e-5, atol=1e-9)
    assert s.batches == len(batches) and s.samples == sum(len(y) for _, y in batches)
    means = s.layer_means("gradient")
    assert means["a"] == pytest.approx(float(expect.mean()), rel=1e-5)


def test_user_model_is_not_modified(calib, tiny_resnet):
    tiny_resnet.train()
    before = {k: v.clone() for k, v in tiny_resnet.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny_resnet.named_parameters()}
    tiny_resnet.fc.weight.requires_grad_(False)
    mm.compute_signals(tiny_resnet, calib)
    after = tiny_resnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert tiny_resnet.training
    assert all(p.grad is None for p in tiny_resnet.parameters())
    assert tiny_resnet.fc.weight.requires_grad is False
    assert all(p.requires_grad == flags[n] for n, p in tiny_resnet.named_parameters() if n != "fc.weight")


def test_user_loss_function(calib):
    m = MLP()
    calls = []

    def loss(model, batch):
        calls.append(1)
        x, y = batch
        return nn.functional.nll_loss(torch.log_softmax(model(x), 1), y) * 2.0

    s1 = mm.compute_signals(m, calib, loss_fn=loss)
    s2 = mm.compute_signals(m, calib)
    assert calls and torch.allclose(s1.score("b", "gradient"), 2 * s2.score("b", "gradient"), rtol=1e-4)


def test_empty_calibration_loader_is_an_error():
    with pytest.raises(MixMatchError, match="yielded no batches"):
        mm.compute_signals(MLP(), [])


def test_nan_scores_are_an_error(calib):
    m = MLP()
    with torch.no_grad():
        m.b.weight[0, 0] = float("nan")
    with pytest.raises(SignalError, match="NaN or inf"):
        mm.compute_signals(m, calib, signals=("magnitude",))
    with pytest.raises(SignalError):
        mm.compute_signals(m, calib)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ((torch.randn(4, 1, 16, 16), torch.rand(4)), "integer class indices"),
        ((torch.randint(0, 5, (4, 1, 16, 16)), torch.zeros(4, dtype=torch.long)), "floating point"),
        ((torch.randn(4, 3, 9, 9), torch.zeros(4, dtype=torch.long)), "could not run a batch of shape"),
        ((torch.randn(4, 1, 16, 16),), "must be \\(inputs, labels\\)"),
        ((torch.randn(4, 1, 16, 16), torch.full((4,), 12)), "labels range over"),
    ],
)
def test_malformed_batches_get_clear_errors(batch, match):
    with pytest.raises(MixMatchError, match=match):
        mm.compute_signals(MLP(), [batch])


def test_a_timm_input_size_assertion_gets_the_shape_hint():
    from .helpers import small_vit

    vit = small_vit(img_size=28)  # timm asserts the input size instead of failing in a layer
    with pytest.raises(MixMatchError, match=r"could not run a batch of shape \(4, 1, 16, 16\).*--input-shape"):
        mm.compute_signals(vit, [(torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))])


def test_grasp_is_weight_times_hessian_gradient(calib):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    m.eval()
    batches = list(calib)[:2]
    scores = mm.compute_grasp(m, batches, temperature=1.0)
    w = m[1].weight

    def loss_of(weight):
        return sum(nn.functional.cross_entropy(nn.functional.linear(x.flatten(1), weight, m[1].bias), y) for x, y in batches) / len(batches)

    g = torch.autograd.grad(loss_of(w), w)[0].detach()
    exact = w.detach() * torch.autograd.functional.hvp(loss_of, w.detach(), g)[1]  # double back-propagation
    # a finite difference of gradients: the same scores up to float32 rounding, in the same order
    assert torch.corrcoef(torch.stack([scores["1"].flatten(), exact.flatten()]))[0, 1] > 0.999
    assert torch.allclose(scores["1"], exact, rtol=0.05, atol=1e-2 * float(exact.abs().max()))
    # the signals pass's mean gradient is reused (no pass for g) and gives the same scores
    reused = mm.compute_grasp(m, batches, mean_gradient=mm.compute_signals(m, batches).mean_gradient)
    assert torch.allclose(reused["1"], scores["1"], rtol=0.05, atol=1e-2 * float(exact.abs().max()))
    assert torch.equal(m[1].weight, w)  # the weights are back where they were


def test_grasp_works_through_fused_attention_and_matches_explicit_attention():
    """timm's attention calls scaled_dot_product_attention, whose CPU flash kernel has no double backward."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    m.eval()
    attn = m.blocks[0].attn
    assert attn.fused_attn, f"timm {timm.__version__} no longer fuses attention here: this test would test nothing"
    batches = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    fused = mm.compute_grasp(m, batches)
    attn.fused_attn = False  # the same attention written out (matmul, softmax, matmul)
    explicit = mm.compute_grasp(m, batches)
    assert set(fused) == set(explicit) and any(float(v.abs().sum()) > 0 for v in fused.values())
    for name in fused:
        assert torch.allclose(fused[name], explicit[name], rtol=0.05, atol=1e-2 * float(explicit[name].abs().max()) + 1e-12), name
