"""PrefixCache: reruns with one module changed skip the calls before it, and give exactly a full run's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mixmatch_plugin.prefix import PrefixCache

from .helpers import small_vit

timm = pytest.importorskip("timm")


class SharedReLUNet(nn.Module):
    """In-place ReLUs, one ReLU module called four times (as torchvision's BasicBlock does), a residual add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.b1(self.c1(x)))
        y = self.relu(self.b2(self.c2(x)))
        x = self.relu(self.c3(y) + x)
        return self.fc(self.relu(x).mean((2, 3)))


def _calls(model: nn.Module, fn) -> int:
    """How many convolutions and linear layers ``fn`` computes (a skipped call computes none)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::conv2d", "aten::linear"))


@pytest.mark.parametrize(
    ("build", "shape", "layers"),
    [
        (lambda: small_vit(depth=3), (4, 1, 16, 16), ["blocks.0.attn.qkv", "blocks.1.mlp.fc2", "blocks.2.attn.proj", "head"]),
        (lambda: timm.create_model("resnet18", num_classes=4, in_chans=1), (4, 1, 32, 32),
         ["layer1.0.conv1", "layer3.1.conv2", "layer4.0.downsample.0", "fc"]),
        (SharedReLUNet, (4, 3, 8, 8), ["c2", "c3", "fc"]),
    ],
)
def test_a_rerun_skips_the_prefix_and_equals_a_full_run(build, shape, layers):
    model = build().eval()
    inputs = [torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        cache = PrefixCache(model, inputs, lambda m, x: m(x), [{n} for n in layers])
        assert all(torch.equal(o, model(x)) for o, x in zip(cache.outputs, inputs, strict=True))
        full = _calls(model, lambda: model(inputs[0]))
        for name in layers:
            w = model.get_submodule(name).weight
            saved = w.clone()
            w.mul_(-0.5)  # the change
            for i, x in enumerate(inputs):
                assert torch.equal(cache.run(model, i, {name}), model(x)), name
            fewer = _calls(model, lambda n=name: cache.run(model, 0, {n}))
            w.copy_(saved)
            assert torch.equal(cache.run(model, 0, {name}), cache.outputs[0])  # restored: the dense output again
            assert fewer < full, (name, fewer, full)  # something before the layer was skipped
        assert all(torch.equal(cache.run(model, i, {"nothing.runs"}), o) for i, o in enumerate(cache.outputs))


def test_a_change_of_the_models_own_parameter_skips_nothing():
    vit = small_vit().eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        cache = PrefixCache(vit, [x], lambda m, t: m(t), [{""}, {"blocks.1.mlp.fc1"}])
        vit.pos_embed.add_(1.0)  # a parameter of the root: every call depends on it
        assert _calls(vit, lambda: cache.run(vit, 0, {""})) == _calls(vit, lambda: vit(x))
        assert torch.equal(cache.run(vit, 0, {""}), vit(x))


def test_the_memory_cap_falls_back_to_computing():
    vit = small_vit(depth=3).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        capped = PrefixCache(vit, [x], lambda m, t: m(t), [{"blocks.2.mlp.fc2"}], max_bytes=0)
        assert capped.cached == [{}]
        assert torch.equal(capped.run(vit, 0, {"blocks.2.mlp.fc2"}), vit(x))
