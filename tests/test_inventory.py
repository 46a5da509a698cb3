"""Layer inventory: roles and stages on real timm models, fallbacks, overrides and tied weights."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.errors import MixMatchError

from .helpers import MLP, small_swin, small_vit


def roles(model):
    return {layer.name: layer.role for layer in mm.inventory(model)}


def stages(model):
    return {layer.name: layer.stage for layer in mm.inventory(model)}


def test_resnet_roles_and_stages():
    m = timm.create_model("resnet18", num_classes=10)
    r, s = roles(m), stages(m)
    assert r["conv1"] == "stem" and r["bn1"] == "norm" and r["fc"] == "head"
    assert r["layer1.0.conv1"] == "conv" and r["layer2.0.downsample.0"] == "downsample"
    assert r["layer2.0.downsample.1"] == "norm"
    assert s["layer1.0.conv1"] == 0 and s["layer4.1.conv2"] == 3 and s["conv1"] == 0 and s["fc"] == 3
    inv = mm.inventory(m)
    assert sum(layer.params for layer in inv) == sum(
        p.numel() for n, p in m.named_parameters() if n.endswith("weight")
    )


def test_resnet50_bottleneck_roles():
    r = roles(timm.create_model("resnet50", num_classes=10))
    assert r["layer1.0.conv3"] == "conv" and r["layer1.0.downsample.0"] == "downsample" and r["fc"] == "head"


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("convnext_atto", {"stem.0": "stem", "stages.0.blocks.0.conv_dw": "dwconv", "stages.0.blocks.0.mlp.fc1": "mlp_fc1",
                           "stages.0.blocks.0.mlp.fc2": "mlp_fc2", "stages.1.downsample.1": "downsample",
                           "stages.1.downsample.0": "norm", "head.fc": "head", "head.norm": "norm"}),
        ("efficientnet_b0", {"conv_stem": "stem", "bn1": "norm", "blocks.0.0.conv_dw": "dwconv",
                             "blocks.1.0.conv_pw": "conv", "conv_head": "conv", "classifier": "head"}),
        ("mobilenetv3_small_100", {"conv_stem": "stem", "blocks.0.0.conv_dw": "dwconv", "classifier": "head"}),
        ("regnetx_002", {"stem.conv": "stem", "s1.b1.conv2.conv": "conv", "s1.b1.downsample.conv": "downsample",
                         "head.fc": "head"}),
    ],
)
def test_cnn_family_roles(name, expect):
    r = roles(timm.create_model(name, num_classes=10))
    for layer, role in expect.items():
        assert r[layer] == role, (layer, r[layer], role)


def test_cnn_family_stages():
    s = stages(timm.create_model("regnetx_002", num_classes=10))
    assert s["s1.b1.conv1.conv"] == 0 and s["s4.b1.conv1.conv"] == 3
    s = stages(timm.create_model("efficientnet_b0", num_classes=10))
    assert s["blocks.0.0.conv_dw"] == 0 and s["blocks.6.0.conv_pw"] == 6 and s["classifier"] == 6


def test_vit_deit_and_distilled_roles():
    r = roles(small_vit())
    assert r["patch_embed.proj"] == "stem" and r["blocks.0.attn.qkv"] == "attn_qkv"
    assert r["blocks.0.attn.proj"] == "attn_proj" and r["blocks.1.mlp.fc1"] == "mlp_fc1"
    assert r["blocks.1.mlp.fc2"] == "mlp_fc2" and r["head"] == "head" and r["norm"] == "norm"
    d = timm.create_model("deit_tiny_distilled_patch16_224", depth=1, num_classes=10, img_size=32)
    rd = roles(d)
    assert rd["head"] == "head" and rd["head_dist"] == "head" and rd["blocks.0.attn.qkv"] == "attn_qkv"
    assert stages(small_vit())["blocks.1.attn.qkv"] == 1


def test_swin_roles_and_stages():
    m = small_swin()
    r, s = roles(m), stages(m)
    assert r["patch_embed.proj"] == "stem" and r["patch_embed.norm"] == "norm"
    assert r["layers.1.downsample.reduction"] == "downsample" and r["layers.1.downsample.norm"] == "norm"
    assert r["layers.0.blocks.1.attn.qkv"] == "attn_qkv" and r["layers.1.blocks.0.attn.proj"] == "attn_proj"
    assert r["head.fc"] == "head"
    assert s["layers.0.blocks.0.mlp.fc1"] == 0 and s["layers.1.blocks.0.mlp.fc1"] == 1 and s["head.fc"] == 1


def test_unknown_model_falls_back_to_type_and_position():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3)
            self.c2 = nn.Conv2d(4, 4, 3)
            self.l1 = nn.Linear(16, 8)
            self.l2 = nn.Linear(8, 3)

    r = roles(Net())
    assert r == {"c1": "stem", "c2": "conv", "l1": "other", "l2": "head"}
    assert roles(MLP())["out"] == "head" and roles(MLP())["a"] == "other"


def test_role_override_by_pattern():
    m = timm.create_model("resnet18", num_classes=10)
    inv = mm.inventory(m, roles={r"^layer4\.1\.conv2$": "other", r"downsample\.0$": "conv"})
    by = {layer.name: layer.role for layer in inv}
    assert by["layer4.1.conv2"] == "other" and by["layer2.0.downsample.0"] == "conv" and by["conv1"] == "stem"


def test_role_override_errors():
    m = MLP()
    with pytest.raises(MixMatchError, match="matches no layer"):
        mm.inventory(m, roles={"^nothing_here$": "conv"})
    with pytest.raises(MixMatchError, match="unknown role"):
        mm.inventory(m, roles={"^a$": "mlp"})
    with pytest.raises(MixMatchError, match="not a valid regular expression"):
        mm.inventory(m, roles={"(": "conv"})


def test_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.emb.weight

    inv = mm.inventory(Tied())
    names = [layer.name for layer in inv]
    assert names == ["emb", "mid"]
    assert inv[0].aliases == ("out",) and inv[0].role == "embedding"
    assert sum(layer.params for layer in inv) == 20 * 8 + 64


def test_position_is_ordered_and_normalised():
    inv = mm.inventory(timm.create_model("resnet18", num_classes=10))
    pos = [layer.position for layer in inv]
    assert pos[0] == 0.0 and pos[-1] == 1.0 and pos == sorted(pos)


def test_no_prunable_layer_is_an_error():
    m = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(MixMatchError, match="no prunable layer"):
        mm.plan(m, signals=("magnitude",))


def test_inventory_does_not_touch_the_model():
    m = small_vit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    mm.inventory(m)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_the_small_models_are_timm_models_under_both_specs():
    from mixmatch_plugin.models import build_model

    for name in ("tiny_resnet", "resnet18_fmnist", "vit_fmnist", "swin_fmnist", "levit_fmnist"):
        assert timm.is_model(name), name
    levit = build_model("timm:levit_fmnist").eval()
    assert levit(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # padded to the 32 x 32 its attention biases fix
    assert mm.preset_for(levit) == "levit"
    a = build_model("timm:tiny_resnet", model_kwargs={"width": 8})
    b = build_model("mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 8})  # as plans on disk record it
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(mm.MixMatchError, match="no pretrained weights"):
        timm.create_model("swin_fmnist", pretrained=True)
