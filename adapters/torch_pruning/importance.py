"""Group importances: the strategy's signal mapped onto Torch-Pruning's ``Group -> Tensor`` contract."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.batches import LossFn, default_loss, iterate, model_device, to_device
from mixmatch_plugin.errors import MixMatchError

from .options import IMPORTANCES
from .timm_layers import clear_caches


class GroupGradientImportance(tp.importance.GroupMagnitudeImportance):
    """Group importance from mean absolute gradients ``|dL/dw|`` (the plugin's ``gradient`` signal).

    Same contract as Torch-Pruning's importances: ``__call__(group)`` returns one score per channel of
    the group, the mean over its Conv/Linear/BatchNorm/LayerNorm members. ``scores`` maps a parameter
    to a tensor of its shape (filled by :func:`prune` from the calibration batches).
    """

    def __init__(self, scores: Mapping[nn.Parameter, torch.Tensor], normalizer: str | None = "mean") -> None:
        super().__init__(p=1, group_reduction="mean", normalizer=normalizer)
        self.scores = {id(p): s for p, s in scores.items()}

    def _score(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else self.scores.get(id(p))

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        F = tp.pruner.function
        imps: list[torch.Tensor] = []
        idx_lists: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer: Any = dep.target.module
            fn, root_idxs = dep.handler, group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)):
                continue
            if (s := self._score(getattr(layer, "weight", None))) is None:
                continue
            if fn in (F.prune_conv_out_channels, F.prune_linear_out_channels):
                t = s.transpose(0, 1) if getattr(layer, "transposed", False) else s
                imps.append(t[idxs].flatten(1).sum(1))
            elif fn in (F.prune_conv_in_channels, F.prune_linear_in_channels):
                t = s.flatten(1) if getattr(layer, "transposed", False) else s.transpose(0, 1).flatten(1)
                local = t.sum(1)
                groups = int(getattr(layer, "groups", 1))
                if fn == F.prune_conv_in_channels and groups not in (1, int(getattr(layer, "in_channels", 1))):
                    local = local.repeat(groups)
                imps.append(local[idxs])
            elif fn in (F.prune_batchnorm_out_channels, F.prune_layernorm_out_channels) and s.dim() == 1:
                imps.append(s[idxs])
            else:
                continue
            idx_lists.append(root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, idx_lists), self.normalizer)


def calibrate(model: nn.Module, calib: Iterable[Any], loss_fn: LossFn | None, max_batches: int | None) -> dict[nn.Parameter, torch.Tensor]:
    """Fill ``.grad`` with the gradient of the mean loss and return the mean |grad| per parameter."""
    loss_fn = loss_fn or default_loss
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [to_device(b, device) for b in iterate(calib, max_batches)]
    abs_acc = [torch.zeros_like(p) for p in params]
    sum_acc = [torch.zeros_like(p) for p in params]
    for b in batches:
        clear_caches(model)  # LeViT's eval-mode bias cache would carry the last batch's freed graph into this one
        loss = loss_fn(model, b)
        if not torch.isfinite(loss):
            raise MixMatchError(f"the calibration loss is {float(loss)}; check the data and the model before pruning")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, s, g in zip(abs_acc, sum_acc, grads, strict=True):
            if g is not None:
                a.add_(g.abs())
                s.add_(g)
    clear_caches(model)
    for p, s in zip(params, sum_acc, strict=True):
        p.grad = s / len(batches)
    return {p: a / len(batches) for p, a in zip(params, abs_acc, strict=True)}


def resolve_importance(choice: Any, signal: str) -> tuple[Any, str, bool]:
    """(importance object or None for gradient, its name, whether it needs a backward pass)."""
    if not isinstance(choice, str):
        if not callable(choice):
            raise MixMatchError("importance must be 'auto', 'magnitude', 'taylor', 'gradient' or a tp.importance object")
        return choice, type(choice).__name__, bool(getattr(choice, "needs_grad", isinstance(choice, tp.importance.GroupTaylorImportance)))
    if choice not in IMPORTANCES:
        raise MixMatchError(f"importance must be one of {', '.join(IMPORTANCES)} or a tp.importance object, got {choice!r}")
    if choice == "auto":
        choice = {"magnitude": "magnitude", "gradient": "gradient", "product": "taylor", "progressive": "taylor"}.get(signal, "magnitude")
    if choice == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1), "GroupMagnitudeImportance(p=1)", False
    if choice == "taylor":
        return tp.importance.GroupTaylorImportance(), "GroupTaylorImportance", True
    return None, "GroupGradientImportance", True
