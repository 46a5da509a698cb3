"""Shared fixtures: tiny real models and real (digits) data, sized for 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("MIXMATCH_QUIET", "1")
# Two threads at most; under pytest-xdist (the README's `-n 2`) the cores are shared between the workers.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))


@pytest.fixture(scope="session")
def digits():
    from mixmatch_plugin.app import data

    return data.digits(seed=0)


@pytest.fixture(scope="session")
def digits_loaders(digits):
    return digits.loaders(batch_size=64, seed=0)


@pytest.fixture(scope="session")
def calib(digits):
    return digits.calibration(samples=256, batch_size=64, seed=0)


@pytest.fixture()
def tiny_resnet():
    from mixmatch_plugin.models import tiny_resnet

    torch.manual_seed(0)
    return tiny_resnet(num_classes=10, in_chans=1, width=8)


@pytest.fixture(scope="session")
def trained_tiny_resnet(digits_loaders):
    """A tiny ResNet trained briefly on digits (about 10 s): pruning it changes accuracy measurably."""
    from mixmatch_plugin.models import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    train, _, _ = digits_loaders
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    return model
