"""Per-layer allocation baselines in the same shape as Mix-and-Match strategies.

Every baseline returns a :class:`~mixmatch_plugin.strategies.Strategy` that prunes exactly
``round(target * N)`` weights, ``N`` being all inventory weights (normalization included and never
pruned), so every method is compared through one code path at exactly matched sparsity.

========================= =====================================================================
``uniform``               every non-normalization layer gets the same ratio (magnitude masks)
``global_magnitude``      one ``|w|`` threshold over all layers (the paper's baseline)
``snip``                  one threshold over ``|w * g|`` (product signal)
``grasp``                 one threshold over GraSP's ``w * Hg`` (needs :func:`compute_grasp`)
``lamp``                  one threshold over LAMP scores ``w_u^2 / sum_{v >= u} w_v^2`` (magnitude masks)
``erk``                   Erdős-Rényi-Kernel densities ``∝ (sum of dims) / (product of dims)`` (magnitude masks)
========================= =====================================================================

Use :data:`REGISTRY` / :func:`make` to build one by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .budget import exact_counts
from .errors import MixMatchError
from .layers import Layer
from .ranges import validate_ratio
from .signals import Signals
from .strategies import Strategy

Baseline = Callable[[Sequence[Layer], Signals, float], Strategy]


def eligible(layers: Sequence[Layer]) -> list[Layer]:
    return [layer for layer in layers if layer.kind != "norm"]


def budget_weights(layers: Sequence[Layer], target: float) -> int:
    target = validate_ratio(target, "target sparsity")
    total = sum(layer.params for layer in layers)
    k = round(target * total)
    cap = sum(layer.params - 1 for layer in eligible(layers))  # every layer keeps at least one weight
    if k > cap:
        raise MixMatchError(
            f"target {target} needs {k} pruned weights but only {cap} can go (outside normalization layers, "
            "one weight kept per layer); lower the target"
        )
    return k


def _strategy(name: str, signal: str, layers: Sequence[Layer], counts: dict[str, int], target: float) -> Strategy:
    ratios = {layer.name: counts.get(layer.name, 0) / layer.params for layer in layers}
    total = sum(layer.params for layer in layers)
    return Strategy(name=name, signal=signal, ratios=ratios, global_sparsity=sum(counts.values()) / total,
                    meta={"method": name, "target": target, "mode": "budget"})


def threshold_counts(scores: dict[str, torch.Tensor], ks: Sequence[int]) -> list[dict[str, int]]:
    """Per-layer counts of the ``k`` globally lowest scores for each ``k`` of ``ks`` (exactly ``k``; ties
    broken in layer order); the scores are gathered once for all of them.

    Each layer's highest-scoring weight is exempt, so no layer is emptied (a ratio of 1 is not a
    strategy); the threshold is global over all the other weights.
    """
    # one dtype for the threshold and the comparisons (float64 LAMP scores rounded to float32 miscount)
    scores = {n: _exempt_top(s.flatten().double()) for n, s in scores.items()} if any(ks) else scores
    flat = torch.cat(list(scores.values())) if any(ks) else None
    out = []
    for k in ks:
        if k == 0 or flat is None:
            out.append(dict.fromkeys(scores, 0))
            continue
        thr = torch.kthvalue(flat, k).values
        below = {n: int((s < thr).sum()) for n, s in scores.items()}
        left = k - sum(below.values())
        counts = {}
        for n, s in scores.items():
            take = min(int((s == thr).sum()), left)
            counts[n] = below[n] + take
            left -= take
        out.append(counts)
    return out


def _exempt_top(s: torch.Tensor) -> torch.Tensor:
    out = s.clone()
    out[int(torch.argmax(s))] = float("inf")
    return out


#: The baselines that set one global threshold on a signal's raw scores, and that signal.
GLOBAL = {"global_magnitude": "magnitude", "snip": "product", "grasp": "grasp"}


def _global(name: str, layers: Sequence[Layer], signals: Signals, targets: Sequence[float]) -> list[Strategy]:
    if name == "grasp" and signals.grasp is None:
        raise MixMatchError("the GraSP baseline needs GraSP scores: signals.grasp = compute_grasp(model, calib)")
    signal = GLOBAL[name]
    ks = [budget_weights(layers, t) for t in targets]
    counts = threshold_counts({layer.name: signals.score(layer.name, signal) for layer in eligible(layers)}, ks)
    return [_strategy(name, signal, layers, c, t) for c, t in zip(counts, targets, strict=True)]


def uniform(layers: Sequence[Layer], signals: Signals | None, target: float) -> Strategy:
    """The same sparsity in every non-normalization layer (single-criterion magnitude pruning)."""
    k = budget_weights(layers, target)
    elig = eligible(layers)
    n = np.array([layer.params for layer in elig], dtype=np.int64)
    r = np.full(len(elig), k / n.sum())
    counts = exact_counts(r, n, k / n.sum())
    return _strategy("uniform", "magnitude", layers, {layer.name: int(c) for layer, c in zip(elig, counts, strict=True)}, target)


def global_magnitude(layers: Sequence[Layer], signals: Signals, target: float) -> Strategy:
    """One ``|w|`` threshold over every non-normalization layer."""
    return _global("global_magnitude", layers, signals, [target])[0]


def snip(layers: Sequence[Layer], signals: Signals, target: float) -> Strategy:
    """One threshold over ``|w| * |dL/dw|`` (connection sensitivity)."""
    return _global("snip", layers, signals, [target])[0]


def grasp(layers: Sequence[Layer], signals: Signals, target: float) -> Strategy:
    """One threshold over GraSP's keep-score ``w * Hg`` (lowest removed)."""
    return _global("grasp", layers, signals, [target])[0]


def lamp(layers: Sequence[Layer], signals: Signals, target: float) -> Strategy:
    """LAMP (Lee et al., ICLR 2021): per-layer normalized squared magnitudes, one global threshold."""
    k = budget_weights(layers, target)
    elig = eligible(layers)
    sorted_scores = {}
    for layer in elig:
        v = signals.score(layer.name, "magnitude").flatten().double().pow(2).sort().values
        suffix = v.flip(0).cumsum(0).flip(0)
        sorted_scores[layer.name] = torch.where(suffix > 0, v / suffix.clamp_min(1e-300), torch.zeros_like(v))
    counts = threshold_counts(sorted_scores, [k])[0]
    return _strategy("lamp", "magnitude", layers, counts, target)


def _erk_raw(layer: Layer) -> float:
    dims = [d for d in layer.shape if d > 0]
    return float(sum(dims)) / float(np.prod(dims))


def erk(layers: Sequence[Layer], signals: Signals | None, target: float) -> Strategy:
    """Erdős-Rényi-Kernel (Evci et al., 2020): density ``∝ (sum of dims) / (product of dims)``.

    Layers whose density would exceed 1 are made dense and the scale is solved again.
    """
    k = budget_weights(layers, target)
    elig = eligible(layers)
    n = np.array([layer.params for layer in elig], dtype=np.float64)
    raw = np.array([_erk_raw(layer) for layer in elig])
    keep_total = n.sum() - k
    dense = np.zeros(len(elig), dtype=bool)
    for _ in range(len(elig) + 1):
        eps = (keep_total - n[dense].sum()) / (raw[~dense] * n[~dense]).sum()
        new = dense | (raw * eps > 1.0)
        if (new == dense).all():
            break
        dense = new
    density = np.where(dense, 1.0, np.clip(raw * eps, 0.0, 1.0))
    counts = exact_counts(1.0 - density, n.astype(np.int64), k / n.sum())
    return _strategy("erk", "magnitude", layers, {layer.name: int(c) for layer, c in zip(elig, counts, strict=True)}, target)


REGISTRY: dict[str, Baseline] = {fn.__name__: fn for fn in (uniform, global_magnitude, snip, grasp, lamp, erk)}


def make(name: str, layers: Sequence[Layer], signals: Signals, target: float) -> Strategy:
    """Build the baseline ``name`` (a key of :data:`REGISTRY`) at ``target`` global sparsity."""
    if (fn := REGISTRY.get(name)) is None:
        raise MixMatchError(f"unknown baseline {name!r}; baselines are {', '.join(REGISTRY)}")
    return fn(layers, signals, target)


def sweep(name: str, layers: Sequence[Layer], signals: Signals, targets: Sequence[float]) -> list[Strategy]:
    """:func:`make` at each of ``targets``; the :data:`GLOBAL` baselines gather their scores once for all."""
    if name in GLOBAL:
        return _global(name, layers, signals, targets)
    return [make(name, layers, signals, t) for t in targets]


def available() -> list[str]:
    """Names of the baselines."""
    return list(REGISTRY)
