"""Allocation by evidence inside the rules' limits: pure functions over per-layer vectors.

* :func:`score_ratios`: one global threshold on a signal's scores (raw or LAMP-normalised per layer),
  each layer clipped into ``[lo, hi]``, water-filled to the exact budget. With only normalization
  held dense, raw magnitude, product and LAMP scores give global magnitude, SNIP and LAMP.
* :func:`curve_ratios`: the allocation that minimises the summed measured damage curves
  (:mod:`mixmatch_plugin.sensitivity`) under the budget, exact for their convex hulls.

The limits (``CLIPS``: ``ranges``, ``bounds``, ``free``) are a validated choice, not a rule; see
:meth:`mixmatch_plugin.strategies.StrategySpace.limits`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from .budget import reachable
from .errors import BudgetError

Norm = Literal["raw", "lamp"]
Clip = Literal["ranges", "bounds", "free"]
NORMS: tuple[Norm, ...] = ("raw", "lamp")
CLIPS: tuple[Clip, ...] = ("ranges", "bounds", "free")


def lamp(score: torch.Tensor) -> np.ndarray:
    """LAMP scores of one layer, sorted ascending: ``s_u^2 / sum_{v >= u} s_v^2`` (Lee et al., ICLR 2021)."""
    v = score.detach().flatten().double().pow(2).sort().values
    suffix = v.flip(0).cumsum(0).flip(0)
    return torch.where(suffix > 0, v / suffix.clamp_min(1e-300), torch.zeros_like(v)).numpy()


#: Layers larger than this are allocated from a fixed random sample of their scores (the fraction below a
#: threshold is then known to about 0.2 %; the exact budget is met by whole-weight rounding afterwards).
SAMPLE = 65536


@functools.lru_cache(maxsize=256)
def sample_index(n: int) -> torch.Tensor:
    """The ``SAMPLE`` positions sampled from a layer of ``n`` weights: the same for every signal and norm, and drawn
    once per size (a permutation of a 100 M-weight layer costs half a second)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:SAMPLE]


def sorted_scores(score: torch.Tensor, norm: Norm) -> np.ndarray:
    """One layer's scores, normalised by ``norm`` and sorted ascending (float64); large layers sampled."""
    flat = score.detach().flatten()
    if flat.numel() > SAMPLE:
        sample = flat[sample_index(flat.numel())]
        # a sample's suffix sums are SAMPLE/n of the whole layer's: rescale so LAMP scores stay comparable across layers
        return lamp(sample) * (SAMPLE / flat.numel()) if norm == "lamp" else sample.double().abs().sort().values.numpy()
    return lamp(flat) if norm == "lamp" else flat.double().abs().sort().values.numpy()


def _check_reach(n: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float) -> None:
    a, b = reachable(n, lo, hi)
    if not (a - 1e-12 <= target <= b + 1e-12):
        raise BudgetError(f"target sparsity {target:.4f} is outside what the limits reach [{a:.4f}, {b:.4f}]")


def score_ratios(scores: Sequence[np.ndarray | None], n: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 target: float) -> np.ndarray:
    """Per-layer sparsities from one global threshold on ``scores``, clipped into ``[lo, hi]``, meeting ``target``.

    ``scores[i]`` holds layer ``i``'s scores sorted ascending (None: the layer only follows its limits,
    e.g. a normalization layer at ``[0, 0]``). Below the threshold a weight is pruned. The threshold is
    bisected until the clipped fractions prune ``target`` of all weights; the last step between two
    neighbouring thresholds is interpolated, so the budget is met exactly (before rounding to whole
    weights, which :func:`mixmatch_plugin.budget.exact_counts` does).

    Raises:
        BudgetError: ``target`` lies outside what ``[lo, hi]`` can reach.
    """
    total = float(n.sum())
    _check_reach(n, lo, hi, target)
    have = [s for s in scores if s is not None and len(s) and s[-1] > 0]
    if not have:
        raise BudgetError("every score is zero: the signal carries no information for this model")
    smallest = min(float(s[np.searchsorted(s, 0.0, side="right")]) for s in have)
    lo_t, hi_t = math.log(max(smallest, 1e-300)) - 1.0, math.log(max(float(s[-1]) for s in have)) + 1.0

    def frac(log_t: float) -> np.ndarray:
        t = math.exp(log_t)
        f = np.array([0.0 if s is None or not len(s) else np.searchsorted(s, t, side="left") / len(s) for s in scores])
        return np.clip(f, lo, hi)

    def glob(f: np.ndarray) -> float:
        return float((n * f).sum()) / total

    for _ in range(200):
        mid = 0.5 * (lo_t + hi_t)
        if glob(frac(mid)) < target:
            lo_t = mid
        else:
            hi_t = mid
        if hi_t - lo_t < 1e-12:
            break
    f_lo, f_hi = frac(lo_t), frac(hi_t)
    g_lo, g_hi = glob(f_lo), glob(f_hi)
    w = (target - g_lo) / (g_hi - g_lo) if g_hi > g_lo else 1.0
    rho = f_lo + min(max(w, 0.0), 1.0) * (f_hi - f_lo)
    # ties (many equal scores) can leave a step the interpolation does not close: spread the rest over the slack
    rest = (target - glob(rho)) * total
    slack = hi - rho if rest > 0 else rho - lo
    if abs(rest) > 1e-9 and float((n * slack).sum()) > 0:
        rho = rho + np.sign(rest) * slack * min(1.0, abs(rest) / float((n * slack).sum()))
    return rho


def curve_ratios(grid: Sequence[np.ndarray | None], cost: Sequence[np.ndarray | None], n: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray, target: float) -> np.ndarray:
    """Per-layer sparsities that minimise the summed measured cost under the budget, inside ``[lo, hi]``.

    ``grid[i]`` are increasing sparsities of layer ``i`` (starting at 0) and ``cost[i]`` the loss
    increase measured there (None: the layer only follows its limits). Each curve is read as the
    piecewise-linear function through its points, restricted to ``[lo_i, hi_i]``; every layer starts
    at ``lo_i``, and the remaining budget goes to the hull segments with the smallest cost per pruned
    weight, across all layers, the last one in part. Exact for the convex hulls of the curves.

    Raises:
        BudgetError: ``target`` lies outside what ``[lo, hi]`` can reach.
    """
    total = float(n.sum())
    _check_reach(n, lo, hi, target)
    rho = lo.astype(np.float64).copy()
    need = target * total - float((n * rho).sum())
    segments: list[tuple[float, int, float, float]] = []  # (slope, layer, start, end)
    for i, (g, c) in enumerate(zip(grid, cost, strict=True)):
        if g is None or c is None or hi[i] <= lo[i]:
            continue
        xs = np.unique(np.clip(np.concatenate([g, [lo[i], hi[i]]]), lo[i], hi[i]))
        ys = np.interp(xs, g, c)
        for a, b, slope in _hull(xs, ys):
            segments.append((slope / n[i], i, a, b))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, i, a, b in segments:
        if need <= 0:
            break
        take = min(b - a, need / n[i])
        rho[i] += take
        need -= take * n[i]
    return np.clip(rho, lo, hi)


def _hull(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float, float]]:
    """Segments ``(x0, x1, slope)`` of the lower convex hull of the points, left to right."""
    pts: list[tuple[float, float]] = []
    for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
        while len(pts) >= 2:
            (x1, y1), (x2, y2) = pts[-2], pts[-1]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):  # the middle point lies on or above the chord
                pts.pop()
            else:
                break
        pts.append((x, y))
    return [(a[0], b[0], (b[1] - a[1]) / (b[0] - a[0])) for a, b in itertools.pairwise(pts) if b[0] > a[0]]
