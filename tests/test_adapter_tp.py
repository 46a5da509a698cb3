"""Torch-Pruning adapter: group ratios, every REFERENCE section 4 trap, and consistency per model family.

Consistency is checked independently of ``prune(verify=True)``: on inputs the pruner never saw,
the physically pruned model must equal the original model with the removed channels zeroed.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
import torch_pruning as tp
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import torch_pruning as mtp
from mixmatch_plugin.adapters.torch_pruning.planning import fold_ratio
from mixmatch_plugin.adapters.torch_pruning.verify import relative_difference
from mixmatch_plugin.errors import MixMatchError

from .helpers import small_swin, small_vit, uniform_strategy

timm = pytest.importorskip("timm")


# ------------------------------------------------------------------------------------------- helpers
def _timm(name: str, **kw):
    def make():
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10, **kw)

    return make


_SMALL_DEIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)
FAMILIES = {
    "resnet18": (_timm("resnet18"), (3, 32, 32)),
    "resnet50": (_timm("resnet50"), (3, 32, 32)),
    "convnext_atto": (_timm("convnext_atto"), (3, 32, 32)),
    "efficientnet_b0": (_timm("efficientnet_b0"), (3, 32, 32)),
    "mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), (3, 32, 32)),
    "regnetx_002": (_timm("regnetx_002"), (3, 32, 32)),
    "vit": (lambda: small_vit(init_values=0.1), (1, 16, 16)),  # with layer-scale gammas
    "deit": (_timm("deit_tiny_patch16_224", **_SMALL_DEIT), (3, 32, 32)),
    "deit_distilled": (_timm("deit_tiny_distilled_patch16_224", **_SMALL_DEIT), (3, 32, 32)),
    "swin": (small_swin, (1, 28, 28)),
}
STRATEGIES = ("magnitude:all-max", "gradient:late-heavy", "product:alpha-0.7")


def _batches(shape, n=2, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _plan(model, calib, target=0.4):
    rules = mm.load_rules(mm.preset_for(model))
    off = tuple(c for c in ("small_layers",) if c in {x.id for x in rules.constraints})
    return mm.plan(model, calib, target=target, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=off))


_CACHE: dict[str, tuple] = {}


def family(name):
    if name not in _CACHE:
        make, shape = FAMILIES[name]
        model = make().eval()
        calib = _batches(shape)
        _CACHE[name] = (model, shape, calib, _plan(model, calib))
    return _CACHE[name]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class TinyCNN(nn.Module):
    """conv1 (64 ch) -> bn -> relu -> conv2 (16 ch) -> pool -> fc: conv1's group has conv1 as its only producer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


X3 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# -------------------------------------------------------------------------------- consistency, families
# every family with every strategy, except resnet50 (the slowest) with the product strategy only
CASES = [(n, s) for n in FAMILIES for s in STRATEGIES if n != "resnet50" or s == STRATEGIES[2]]


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_pruned_model_equals_original_with_the_same_channels_zeroed(name, strategy):
    model, shape, calib, p = family(name)
    s = p.strategy(strategy)
    before = _state(model)
    res = mtp.prune(model, s, calib[0][0][:4], calib=calib if s.signal != "magnitude" else None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the user's model was modified"
    assert not model.training

    # independent check on inputs the pruner never saw
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(7))
    ref = mtp.zeroed_reference(model, res.removed).eval()
    pruned = res.model.eval()
    with torch.no_grad():
        err = relative_difference(pruned(x), ref(x))
    assert err <= 1e-4, f"{name}/{strategy}: pruned differs from zeroed original by {err:.2e}"
    assert res.report.consistency is not None and res.report.consistency <= 1e-4

    # forward and backward run after pruning
    pruned.zero_grad()
    out = pruned(x)
    nn.functional.cross_entropy(out, torch.zeros(3, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)

    # the plan was realized exactly, and something was pruned
    assert any(g.realized > 0 for g in res.report.groups)
    for g in res.report.groups:
        assert g.realized == pytest.approx(g.planned, abs=1e-9), g.key
        assert g.kept >= 1
    assert res.report.params_after < res.report.params_before
    assert res.report.macs_after < res.report.macs_before
    want = {"magnitude": "GroupMagnitudeImportance(p=1)", "gradient": "GroupGradientImportance",
            "product": "GroupTaylorImportance"}[s.signal]
    assert res.report.importance == want


def test_report_counts_match_torch_pruning():
    model, _, calib, p = family("resnet18")
    res = mtp.prune(model, p.strategy("magnitude:all-max"), calib[0][0][:4])
    x = calib[0][0][:4]
    assert (res.report.macs_before, res.report.params_before) == tuple(int(v) for v in tp.utils.count_ops_and_params(model, x))
    assert (res.report.macs_after, res.report.params_after) == tuple(int(v) for v in tp.utils.count_ops_and_params(res.model, x))
    assert res.report.params_after == sum(q.numel() for q in res.model.parameters())
    text = res.report.summary()
    assert "params" in text and "MACs" in text and "layer4.0.downsample.0" in text
    d = res.report.to_dict()
    assert {"groups", "params_ratio", "macs_ratio", "importance"} <= set(d)


# ------------------------------------------------------------------------------------ group ratios
def test_one_ratio_per_group_is_the_parameter_weighted_mean_of_its_producers():
    model, _, calib, p = family("resnet18")
    s = p.strategy("magnitude:late-heavy")
    plans = mtp.plan_groups(model, s, calib[0][0][:2])
    by_key = {g.key: g for g in plans}
    # the residual group of stage 2 couples the downsample conv and both blocks' conv2 (TP's DependencyGraph)
    g = by_key["layer2.0.downsample.0"]
    assert set(g.producers) == {"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"}
    assert "layer3.0.conv1" in g.consumers and "layer2.1.conv1" in g.consumers
    # stage 1's residual group includes the stem conv
    assert set(by_key["conv1"].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    # each layer's outputs belong to exactly one group
    producers = [n for g in plans for n in g.producers]
    assert len(producers) == len(set(producers))
    for g in plans:
        n = {q: model.get_submodule(q).weight.numel() for q in g.producers}
        mean = sum(s.ratios[q] * n[q] for q in g.producers) / sum(n.values())
        assert g.target == pytest.approx(mean, rel=1e-12)
        assert abs(g.keep - g.channels * (1 - mean)) <= 0.5 + 1e-9  # rounded to the nearest channel
        assert int(g.channels * (1 - g.ratio)) == g.keep  # exact under TP's floor


def test_fold_rules():
    t = {"a": 0.2, "b": 0.8}
    w = {"a": 300, "b": 100}
    assert fold_ratio(t, w, "mean") == pytest.approx(0.35)
    assert fold_ratio(t, w, "min") == 0.2
    assert fold_ratio(t, w, "max") == 0.8
    assert fold_ratio({}, w, "mean") == 0.0
    with pytest.raises(MixMatchError, match="fold must be"):
        fold_ratio(t, w, "median")


def test_ratio_dict_has_one_leaf_module_key_per_group_and_torch_pruning_realizes_it():
    model, _, calib, p = family("resnet18")
    x = calib[0][0][:2]
    s = p.strategy("magnitude:alpha-0.7")
    work = copy.deepcopy(model)
    kw = mtp.pruner_kwargs(work, s, x)
    ratios = kw["pruning_ratio_dict"]
    plans = mtp.plan_groups(work, s, x)
    assert len(ratios) == len(plans)
    for key, r in ratios.items():
        assert isinstance(key, (nn.Conv2d, nn.Linear)) and not list(key.children())  # leaf modules, never strings
        assert type(r) is float and 0.0 <= r < 1.0
    # hand it to Torch-Pruning itself: every group ends at the planned width
    pruner = tp.pruner.MetaPruner(work, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **kw)
    pruner.step()
    assert mtp.attention_head_dims(work) == {}
    for g in plans:
        assert work.get_submodule(g.key).out_channels == g.keep, g.key
    # coupled layers realize one ratio
    g = next(g for g in plans if g.key == "layer3.0.downsample.0")
    assert {work.get_submodule(q).out_channels for q in g.producers} == {g.keep}


def test_your_own_metapruner_on_a_vit_with_pruner_kwargs_and_fix_attention():
    vit = small_vit(num_heads=2, embed_dim=32).eval()
    x = torch.randn(2, 1, 16, 16)
    s = uniform_strategy(vit, 0.5)
    kw = mtp.pruner_kwargs(vit, s, x)
    dims = mtp.attention_head_dims(vit)
    assert dims == {"blocks.0.attn": 16, "blocks.1.attn": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(vit, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **kw).step()
    mtp.fix_attention(vit, dims)
    for blk in vit.blocks:
        assert blk.attn.head_dim == 8 and blk.attn.qkv.out_features == 48
    assert vit(x).shape == (2, 10)
    with pytest.raises(MixMatchError, match="use pruner_kwargs"):
        mtp.pruning_ratio_dict(vit, s, x, options=mtp.TPOptions(prune_heads=True))


def test_pruning_ratio_dict_leaves_the_model_alone():
    model, _, calib, p = family("resnet18")
    model.train()
    try:
        before = _state(model)
        d = mtp.pruning_ratio_dict(model, p.strategy("magnitude:midpoint"), calib[0][0][:2])
        assert all(any(k is m for m in model.modules()) for k in d)  # keyed on the user's own modules
        assert model.training  # TP's tracing switches to eval: restored
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


# ------------------------------------------------------------------------------------ REFERENCE 4 traps
def test_trap_string_keys_raise_and_container_keys_spread_to_norms():
    m = TinyCNN()
    with pytest.raises(AttributeError):  # TP 1.6.1: a string key raises
        tp.pruner.MetaPruner(m, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio_dict={"conv1": 0.5})
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    pr = tp.pruner.MetaPruner(seq, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio_dict={seq: 0.5})
    assert seq[1] in pr.pruning_ratio_dict  # a container key reaches the BatchNorm inside it
    # the adapter's keys are leaf Conv/Linear modules only
    keys = mtp.pruning_ratio_dict(m, uniform_strategy(m, 0.5), X3)
    assert keys and all(isinstance(k, (nn.Conv2d, nn.Linear)) for k in keys)


def test_trap_a_group_that_would_vanish_is_skipped_silently_by_tp_but_clamped_here():
    m = TinyCNN().eval()
    raw = copy.deepcopy(m)
    pr = tp.pruner.MetaPruner(raw, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0,
                              pruning_ratio_dict={raw.conv1: 0.99}, ignored_layers=[raw.fc])
    pr.step()
    assert raw.conv1.out_channels == 64  # 0.99 of 64 keeps int(0.64) = 0 channels: TP prunes nothing
    res = mtp.prune(m, uniform_strategy(m, 0.0, conv1=0.99), X3, options=mtp.TPOptions(max_ratio=0.999))
    assert res.model.conv1.out_channels == 1  # round(0.64) = 1 channel, handed to TP exactly
    res = mtp.prune(m, uniform_strategy(m, 0.0, conv1=0.995), X3, options=mtp.TPOptions(max_ratio=0.999))
    g = next(g for g in res.report.groups if g.key == "conv1")
    assert g.clamped == "min-keep" and g.kept == 1 and res.model.conv1.out_channels == 1


def test_trap_max_pruning_ratio_does_not_cap_the_default_ratio():
    m = TinyCNN().eval()
    raw = copy.deepcopy(m)
    tp.pruner.MetaPruner(raw, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.8,
                         max_pruning_ratio=0.5, ignored_layers=[raw.fc]).step()
    assert raw.conv1.out_channels < 32  # not capped at 50 % (TP issue 448)
    res = mtp.prune(m, uniform_strategy(m, 0.8), X3, options=mtp.TPOptions(max_ratio=0.5))
    for g in res.report.groups:
        assert g.realized <= 0.5 + 1e-9
    assert any(g.clamped == "max_ratio" for g in res.report.groups)


def test_trap_ignored_layers_drops_types_silently():
    m = TinyCNN().eval()
    raw = copy.deepcopy(m)
    tp.pruner.MetaPruner(raw, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
                         ignored_layers=[nn.Linear]).step()
    assert raw.fc.out_features < 10  # the classifier lost classes: the type was ignored silently
    with pytest.raises(MixMatchError, match="silently drops types"):
        mtp.prune(m, uniform_strategy(m, 0.5), X3, options=mtp.TPOptions(ignored_layers=[nn.Linear]))
    res = mtp.prune(m, uniform_strategy(m, 0.5), X3, options=mtp.TPOptions(ignored_layers=[m.conv1]))  # instances work
    assert res.model.conv1.out_channels == 64 and res.model.fc.out_features == 10


def test_trap_round_to_rounds_down_in_tp_and_to_the_nearest_multiple_here():
    m = TinyCNN().eval()
    r = 1 - 15 / 64  # keeps 15 of 64
    raw = copy.deepcopy(m)
    tp.pruner.MetaPruner(raw, X3, importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.0,
                         pruning_ratio_dict={raw.conv1: r}, round_to=8, ignored_layers=[raw.fc]).step()
    assert raw.conv1.out_channels == 8  # floor
    res = mtp.prune(m, uniform_strategy(m, 0.0, conv1=r), X3, options=mtp.TPOptions(round_to=8))
    assert res.model.conv1.out_channels == 16  # nearest multiple
    model, _, calib, p = family("resnet18")
    res = mtp.prune(model, p.strategy("magnitude:all-max"), calib[0][0][:2], options=mtp.TPOptions(round_to=8, verify=False))
    for g in res.report.groups:
        assert g.kept % 8 == 0 and g.kept >= 8, g.key


def test_trap_unwrapped_parameters_must_be_a_list_of_pairs():
    vit = small_vit(init_values=0.1).eval()
    x = torch.randn(2, 1, 16, 16)
    kw = mtp.pruner_kwargs(vit, uniform_strategy(vit, 0.3), x)
    pairs = kw["unwrapped_parameters"]
    assert isinstance(pairs, list) and all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    dims = {id(p): d for p, d in pairs}
    assert dims[id(vit.pos_embed)] == 2 and dims[id(vit.cls_token)] == 2
    assert dims[id(vit.blocks[0].ls1.gamma)] == 0
    with pytest.raises((ValueError, TypeError)):  # a dict, as one might guess from the name, fails
        tp.pruner.MetaPruner(copy.deepcopy(vit), x, importance=tp.importance.GroupMagnitudeImportance(),
                             unwrapped_parameters={vit.pos_embed: 2})


def test_trap_a_failed_step_is_used_up():
    m = TinyCNN().eval()

    class Broken(tp.importance.GroupMagnitudeImportance):
        def __call__(self, group):
            raise RuntimeError("importance failed")

    raw = copy.deepcopy(m)
    pr = tp.pruner.MetaPruner(raw, X3, importance=Broken(), pruning_ratio=0.5, ignored_layers=[raw.fc])
    with pytest.raises(RuntimeError):
        pr.step()
    pr.importance = tp.importance.GroupMagnitudeImportance()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr.step()
    assert raw.conv1.out_channels == 64  # the second step does nothing: the pruner is used up
    before = _state(m)
    with pytest.raises(MixMatchError, match="your model is unchanged"):
        mtp.prune(m, uniform_strategy(m, 0.5), X3, options=mtp.TPOptions(importance=Broken()))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert mtp.prune(m, uniform_strategy(m, 0.5), X3).model.conv1.out_channels == 32  # a fresh pruner each call


def test_trap_channel_group_defaults_are_shared_between_pruners():
    sig = inspect.signature(tp.pruner.BasePruner.__init__)
    default = sig.parameters["out_channel_groups"].default
    vit = small_vit().eval()
    x = torch.randn(2, 1, 16, 16)
    mtp.prune(vit, uniform_strategy(vit, 0.3), x)
    assert default == {}  # the adapter passes fresh dicts
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TP warns about pos_embed/cls_token here
            tp.pruner.MetaPruner(copy.deepcopy(vit), x, importance=tp.importance.GroupMagnitudeImportance(),
                                 num_heads={vit.blocks[0].attn.qkv: 2})
        assert len(default) > 0  # TP wrote into the shared default dict
    finally:
        default.clear()


def test_trap_taylor_needs_a_backward_pass_and_calibration_data():
    m = TinyCNN().eval()
    DG = tp.DependencyGraph().build_dependency(m, X3)
    group = DG.get_pruning_group(m.conv1, tp.prune_conv_out_channels, idxs=list(range(64)))
    with pytest.raises((AttributeError, TypeError)):  # no .grad without loss.backward()
        tp.importance.GroupTaylorImportance()(group)
    with pytest.raises(MixMatchError, match="needs calibration data"):
        mtp.prune(m, uniform_strategy(m, 0.5), X3, options=mtp.TPOptions(importance="taylor"))
    calib = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    res = mtp.prune(m, uniform_strategy(m, 0.5), X3, options=mtp.TPOptions(importance="taylor"), calib=calib)
    assert "BatchNorm" in " ".join(res.report.notes)
    assert all(q.grad is None for q in res.model.parameters())  # calibration gradients are not left behind


def test_gradient_importance_removes_the_channels_with_the_smallest_mean_abs_gradient():
    m = TinyCNN().eval()
    calib = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    s = uniform_strategy(m, 0.0, conv1=0.25)
    s.signal = "gradient"
    res = mtp.prune(m, s, X3, calib=calib)
    work = copy.deepcopy(m)
    params = [q for q in work.parameters()]
    acc = [torch.zeros_like(q) for q in params]
    for b in calib:
        grads = torch.autograd.grad(nn.functional.cross_entropy(work(b[0]), b[1]), params)
        for a, g in zip(acc, grads, strict=True):
            a.add_(g.abs() / len(calib))
    g1, gbn, g2 = acc[0], acc[2], acc[4]  # conv1.weight, bn.weight, conv2.weight
    score = (g1.flatten(1).sum(1) + gbn + g2.transpose(0, 1).flatten(1).sum(1)) / 3
    removed = next(r for r in res.removed if r.target == "conv1" and r.side == "out").idxs
    assert sorted(removed) == sorted(torch.argsort(score)[:16].tolist())


# ------------------------------------------------------------------------------------ architectures
def test_vit_attention_attributes_and_scale_after_head_dim_pruning():
    vit = small_vit(num_heads=4, embed_dim=32).eval()
    x = torch.randn(2, 1, 16, 16)
    res = mtp.prune(vit, uniform_strategy(vit, 0.5), x)
    for blk in res.model.blocks:
        a = blk.attn
        assert a.num_heads == 4
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim
        assert a.attn_dim == a.num_heads * a.head_dim == a.proj.in_features
        assert a.head_dim < 8 and a.scale == pytest.approx(a.head_dim ** -0.5)
    ref = mtp.zeroed_reference(vit, res.removed).eval()
    for fused in (True, False):  # both attention paths of timm
        for blk in res.model.blocks:
            blk.attn.fused_attn = fused
        with torch.no_grad():
            assert relative_difference(res.model(x), ref(x)) <= 1e-4


def test_vit_without_the_scale_fold_changes_the_softmax_temperature():
    vit = small_vit(num_heads=2, embed_dim=32).eval()
    with torch.no_grad():
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(25.0)  # sharp attention, so the temperature matters
    x = torch.randn(2, 1, 16, 16)
    res = mtp.prune(vit, uniform_strategy(vit, 0.5), x)
    ref = mtp.zeroed_reference(vit, res.removed).eval()
    broken = copy.deepcopy(res.model)
    with torch.no_grad():
        for blk in broken.blocks:  # undo the fold: what plain Torch-Pruning + attribute fixes would give
            a = blk.attn
            a.qkv.weight[: a.attn_dim].div_(math.sqrt(a.head_dim / 16))
            if a.qkv.bias is not None:
                a.qkv.bias[: a.attn_dim].div_(math.sqrt(a.head_dim / 16))
        assert relative_difference(res.model(x), ref(x)) <= 1e-4
        assert relative_difference(broken(x), ref(x)) > 1e-3


def test_vit_whole_head_removal():
    vit = small_vit(num_heads=4, embed_dim=32).eval()
    x = torch.randn(2, 1, 16, 16)
    s = uniform_strategy(vit, 0.0, **{"blocks.0.attn.qkv": 0.5, "blocks.1.attn.qkv": 0.25})
    res = mtp.prune(vit, s, x, options=mtp.TPOptions(prune_heads=True))
    a0, a1 = res.model.blocks[0].attn, res.model.blocks[1].attn
    assert (a0.num_heads, a1.num_heads) == (2, 3)
    assert a0.head_dim == a1.head_dim == 8  # whole heads go, their width stays
    assert res.num_heads == {"blocks.0.attn": 2, "blocks.1.attn": 3}
    assert res.report.consistency <= 1e-4


def test_swin_whole_head_removal_keeps_the_kept_heads_bias_columns():
    """Whole heads on a Swin: each relative-position table keeps the columns of the heads kept (before, refused),
    so the pruned model equals the original with those heads zeroed; rebuild() gives the same architecture."""
    sw = small_swin().eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for a in (m for m in sw.modules() if hasattr(m, "relative_position_bias_table")):
            a.relative_position_bias_table.normal_(0.0, 2.0)  # large biases: a wrong column would show
    s = uniform_strategy(sw, 0.0, **{"layers.1.blocks.0.attn.qkv": 0.5, "layers.0.blocks.1.attn.qkv": 0.5})
    res = mtp.prune(sw, s, x, options=mtp.TPOptions(prune_heads=True))
    attns = {n: m for n, m in res.model.named_modules() if hasattr(m, "relative_position_bias_table")}
    assert res.num_heads == {"layers.0.blocks.0.attn": 2, "layers.0.blocks.1.attn": 1, "layers.1.blocks.0.attn": 2,
                             "layers.1.blocks.1.attn": 4}
    assert all(a.relative_position_bias_table.shape[-1] == a.num_heads for a in attns.values())
    assert all(a.qkv.out_features == 3 * a.num_heads * 16 for a in attns.values())  # whole heads of 16 dims go
    assert res.report.consistency <= 1e-4
    fresh = mtp.rebuild(small_swin().eval(), res.history, x, res.num_heads)
    fresh.load_state_dict(res.model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), res.model.eval()(x))
    budget = mtp.prune(sw, None, x, macs=0.6, options=mtp.TPOptions(prune_heads=True))
    assert abs(budget.report.macs_ratio - 0.6) <= 0.01 * 0.6 and budget.report.consistency <= 1e-4


def test_swin_patch_merging_and_relative_position_tables():
    sw = small_swin().eval()
    x = torch.randn(2, 1, 28, 28)
    s = uniform_strategy(sw, 0.4)
    kw = mtp.pruner_kwargs(sw, s, x)
    tables = [m.relative_position_bias_table for m in sw.modules() if hasattr(m, "relative_position_bias_table")]
    assert tables and all(any(t is i for i in kw["ignored_layers"]) for t in tables)
    res = mtp.prune(sw, s, x)
    merges = [m for m in res.model.modules() if type(m).__name__ == "PatchMerging"]
    assert merges
    for m in merges:
        assert m.norm.normalized_shape[-1] == 4 * m.dim == m.reduction.in_features
        assert m.out_dim == m.reduction.out_features
    for (name, m), m0 in zip(res.model.named_modules(), sw.modules(), strict=True):
        if type(m).__name__ == "WindowAttention":
            assert m.qkv.out_features < m0.qkv.out_features, name  # head_dim pruned
            assert m.relative_position_bias_table.shape == m0.relative_position_bias_table.shape
    assert res.report.consistency <= 1e-4
    # without ignoring the tables, qkv never shrinks
    work = copy.deepcopy(sw)
    kw = mtp.pruner_kwargs(work, s, x)
    kw["ignored_layers"] = [i for i in kw["ignored_layers"] if not isinstance(i, nn.Parameter)]
    qkv_before = [m.qkv.out_features for m in work.modules() if type(m).__name__ == "WindowAttention"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(work, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **kw).step()
    assert [m.qkv.out_features for m in work.modules() if type(m).__name__ == "WindowAttention"] == qkv_before


def test_deit_distilled_tuple_head_ignored_and_free_parameters_follow_the_embedding():
    model, _, calib, p = family("deit_distilled")
    assert isinstance(model.get_classifier(), tuple)
    res = mtp.prune(model, p.strategy("magnitude:all-max"), calib[0][0][:2])
    m = res.model
    d = m.patch_embed.proj.out_channels
    assert d < 48
    assert m.head.out_features == 10 and m.head_dist.out_features == 10
    assert m.head.in_features == m.head_dist.in_features == d
    assert m.pos_embed.shape[-1] == m.cls_token.shape[-1] == m.dist_token.shape[-1] == d
    vit = small_vit(init_values=0.1).eval()
    r2 = mtp.prune(vit, uniform_strategy(vit, 0.5), torch.randn(2, 1, 16, 16))
    e = r2.model.patch_embed.proj.out_channels
    assert all(b.ls1.gamma.shape[0] == b.ls2.gamma.shape[0] == e for b in r2.model.blocks)
    assert r2.model.pos_embed.shape[-1] == e


# ------------------------------------------------------------------------------- unsupported layers
def test_unsupported_attention_is_named():
    cait = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=10, depth=1, depth_token_only=1,
                             img_size=32, patch_size=8, embed_dim=48, num_heads=3).eval()
    with pytest.raises(MixMatchError, match=r"unsupported layer blocks\.0\.attn \(TalkingHeadAttn\)"):
        mtp.prune(cait, uniform_strategy(cait, 0.3), torch.randn(2, 3, 32, 32))


def test_layer_that_breaks_the_forward_is_named():
    pf = timm.create_model("poolformer_s12", pretrained=False, num_classes=10).eval()
    before = _state(pf)
    with pytest.raises(MixMatchError, match=r"unsupported layer stages\.0\.blocks\.0\.layer_scale1 \(Scale\)"):
        mtp.prune(pf, uniform_strategy(pf, 0.3), torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in pf.state_dict().items())


def test_inconsistent_pruning_is_refused_with_the_first_differing_layer():
    dn = timm.create_model("densenet121", pretrained=False, num_classes=10, growth_rate=8, block_config=(2, 3),
                           stem_type="").eval()
    with pytest.raises(MixMatchError, match=r"differs from the original with the same channels zeroed.*first layer that differs is features\."):
        mtp.prune(dn, uniform_strategy(dn, 0.4), torch.randn(2, 3, 32, 32))


def test_bad_arguments_are_one_line_errors():
    m = TinyCNN().eval()
    s = uniform_strategy(m, 0.3)
    with pytest.raises(MixMatchError, match="fold must be"):
        mtp.prune(m, s, X3, options=mtp.TPOptions(fold="median"))
    with pytest.raises(MixMatchError, match="round_to"):
        mtp.prune(m, s, X3, options=mtp.TPOptions(round_to=0))
    with pytest.raises(MixMatchError, match="max_ratio"):
        mtp.prune(m, s, X3, options=mtp.TPOptions(max_ratio=1.0))
    with pytest.raises(MixMatchError, match="does not run on example_inputs"):
        mtp.prune(m, s, torch.randn(2, 5, 16, 16))
    bad = uniform_strategy(m, 0.3)
    bad.ratios["nope"] = 0.1
    with pytest.raises(MixMatchError, match="does not have"):
        mtp.prune(m, bad, X3)
