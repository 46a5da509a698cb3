"""The settings of the Torch-Pruning adapter, shared by pruning, planning and rebuilding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mixmatch_plugin.batches import LossFn
from mixmatch_plugin.errors import MixMatchError

Fold = Literal["mean", "min", "max"]
ImportanceName = Literal["auto", "magnitude", "taylor", "gradient"]
FOLDS: tuple[Fold, ...] = get_args(Fold)
Threshold = Literal["global", "lamp"]
THRESHOLDS: tuple[Threshold, ...] = get_args(Threshold)
IMPORTANCES: tuple[ImportanceName, ...] = get_args(ImportanceName)
TOKEN_PARAMS = ("pos_embed", "cls_token", "dist_token", "reg_token")


@dataclass(frozen=True)
class TPOptions:
    """How a strategy becomes structured pruning (:func:`~mixmatch_plugin.adapters.torch_pruning.prune`).

    Attributes:
        fold: how a group's producer targets become one ratio (``mean``, ``min``, ``max``).
        round_to: keep channel counts at multiples of this (nearest multiple, at least one multiple).
        max_ratio: no group loses more than this fraction of its channels.
        caps: under a ``macs=`` or ``params=`` budget, lower per-group caps tried besides ``max_ratio``: each
            cap's allocation is zeroed on a copy (BatchNorm re-estimated on the calibration inputs) and the one
            whose outputs lie closest to the dense model's (KL) is kept. The loss curves measure each group
            alone, and taking many groups to their floor together can cost far more than the sum. ``()``
            keeps ``max_ratio`` alone.
        thresholds: under a ``macs=`` or ``params=`` budget with calibration data, allocations by one global
            threshold on the groups' importance, offered to the same KL choice as the caps: ``global`` (raw,
            as Torch-Pruning's ``global_pruning``) and ``lamp`` (LAMP-normalised within each group). ``()``
            keeps the loss curves' allocations alone.
        prune_heads: remove whole attention heads instead of head dimensions (timm ViT/DeiT and Swin).
        ignored_layers: modules or Parameters to keep intact (instances; types are refused).
        ignore_classifier: keep the classifier head(s) (``get_classifier()``, tuples included) intact.
        forward_fn: ``forward_fn(model, example_inputs)`` for models with unusual call signatures.
        importance: ``auto`` (magnitude → L1 group magnitude; product → Taylor; gradient → mean |grad|),
            ``magnitude``, ``taylor``, ``gradient``, or any Torch-Pruning importance object.
        loss_fn, max_batches: the loss and the number of calibration batches for Taylor and gradient importance.
        verify: compare the pruned model with the channel-zeroed original on ``example_inputs`` and raise
            if they differ by more than ``tolerance`` (relative); also runs a backward pass.
        latency_inputs: what a latency budget is timed on (default ``example_inputs``): your deployment batch
            size and layout, e.g. ``torch.randn(64, 3, 224, 224).to(memory_format=torch.channels_last)``.
    """

    fold: Fold = "mean"
    round_to: int | None = None
    max_ratio: float = 0.95
    caps: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5)
    thresholds: tuple[Threshold, ...] = ("global", "lamp")
    prune_heads: bool = False
    ignored_layers: Sequence[Any] | None = None
    ignore_classifier: bool = True
    forward_fn: Callable[..., Any] | None = None
    importance: ImportanceName | Any = "auto"
    loss_fn: LossFn | None = None
    max_batches: int | None = 8
    verify: bool = True
    tolerance: float = 1e-4
    latency_inputs: Any = None

    def check(self) -> None:
        """Raise a one-line :class:`MixMatchError` for a setting out of range."""
        if self.fold not in FOLDS:
            raise MixMatchError(f"fold must be one of {', '.join(FOLDS)}, got {self.fold!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise MixMatchError(f"round_to must be a positive integer or None, got {self.round_to!r}")
        if not (0.0 <= self.max_ratio < 1.0):
            raise MixMatchError(f"max_ratio must lie in [0, 1), got {self.max_ratio!r}")
        if not set(self.thresholds) <= set(THRESHOLDS):
            raise MixMatchError(f"thresholds must be among {', '.join(THRESHOLDS)} (or ()), got {self.thresholds!r}")
        if not all(isinstance(c, (int, float)) and 0.0 <= c < 1.0 for c in self.caps):
            raise MixMatchError(f"caps must be fractions in [0, 1) (or () to try max_ratio alone), got {self.caps!r}")
