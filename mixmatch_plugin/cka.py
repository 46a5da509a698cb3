"""Linear Centered Kernel Alignment (CKA): biased, debiased, and minibatch, plus penultimate features.

The estimators and why the pruning loops use debiased minibatch CKA are described in ``docs/depth-width.md``.
:func:`penultimate` gives the features the method compares (the classifier's input), :func:`cka_to_parent`
the minibatch CKA of a pruned model against its parent on a loader. All arithmetic is in float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import iterate, model_device, split_batch, to_device
from .errors import MixMatchError

logger = logging.getLogger(__name__)

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------ estimators
def _as_matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise MixMatchError(f"{what} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise MixMatchError(f"{what} must have a batch dimension and features, got shape {tuple(x.shape)}")
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    if not torch.isfinite(x).all():
        raise MixMatchError(f"{what} contains NaN or inf; the model's features are not finite")
    return x - x.mean(0, keepdim=True)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """The linear-kernel Gram matrix ``XXᵀ`` of column-centred float64 features (n×n)."""
    x = _as_matrix(x, "features")
    return x @ x.T


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the papers' name
    """Biased HSIC ``tr(KHLH) / (n-1)²`` of two Gram matrices."""
    n = k.shape[0]
    if n < 2:
        raise MixMatchError(f"biased HSIC needs at least 2 samples, got {n}")
    h = torch.eye(n, dtype=k.dtype, device=k.device) - 1.0 / n
    return float(torch.sum((h @ k @ h) * l)) / (n - 1) ** 2


def hsic_debiased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Unbiased HSIC₁ of two Gram matrices (Song et al., 2012); needs at least 4 samples."""
    n = k.shape[0]
    if n < 4:
        raise MixMatchError(f"debiased HSIC needs at least 4 samples, got {n}")
    k, l = k.clone(), l.clone()  # noqa: E741
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    kl = k @ l
    value = torch.trace(kl) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 * kl.sum() / (n - 2)
    return float(value) / (n * (n - 3))


def _ratio(kl: float, kk: float, ll: float) -> float:
    denom = kk * ll
    if not denom > 0.0:
        raise MixMatchError(
            "CKA is undefined: one of the feature sets has no variance (constant features, or too few samples "
            "for the debiased estimate)"
        )
    return kl / math.sqrt(denom)


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> float:
    """Linear CKA of two feature matrices over the same n inputs (full computation).

    Args:
        x, y: ``(n, ...)`` features; everything after the first dimension is flattened.
        debiased: use the unbiased HSIC₁ estimator (n ≥ 4) instead of the biased one.

    The biased form uses the feature-space identity ``‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖)`` when that is cheaper
    than the n×n Gram matrices; both give the same value.
    """
    xm, ym = _as_matrix(x, "x"), _as_matrix(y, "y")
    if xm.shape[0] != ym.shape[0]:
        raise MixMatchError(f"x and y must describe the same inputs: {xm.shape[0]} rows against {ym.shape[0]}")
    n, p1, p2 = xm.shape[0], xm.shape[1], ym.shape[1]
    if not debiased and p1 * p2 + p1 * p1 + p2 * p2 < 3 * n * n:
        cross = torch.linalg.matrix_norm(ym.T @ xm) ** 2
        return _ratio(float(cross), float(torch.linalg.matrix_norm(xm.T @ xm)) ** 2,
                      float(torch.linalg.matrix_norm(ym.T @ ym)) ** 2)
    k, l = xm @ xm.T, ym @ ym.T  # noqa: E741
    hsic = hsic_debiased if debiased else hsic_biased
    return _ratio(hsic(k, l), hsic(k, k), hsic(l, l))


class MinibatchCKA:
    """Accumulates minibatch linear CKA (Nguyen et al., ICLR 2021) in O(batch²) memory.

    Call :meth:`update` with the two feature sets of each minibatch (same inputs, same order), then
    :meth:`compute`. With ``debiased=True`` (the default) each minibatch contributes its unbiased
    HSIC₁ for the pairs (x, y), (x, x) and (y, y); minibatches with fewer than 4 samples are skipped
    (the estimator is undefined there) and counted in :attr:`skipped`. The three sums are averaged
    over minibatches (plain mean: each minibatch estimate is unbiased on its own).
    """

    def __init__(self, *, debiased: bool = True) -> None:
        self.debiased = debiased
        self.xy = self.xx = self.yy = 0.0
        self.batches = self.samples = self.skipped = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one minibatch: ``x`` and ``y`` are features of the same inputs (first dimension = batch)."""
        xm, ym = _as_matrix(x, "x"), _as_matrix(y, "y")
        if xm.shape[0] != ym.shape[0]:
            raise MixMatchError(f"x and y must describe the same inputs: {xm.shape[0]} rows against {ym.shape[0]}")
        n = xm.shape[0]
        if n < (4 if self.debiased else 2):
            self.skipped += 1
            return
        hsic = hsic_debiased if self.debiased else hsic_biased
        k, l = xm @ xm.T, ym @ ym.T  # noqa: E741
        self.xy += hsic(k, l)
        self.xx += hsic(k, k)
        self.yy += hsic(l, l)
        self.batches += 1
        self.samples += n

    def compute(self) -> float:
        """The CKA of everything added so far."""
        if self.batches == 0:
            raise MixMatchError(
                "no minibatch was usable for CKA (each needs at least 4 samples for the debiased estimate); "
                "use a larger batch size"
            )
        return _ratio(self.xy / self.batches, self.xx / self.batches, self.yy / self.batches)


# -------------------------------------------------------------------------------------------- features
def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    if callable(get):
        with contextlib.suppress(Exception):
            c = get()
            c = c[0] if isinstance(c, (tuple, list)) else c
            if isinstance(c, nn.Module) and any(True for _ in c.parameters()):
                return c
    return next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features the classifier sees, flattened to ``(batch, features)``.

    timm models: ``forward_head(forward_features(x), pre_logits=True)`` (pooled, after the final norm).
    Other models: the input of the classifier (``get_classifier()`` or the last ``nn.Linear``), caught
    with a forward pre-hook while the model runs normally.
    """
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        out = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.reshape(out.shape[0], -1)
    if (head := _classifier(model)) is None:
        raise MixMatchError(
            f"cannot find the classifier of {type(model).__name__} to take penultimate features from; "
            "pass features=<fn(model, x) -> (batch, features)>"
        )
    caught: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        caught.append(inputs[0])

    handle = head.register_forward_pre_hook(hook)
    try:
        model(x)
    finally:
        handle.remove()
    if not caught:
        raise MixMatchError(f"the classifier of {type(model).__name__} did not run; pass features=<fn(model, x)>")
    return caught[-1].reshape(caught[-1].shape[0], -1)


@torch.no_grad()
def cka_to_parent(
    parent: nn.Module,
    child: nn.Module,
    loader: Iterable[Any],
    *,
    debiased: bool = True,
    max_batches: int | None = None,
    features: FeatureFn | None = None,
    parent_features: Sequence[torch.Tensor] | None = None,
) -> float:
    """Minibatch linear CKA between the penultimate features of ``child`` and ``parent`` on ``loader``.

    Both models run in eval mode (their modes are restored). Pass the *validation* loader for any
    choice made from this value. ``parent_features`` (one tensor per batch, as :func:`collect_features`
    returns them for the same loader and ``max_batches``) skips the parent's forward passes.
    """
    feat = features or penultimate
    acc = MinibatchCKA(debiased=debiased)
    was_p, was_c = parent.training, child.training
    parent.eval()
    child.eval()
    device = model_device(child)
    try:
        for i, batch in enumerate(iterate(loader, max_batches, what="CKA")):
            x, _ = split_batch(to_device(batch, device))
            fp = parent_features[i].to(device) if parent_features is not None else feat(parent, x)
            acc.update(fp, feat(child, x))
    finally:
        parent.train(was_p)
        child.train(was_c)
    if acc.skipped:
        logger.debug("CKA skipped %d minibatch(es) with fewer than 4 samples", acc.skipped)
    return acc.compute()


@torch.no_grad()
def collect_features(
    model: nn.Module, loader: Iterable[Any], *, max_batches: int | None = None, features: FeatureFn | None = None
) -> list[torch.Tensor]:
    """Penultimate features of ``model`` per batch of ``loader`` (CPU tensors), for repeated CKA."""
    feat = features or penultimate
    was = model.training
    model.eval()
    device = model_device(model)
    try:
        return [feat(model, split_batch(to_device(b, device))[0]).detach().cpu() for b in iterate(loader, max_batches, what="CKA")]
    finally:
        model.train(was)


# --------------------------------------------------------------------------------------- ranking proxy
@dataclass(frozen=True)
class CKARanked:
    """One strategy's CKA to the dense parent after masking (no fine-tuning), on validation data."""

    strategy: str
    cka: float
    global_sparsity: float


def rank_by_cka(
    model: nn.Module,
    strategies: Sequence[Any],
    val_loader: Iterable[Any],
    *,
    signals: Any = None,
    debiased: bool = True,
    max_batches: int | None = None,
    features: FeatureFn | None = None,
    progress: bool = False,
) -> list[CKARanked]:
    """Rank Mix-and-Match strategies by the CKA of the masked model to the dense one, best first.

    ``model`` is not changed: each strategy masks a working copy (as :func:`mixmatch_plugin.rank`
    does). Pass the validation loader, never the test loader.
    """
    import copy

    from .layers import inventory
    from .masks import MaskCache, apply_masks, compute_masks
    from .progress import progress_bar
    from .signals import compute_signals

    layers = inventory(model)
    if signals is None:
        signals = compute_signals(model, layers=layers, signals=("magnitude",))
    cache = MaskCache(signals)
    ref = collect_features(model, val_loader, max_batches=max_batches, features=features)
    work = copy.deepcopy(model)
    original = {k: v.clone() for k, v in work.state_dict().items()}
    out = []
    for s in progress_bar(strategies, "rank by CKA", enable=progress):
        work.load_state_dict(original)
        apply_masks(work, compute_masks(work, s, signals, layers=layers, cache=cache))
        value = cka_to_parent(model, work, val_loader, debiased=debiased, max_batches=max_batches,
                              features=features, parent_features=ref)
        out.append(CKARanked(s.name, value, s.global_sparsity))
    out.sort(key=lambda r: -r.cka)
    return out
