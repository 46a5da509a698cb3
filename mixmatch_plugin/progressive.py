"""Progressive connection sensitivity: SNIP's ``|w * dL/dw|`` rescored on the pruned model, round after round.

One-shot SNIP scores every weight once, on the dense model, and removes the whole budget in one step. At
high sparsity that step removes weights whose importance only shows once their neighbours are gone, and
keeps weights that stop mattering. Iterative SNIP (de Jorge et al., *Progressive Skeletonization*, ICLR
2021) reaches the target in ``rounds`` steps of equal density ratio, rescoring the masked model each
time. Its one global threshold per round lets the layers trade budget as the network thins, so it gives
both an allocation (how many weights each layer keeps) and masks (which ones).

:func:`progressive_scores` encodes both as one score per weight, higher kept longer: a weight removed in
round ``r`` (1-based) scores in ``[r - 1, r)``, ordered by its score in that round; a weight that survives
scores in ``[rounds, rounds + 1)``. The lowest ``counts[layer]`` scores of a layer are exactly the
removed weights, and a smaller sparsity in a layer keeps the weights removed last. BatchNorm statistics
are re-estimated on the calibration batches after each round, so the next gradients see a consistent
network. The user's model is not changed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .baselines import budget_weights, eligible, threshold_counts
from .batches import LossFn, iterate
from .errors import MixMatchError
from .evaluation import reestimate_bn
from .layers import Layer, weight_of
from .progress import progress_bar
from .signals import Signals, compute_signals

logger = logging.getLogger(__name__)


def progressive_scores(
    model: nn.Module,
    calib: Iterable[Any],
    layers: Sequence[Layer],
    target: float,
    *,
    rounds: int = 10,
    hi: Mapping[str, float] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    dense: Signals | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per-weight progressive scores (see the module doc) and the weights each layer loses at ``target``.

    Args:
        layers: the inventory; normalization layers, and layers whose ``hi`` is 0, stay dense.
        target: the global sparsity reached in the last round (over all of ``layers``' weights).
        rounds: rescoring rounds; round ``r`` prunes to ``1 - (1 - target) ** (r / rounds)``. Each costs one
            forward+backward pass over ``calib``.
        hi: per-layer sparsity caps (a layer keeps at least ``1 - hi`` of its weights); default none.
        dense: the dense model's signals on the same ``calib`` batches (with gradients), if at hand: the first
            round's scores are SNIP's, so they are reused instead of computed again.

    Raises:
        MixMatchError: ``rounds`` below 1, or a target the caps cannot reach.
    """
    if rounds < 1:
        raise MixMatchError(f"progressive rounds must be at least 1, got {rounds}")
    caps = dict(hi or {})
    pruned_layers = [x for x in eligible(layers) if caps.get(x.name, 1.0) > 0.0]
    work = copy.deepcopy(model).eval()
    weights = {x.name: weight_of(work, x.name) for x in pruned_layers}
    keep = {n: torch.ones(w.numel(), dtype=torch.bool) for n, w in weights.items()}
    out = {x.name: torch.zeros(x.params, dtype=torch.float64) for x in pruned_layers}
    batches = list(iterate(calib, max_batches))
    floors = {x.name: max(1, round((1.0 - caps.get(x.name, 1.0)) * x.params)) for x in pruned_layers}
    if budget_weights(layers, target) > sum(x.params - floors[x.name] for x in pruned_layers):
        raise MixMatchError(f"target {target} cannot be reached within the layers' caps (hi); lower it")
    counts: dict[str, int] = {}
    for r in progress_bar(range(1, rounds + 1), "progressive", enable=progress):
        goal = budget_weights(layers, 1.0 - (1.0 - target) ** (r / rounds))
        if r > 1:  # BatchNorm statistics of the network the last round left (none needed after the final round)
            reestimate_bn(work, batches, len(batches))
        if r == 1 and dense is not None and dense.gradient is not None and dense.batches == len(batches):
            signals = dense
        else:
            signals = compute_signals(work, batches, layers=pruned_layers, signals=("product",), loss_fn=loss_fn)
        scores = {}
        for x in pruned_layers:
            s = signals.score(x.name, "product").flatten().double().abs()
            s[~keep[x.name]] = -1.0  # removed before: the lowest, always counted first
            s[torch.topk(s, floors[x.name]).indices] = float("inf")  # the cap: the best stay
            scores[x.name] = s
        counts = threshold_counts(scores, [goal])[0]
        with torch.no_grad():
            for x in pruned_layers:
                s, n = scores[x.name], counts[x.name]
                order = torch.argsort(s, stable=True)
                new = order[:n][keep[x.name][order[:n]]]  # removed in this round, in score order
                out[x.name][new] = (r - 1) + torch.arange(len(new), dtype=torch.float64) / max(len(new), 1)
                keep[x.name][order[:n]] = False
                weights[x.name].mul_(keep[x.name].view_as(weights[x.name]).to(weights[x.name].dtype))
        logger.debug("progressive round %d: %d weights removed", r, sum(counts.values()))
    for x in pruned_layers:  # the survivors, ordered by their last score
        s = scores[x.name]
        alive = torch.nonzero(keep[x.name]).flatten()
        rank = torch.argsort(torch.argsort(s[alive], stable=True), stable=True).double()
        out[x.name][alive] = rounds + rank / max(len(alive), 1)
    return {x.name: out[x.name].view_as(weights[x.name]) for x in pruned_layers}, counts
