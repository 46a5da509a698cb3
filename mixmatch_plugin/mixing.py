"""Choosing the signal per layer: Mix-and-Match taken literally.

A strategy ranks weights inside every layer by one signal. :func:`mix_signals` instead measures,
layer by layer, which signal hurts least: it prunes *only that layer* at the strategy's ratio under
each candidate signal and keeps the signal with the lowest loss on calibration batches (drawn from
the training split). The result is the same allocation with per-layer signals
(:attr:`Strategy.layer_signals`), so it is pruned, saved and adapted like any other strategy.

Cost: ``layers x signals`` forward passes over ``max_batches`` calibration batches; layers at ratio 0
are skipped. Interactions between layers are ignored, which is why the mixed strategy should be
ranked against the unmixed ones on validation data before it is used.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .batches import LossFn, default_loss, iterate, model_device, to_device
from .layers import Layer, inventory, weight_of
from .masks import layer_mask, prune_count
from .signals import DEFAULT_SIGNALS, Signals
from .strategies import Strategy

logger = logging.getLogger(__name__)


@torch.no_grad()
def mix_signals(
    model: nn.Module,
    strategy: Strategy,
    signals: Signals,
    calib: Iterable[Any],
    *,
    candidates: Sequence[str] = DEFAULT_SIGNALS,
    layers: Sequence[Layer] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 2,
) -> Strategy:
    """The strategy with, for every pruned layer, the candidate signal whose single-layer pruning costs the least loss.

    ``model`` is not modified (a copy is used). Ties keep the strategy's own signal.
    """
    layers = list(layers) if layers is not None else inventory(model)
    work = copy.deepcopy(model).eval()
    device = model_device(work)
    batches = [to_device(b, device) for b in iterate(calib, max_batches)]
    loss_fn = loss_fn or default_loss

    def loss() -> float:
        return sum(float(loss_fn(work, b)) for b in batches) / len(batches)

    have = [c for c in candidates if c in signals.available]
    chosen: dict[str, str] = {}
    gains: list[float] = []
    for layer in layers:
        k = prune_count(strategy.ratios.get(layer.name, 0.0), layer.params)
        if k == 0 or layer.kind == "norm":
            continue
        w = weight_of(work, layer.name)
        original = w.detach().clone()
        costs = {}
        for sig in have:
            w.copy_(original * layer_mask(signals.score(layer.name, sig), k).to(original.dtype))
            costs[sig] = loss()
        w.copy_(original)
        own = strategy.signal if strategy.signal in costs else have[0]
        best = min(costs, key=lambda s: (costs[s], s != own))
        gains.append(costs[own] - costs[best])
        if best != strategy.signal:
            chosen[layer.name] = best
    logger.info("%s: %d of %d pruned layers switch signal (mean single-layer loss gain %.4f)",
                strategy.name, len(chosen), len(gains), sum(gains) / max(len(gains), 1))
    return Strategy(
        name=f"{strategy.name}+mixed", signal=strategy.signal, ratios=dict(strategy.ratios),
        global_sparsity=strategy.global_sparsity, meta={**strategy.meta, "mixed_from": strategy.name},
        layer_signals=chosen,
    )
