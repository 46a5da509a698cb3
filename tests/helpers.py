"""Small real models for the tests (no mocks: real timm modules at tiny sizes)."""

from __future__ import annotations

import torch
from torch import nn


def small_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args)


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
