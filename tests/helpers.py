"""Small real models for the tests (no mocks: real timm modules at tiny sizes)."""

from __future__ import annotations

import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.strategies import Strategy


def small_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


def uniform_strategy(model, ratio, **overrides):
    """A strategy that gives every layer ``ratio`` (norms 0), with per-layer overrides."""
    ratios = {layer.name: (0.0 if layer.kind == "norm" else float(ratio)) for layer in mm.inventory(model)}
    ratios.update({k: float(v) for k, v in overrides.items()})
    return Strategy("test:uniform", "magnitude", ratios, 0.0)


def small_swin(**kw):
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7)
    args.update(kw)
    return SwinTransformer(**args)


class MLP(nn.Module):
    """A plain model no rule knows: roles must come from type and position."""

    def __init__(self, d_in: int = 256, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.a = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.b = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.bn(self.a(self.flat(x)))))))


class TiedMLP(nn.Module):
    """An MLP whose second and third Linear layers share one weight tensor (tied weights)."""

    def __init__(self, d_in: int = 256, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.a = nn.Linear(d_in, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.c = nn.Linear(hidden, hidden)
        self.c.weight = self.b.weight
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.a(self.flat(x)))
        return self.out(torch.relu(self.c(torch.relu(self.b(h)))))


def tied_mlp(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return TiedMLP(d_in=256 * in_chans, classes=num_classes)
