"""Depth candidates: shape-safe block removal for timm ResNet, ConvNeXt, ViT and Swin; min blocks per stage; scores."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mixmatch_plugin import depth
from mixmatch_plugin.errors import MixMatchError

from .helpers import MLP, small_swin, small_vit

timm = pytest.importorskip("timm")


def small_resnet18(**kw):
    """timm resnet18 layout (2 BasicBlocks per stage) at small widths; deep stem so layer1 keeps its width."""
    torch.manual_seed(0)
    args = dict(num_classes=10, in_chans=1, stem_type="deep", stem_width=4, channels=(8, 16, 32, 64))
    args.update(kw)
    return timm.create_model("resnet18", **args).eval()


def small_resnet50():
    torch.manual_seed(0)
    return timm.create_model("resnet50", num_classes=10, in_chans=1, channels=(16, 32, 64, 128)).eval()


def small_convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", num_classes=10, in_chans=1, dims=(8, 16, 32, 64)).eval()


FAMILIES = {
    # name: (factory, input shape, block class, removable names with the default min_blocks)
    "resnet-basic": (small_resnet18, (1, 16, 16), "BasicBlock", []),
    "resnet-bottleneck": (small_resnet50, (1, 16, 16), "Bottleneck",
                          ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer2.3", "layer3.1",
                           "layer3.2", "layer3.3", "layer3.4", "layer3.5", "layer4.1", "layer4.2"]),
    "convnext": (small_convnext, (1, 32, 32), "ConvNeXtBlock", None),
    "vit": (lambda: small_vit(depth=3).eval(), (1, 16, 16), "Block", ["blocks.0", "blocks.1", "blocks.2"]),
    "swin": (lambda: small_swin().eval(), (1, 28, 28), "SwinTransformerBlock",
             ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0", "layers.1.blocks.1"]),
}


def _x(shape, n=2, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_removing_a_block_keeps_shapes_runs_and_leaves_the_users_model_alone(name):
    make, shape, cls, expected = FAMILIES[name]
    model = make()
    x = _x(shape)
    blocks = depth.find_blocks(model, x)
    assert blocks and all(b.cls == cls for b in blocks)
    removable = depth.removable_blocks(model, x)
    if expected is not None:
        assert [b.name for b in removable] == expected
    if not removable:  # resnet18 layout: 2 blocks per stage, the paper's minimum of 2 leaves nothing
        removable = depth.removable_blocks(model, x, min_blocks=1)
        assert [b.name for b in removable] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = removable[-1].name
    out = depth.remove_blocks(model, [target], example_inputs=x)
    # the user's model is untouched (deep copy) ...
    assert type(model.get_submodule(target)).__name__ == cls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # ... the copy has an identity in its place, runs, trains, and has fewer parameters
    assert isinstance(out.get_submodule(target), depth.IdentityBlock)
    assert depth.removed_blocks(out) == [target]
    y = out(x)
    assert y.shape == model(x).shape
    out.train()
    out(_x(shape, n=4)).sum().backward()
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    # a removed block is counted as removed, not as kept, and cannot be removed twice
    info = {b.name: b for b in depth.find_blocks(out, x)}
    assert info[target].removed and info[target].kind == depth.block_kind(model.get_submodule(target))
    with pytest.raises(MixMatchError, match="already been removed"):
        depth.remove_blocks(out, [target])


def test_inplace_removal_changes_the_given_model():
    model = small_resnet18()
    same = depth.remove_blocks(model, ["layer3.1"], inplace=True)
    assert same is model and isinstance(model.layer3[1], depth.IdentityBlock)


def test_identity_equals_the_resnet_block_with_its_residual_branch_zeroed():
    """The paper zeroes a block; a BasicBlock ends in ReLU(x + f(x)) on a non-negative input, so identity is exact."""
    model = small_resnet18()
    with torch.no_grad():
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()
    x = _x((1, 16, 16))
    out = depth.remove_blocks(model, ["layer2.1"])
    assert torch.allclose(out(x), model(x), atol=1e-6)


def test_min_blocks_per_stage_counts_unremovable_blocks_as_kept():
    model = small_resnet50()  # stages of 3, 4, 6, 3 blocks; layer2-4 start with a downsample block
    x = _x((1, 16, 16))
    per_stage = {}
    for b in depth.removable_blocks(model, x, min_blocks=2):
        per_stage[b.stage] = per_stage.get(b.stage, 0) + 1
    assert per_stage == {"layer1": 3, "layer2": 3, "layer3": 5, "layer4": 2}  # candidates now, one at a time
    work = model
    removed = []
    while True:
        cands = depth.removable_blocks(work, x, min_blocks=2)
        if not cands:
            break
        work = depth.remove_blocks(work, [cands[0].name])
        removed.append(cands[0].name)
    kept = {}
    for b in depth.find_blocks(work, x):
        if not b.removed:
            kept[b.stage] = kept.get(b.stage, 0) + 1
    assert kept == {"layer1": 2, "layer2": 2, "layer3": 2, "layer4": 2}
    assert len(removed) == 16 - 8
    assert depth.removable_blocks(model, x, min_blocks=6) == []  # no stage has 7 blocks
    assert depth.removable_blocks(model, x, min_blocks={"resnet": 5})[0].stage == "layer3"


def test_downsampling_blocks_patch_merging_and_other_modules_are_refused_with_their_type():
    resnet = small_resnet18()
    with pytest.raises(MixMatchError, match=r"layer2\.0.*downsample shortcut"):
        depth.remove_blocks(resnet, ["layer2.0"])
    with pytest.raises(MixMatchError, match="'conv1' is a Sequential, which depth pruning does not support"):
        depth.remove_blocks(resnet, ["conv1"])
    with pytest.raises(MixMatchError, match=r"has no module .layer9\.1."):
        depth.remove_blocks(resnet, ["layer9.1"])
    swin = small_swin().eval()
    with pytest.raises(MixMatchError, match="PatchMerging, which depth pruning does not support"):
        depth.remove_blocks(swin, ["layers.1.downsample"])
    with pytest.raises(MixMatchError, match="MLP has no block that depth pruning supports"):
        depth.removable_blocks(MLP())
    with pytest.raises(MixMatchError, match="min_blocks"):
        depth.removable_blocks(resnet, min_blocks=-1)


def test_identity_block_is_a_timm_block_stand_in():
    swin = small_swin().eval()
    x = _x((1, 28, 28))
    out = depth.remove_blocks(swin, ["layers.1.blocks.1"], example_inputs=x)
    out.layers[1].set_input_size((4, 4), (7, 7))  # Swin stages call set_input_size on every block
    assert out(x).shape == (2, 10)
    vit = depth.remove_blocks(small_vit(depth=2).eval(), ["blocks.0"])
    tokens = torch.randn(2, 17, 32)
    assert torch.equal(vit.blocks[0](tokens, attn_mask=None, is_causal=False), tokens)
    assert vit.forward_features(_x((1, 16, 16)), attn_mask=torch.zeros(17, 17)).shape == (2, 17, 32)


def _batches(shape, n=2, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("method", ["kl", "cka"])
def test_scores_rank_a_block_with_a_zeroed_branch_first_and_leave_the_model_alone(method):
    model = small_resnet18()
    with torch.no_grad():
        for p in model.parameters():  # away from timm's zero-init of the last BN, so every block matters
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.layer3[1].bn2.weight.zero_()
        model.layer3[1].bn2.bias.zero_()
    x = _x((1, 16, 16))
    before = copy.deepcopy(model.state_dict())
    cands = depth.removable_blocks(model, x, min_blocks=1)
    scores = depth.score_blocks(model, _batches((1, 16, 16)), cands, method=method)
    assert set(scores) == {b.name for b in cands}
    assert scores["layer3.1"] == pytest.approx(0.0, abs=1e-9)
    assert all(v > 1e-6 for k, v in scores.items() if k != "layer3.1")
    assert min(scores, key=lambda k: scores[k]) == "layer3.1"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not isinstance(m, depth.IdentityBlock) for m in model.modules())
    with pytest.raises(MixMatchError, match="block score"):
        depth.score_blocks(model, _batches((1, 16, 16)), cands, method="l2")


def test_kl_scores_of_a_trained_model_follow_the_damage(digits_loaders, calib):
    model = small_resnet18()
    train, val, _ = digits_loaders
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(2):
        for xb, yb in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    import mixmatch_plugin as mm

    cands = depth.removable_blocks(model, next(iter(calib))[0][:2], min_blocks=1)
    scores = depth.score_blocks(model, calib, cands)
    assert all(v >= 0 for v in scores.values())
    best = min(scores, key=lambda k: scores[k])
    worst = max(scores, key=lambda k: scores[k])
    acc_best = mm.evaluate(depth.remove_blocks(model, [best]), val).accuracy
    acc_worst = mm.evaluate(depth.remove_blocks(model, [worst]), val).accuracy
    assert acc_best >= acc_worst
