"""Unstructured masks: prune the lowest-scoring fraction of each layer, and apply a strategy to a model.

Masks are boolean *keep* masks with the weight's shape (``True`` = kept), the convention of
``torch.nn.utils.prune``; :func:`to_torch_prune` registers them as ``weight_mask`` buffers for users
of that module. Within a layer, weights are ordered by score with ties broken by position
(a stable sort), so masks are deterministic.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import LossFn
from .errors import MixMatchError, PlanMismatchError
from .layers import Layer, inventory, weight_of
from .signals import Signals, compute_signals
from .strategies import Strategy

logger = logging.getLogger(__name__)


def prune_count(ratio: float, n: int) -> int:
    """Whole weights a layer of ``n`` weights loses at ``ratio`` (round half to even, as numpy's rint),
    at most ``n - 1``: a ratio below 1 never empties a layer (0.96 of 10 weights prunes 9)."""
    return min(round(ratio * n), max(n - 1, 0))


def layer_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the ``k`` lowest-scoring entries of ``score`` (stable on ties)."""
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        keep[torch.argsort(score.flatten(), stable=True)[:k]] = False
    return keep.view_as(score)


class MaskCache:
    """Sorted weight orders per (layer, signal), so many strategies cost one sort per layer and signal."""

    def __init__(self, signals: Signals) -> None:
        self.signals = signals
        self._order: dict[tuple[str, str], torch.Tensor] = {}

    def mask(self, name: str, signal: str, k: int) -> torch.Tensor:
        score = self.signals.score(name, signal)
        if k <= 0:
            return torch.ones_like(score, dtype=torch.bool)
        key = (name, signal)
        if key not in self._order:
            self._order[key] = torch.argsort(score.flatten(), stable=True).to(torch.int32)
        keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
        keep[self._order[key][:k].long()] = False
        return keep.view_as(score)


def check_strategy(
    strategy: Strategy, layers: Sequence[Layer], plan_layers: Sequence[Layer] | None = None, *, complete: bool = True
) -> None:
    """Raise :class:`PlanMismatchError` unless ``strategy`` fits the model whose inventory is ``layers``.

    With ``complete=False`` the strategy may leave layers out (they count as ratio 0).
    """
    names = {layer.name for layer in layers}
    have = set(strategy.ratios)
    if unknown := sorted(have - names):
        raise PlanMismatchError(
            f"strategy {strategy.name!r} names {len(unknown)} layer(s) the model does not have "
            f"(first: {unknown[0]!r}); was the plan made for another model? Regenerate it with `mixmatch plan`"
        )
    if (missing := sorted(n for n in names - have)) and complete:
        raise PlanMismatchError(
            f"the model has {len(missing)} prunable layer(s) the strategy does not cover (first: {missing[0]!r}); "
            "regenerate the plan for this model"
        )
    for name, r in strategy.ratios.items():
        if not (isinstance(r, float) and math.isfinite(r) and 0.0 <= r < 1.0):
            raise MixMatchError(f"strategy {strategy.name!r}: sparsity {r!r} of layer {name!r} must lie in [0, 1)")
    if plan_layers is not None:
        by_name = {layer.name: layer for layer in layers}
        for pl in plan_layers:
            if (cur := by_name.get(pl.name)) is not None and tuple(cur.shape) != tuple(pl.shape):
                raise PlanMismatchError(
                    f"layer {pl.name!r} has shape {tuple(cur.shape)} in the model but {tuple(pl.shape)} in the plan; "
                    "regenerate the plan for this model"
                )


class Masker:
    """A reusable working copy of ``model`` that any strategy can mask cheaply, leaving ``model`` untouched.

    Calling it restores the working copy's original weights (and buffers), applies the strategy's
    masks (one sort per layer and signal, cached) and returns ``(working_copy, masks)``. Used by
    ranking, the benchmark and the Optuna evaluators, so many strategies cost one copy of the model.
    """

    def __init__(self, model: nn.Module, signals: Signals | None = None, *, layers: Sequence[Layer] | None = None) -> None:
        self.layers = list(layers) if layers is not None else inventory(model)
        self.signals = signals if signals is not None else compute_signals(model, layers=self.layers, signals=("magnitude",))
        self.work = copy.deepcopy(model)
        self.original = {k: v.detach().clone() for k, v in self.work.state_dict().items()}
        self.cache = MaskCache(self.signals)

    def __call__(self, strategy: Strategy) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        check_strategy(strategy, self.layers)
        if missing := {strategy.signal, *strategy.layer_signals.values()} - set(self.signals.available):
            raise MixMatchError(
                f"strategy {strategy.name!r} ranks weights by {', '.join(sorted(missing))}, but the scores only hold "
                f"{', '.join(self.signals.available)}: pass signals=compute_signals(model, calib) (or plan.signals)"
            )
        self.work.load_state_dict(self.original)
        masks = compute_masks(self.work, strategy, self.signals, layers=self.layers, cache=self.cache)
        apply_masks(self.work, masks)
        return self.work, masks


def compute_masks(
    model: nn.Module,
    strategy: Strategy,
    signals: Signals | None = None,
    *,
    layers: Sequence[Layer] | None = None,
    cache: MaskCache | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks for every layer the strategy prunes (layers at ratio 0 are omitted)."""
    layers = list(layers) if layers is not None else inventory(model)
    if signals is None:
        if needed := {strategy.signal, *strategy.layer_signals.values()} - {"magnitude"}:
            raise MixMatchError(
                f"strategy {strategy.name!r} ranks weights by {', '.join(sorted(needed))}, which needs calibration "
                "scores: pass signals=compute_signals(model, calib) (or calib=...)"
            )
        signals = compute_signals(model, layers=layers, signals=("magnitude",))
    masks = {}
    for layer in layers:
        k = prune_count(strategy.ratios.get(layer.name, 0.0), layer.params)
        if k == 0:
            continue
        signal = strategy.signal_of(layer.name)
        masks[layer.name] = cache.mask(layer.name, signal, k) if cache is not None else layer_mask(signals.score(layer.name, signal), k)
        if masks[layer.name].shape != tuple(layer.shape):
            raise PlanMismatchError(f"the scores of layer {layer.name!r} do not have its shape; recompute the signals on this model")
    return masks


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked weights in place (permanent)."""
    with torch.no_grad():
        for name, keep in masks.items():
            w = weight_of(model, name)
            w.mul_(keep.to(w.dtype))


@dataclass
class PruneResult:
    """What :func:`apply` returns: the pruned model, its keep-masks and the realized sparsities."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    layer_sparsity: dict[str, float]
    global_sparsity: float


def sparsity_of(
    model: nn.Module, layers: Sequence[Layer], masks: Mapping[str, torch.Tensor] | None = None
) -> tuple[dict[str, float], float]:
    """Fraction of exactly-zero weights per layer and over all inventory weights.

    Zeros of normalization layers are not counted (some models initialise BatchNorm scales to zero;
    those zeros are not sparsity a method created), except the entries ``masks`` removed: a strategy
    prunes norms only when their constraint was switched off, and those weights are its sparsity.
    """
    masks = masks or {}
    per, zeros, total = {}, 0, 0
    for layer in layers:
        w = weight_of(model, layer.name)
        if layer.kind == "norm":
            keep = masks.get(layer.name)
            z = 0 if keep is None else int(torch.count_nonzero(~keep))
        else:
            z = int(torch.count_nonzero(w == 0))
        per[layer.name] = z / layer.params
        zeros += z
        total += layer.params
    return per, zeros / max(total, 1)


def apply(
    model: nn.Module,
    strategy: Strategy,
    *,
    signals: Signals | None = None,
    calib: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    plan_layers: Sequence[Layer] | None = None,
    inplace: bool = False,
    torch_prune: bool = False,
) -> PruneResult:
    """Prune ``model`` by ``strategy``: in each layer, the lowest-scoring ``ratio`` of the weights.

    Args:
        model: the model; copied first unless ``inplace=True``.
        strategy: per-layer ratios and the signal that ranks weights.
        signals: precomputed scores (from :func:`~mixmatch_plugin.compute_signals` or ``plan.signals``).
        calib: calibration batches, used to compute gradient scores when ``signals`` is not given.
        loss_fn: loss for those scores.
        plan_layers: the plan's inventory; when given, layer shapes are checked too.
        inplace: prune the given model instead of a copy.
        torch_prune: register masks with ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``)
            instead of zeroing the weights.

    Raises:
        PlanMismatchError: the strategy names layers the model lacks, misses layers, or shapes differ.
        MixMatchError: a ratio outside [0, 1), or a gradient-based signal without scores or data.
    """
    layers = inventory(model)
    check_strategy(strategy, layers, plan_layers)
    if signals is None and {strategy.signal, *strategy.layer_signals.values()} != {"magnitude"} and calib is not None:
        signals = compute_signals(model, calib, layers=layers, loss_fn=loss_fn)
    masks = compute_masks(model, strategy, signals, layers=layers)
    target = model if inplace else copy.deepcopy(model)
    if torch_prune:
        to_torch_prune(target, masks)
    else:
        apply_masks(target, masks)
    per, glob = sparsity_of(target, layers, masks)
    logger.info("applied %s: global sparsity %.4f", strategy.name, glob)
    return PruneResult(target, masks, per, glob)


def to_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Register keep-masks with ``torch.nn.utils.prune.custom_from_mask`` (``prune.remove`` makes them permanent)."""
    from torch.nn.utils import prune

    for name, keep in masks.items():
        prune.custom_from_mask(model.get_submodule(name), "weight", keep)
