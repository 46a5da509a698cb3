"""Measured sensitivity: how much each layer alone costs at a grid of sparsities.

For every prunable layer, the layer (and only it) is pruned at each sparsity of a grid by a
signal's masks, and the damage is measured on calibration batches (drawn from the *training* split):
the KL divergence of the pruned model's predictions from the dense model's. The curves are plain data; :func:`mixmatch_plugin.allocation.curve_ratios`
turns them into the allocation that minimises their sum under a budget.

BatchNorm is measured with batch statistics (train mode at momentum 0: the running statistics stay
as they are), which is what re-estimating it after pruning gives, without a re-estimation per point.

Cost: ``layers x grid points x max_batches`` forward passes (no backward), on a copy of the model; each
pass skips the module calls that ran before the measured layer (:class:`~mixmatch_plugin.prefix.PrefixCache`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import batch_size, forward, iterate, model_device, split_batch, to_device
from .layers import Layer, weight_of
from .prefix import PrefixCache
from .progress import progress_bar
from .signals import Signals

logger = logging.getLogger(__name__)

#: Kept fractions of the grid: dense, then denser steps towards the very sparse end.
DENSITIES = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.08, 0.05, 0.035, 0.02, 0.01)


@dataclass(frozen=True)
class Curves:
    """Per-layer damage of pruning that layer alone, at the sparsities of its grid (plain data)."""

    signal: str
    grid: dict[str, tuple[float, ...]]
    cost: dict[str, tuple[float, ...]]
    samples: int
    forwards: int
    seconds: float


def _batch_stats(model: nn.Module) -> None:
    """BatchNorm layers normalise with batch statistics and leave their running statistics alone."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0


def _grid(hi: float) -> tuple[float, ...]:
    pts = sorted({round(1.0 - d, 6) for d in DENSITIES if 1.0 - d < hi - 1e-9} | {0.0, round(hi, 6)})
    return tuple(pts)


@torch.no_grad()
def measure_curves(
    model: nn.Module,
    layers: Sequence[Layer],
    signals: Signals,
    calib: Iterable[Any],
    *,
    signal: str,
    hi: Mapping[str, float],
    max_batches: int = 2,
    progress: bool = False,
) -> Curves:
    """Measure every layer's damage curve under ``signal``'s masks, up to ``hi[layer]`` sparsity.

    ``model`` is not changed (a copy is measured). Layers with ``hi`` 0 (normalization) are skipped.
    """
    t0 = time.perf_counter()
    work = copy.deepcopy(model).eval()
    _batch_stats(work)
    device = model_device(work)
    batches = [to_device(b, device) for b in iterate(calib, max_batches, what="sensitivity")]
    samples = sum(batch_size(b) for b in batches)
    todo = [layer for layer in layers if hi.get(layer.name, 0.0) > 0.0]
    cache = PrefixCache(work, [split_batch(b)[0] for b in batches], forward, [{layer.name} for layer in todo])
    ref = [o.float().log_softmax(-1) for o in cache.outputs]

    def damage(name: str) -> float:
        out = [cache.run(work, i, {name}).float().log_softmax(-1) for i in range(len(batches))]
        return sum(float(torch.nn.functional.kl_div(o, r, log_target=True, reduction="sum")) for o, r in zip(out, ref, strict=True)) / samples

    grid: dict[str, tuple[float, ...]] = {}
    cost: dict[str, tuple[float, ...]] = {}
    forwards = len(batches)
    for layer in progress_bar(todo, "sensitivity", enable=progress):
        w = weight_of(work, layer.name)
        original = w.detach().clone()
        order = torch.argsort(signals.score(layer.name, signal).flatten(), stable=True)
        pts = _grid(hi[layer.name])
        row = [0.0]
        for r in pts[1:]:
            k = min(round(r * layer.params), layer.params - 1)
            flat = original.flatten().clone()
            flat[order[:k]] = 0
            w.copy_(flat.view_as(w))
            row.append(damage(layer.name))
            forwards += len(batches)
        w.copy_(original)
        grid[layer.name], cost[layer.name] = pts, tuple(row)
    seconds = time.perf_counter() - t0
    logger.info("sensitivity of %d layers under %s: %d forward passes over %d samples, %.1f s",
                len(todo), signal, forwards, samples, seconds)
    return Curves(signal, grid, cost, samples, forwards, seconds)
