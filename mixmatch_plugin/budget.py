"""Moving per-layer sparsities to a global budget (the "globally guided" mode).

All functions work on numpy vectors over the layers of an inventory: ``n`` (weights per layer),
``lo``/``hi`` (ranges) and ``floor``/``ceil`` (hard bounds).

* :func:`move_to_budget` shifts a strategy in log-odds, ``rho_l(t) = clip(sigmoid(logit(rho_l) + t), lo_l, hi_l)``,
  and solves for the one ``t`` that meets the budget. The shift keeps each strategy's shape: layer
  order is kept, ratios never leave ``[0, 1)``, layers at their range ends stay there, and layers a
  strategy leaves dense start moving only once the others are near their range ends.
* :func:`extend_ranges` moves the ranges themselves (one common log-odds shift of both ends, or where that
  saturates one common factor on every kept fraction, inside the hard bounds) when the budget lies outside what
  the ranges can reach.
* :func:`exact_counts` rounds ratios to whole weights so that the global count is met exactly.
* :func:`removal_path` and :func:`closest_prefix`: channel groups (structured pruning) under a cost budget,
  from measured loss curves, greedily on their convex hulls; any budget's allocation is a prefix of one path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import BudgetError

_EPS = 1e-3  # a strategy's dense layers enter the log-odds shift at this sparsity


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def reachable(n: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    """The interval of global sparsity that ratios inside ``[lo, hi]`` can reach."""
    total = float(n.sum())
    return float((n * lo).sum()) / total, float((n * hi).sum()) / total


def _solve(fn: Callable[[float], float], target: float, lo_t: float = -40.0, hi_t: float = 40.0, iters: int = 90) -> float:
    """Bisection for the ``t`` with ``fn(t) = target``, ``fn`` non-decreasing."""
    for _ in range(iters):
        mid = 0.5 * (lo_t + hi_t)
        if fn(mid) < target:
            lo_t = mid
        else:
            hi_t = mid
    return 0.5 * (lo_t + hi_t)


def move_to_budget(
    rho: np.ndarray, n: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float, offset: np.ndarray | float = 0.0
) -> np.ndarray:
    """Shift ``rho`` in log-odds so that ``sum(n * rho) / sum(n) == target``, staying inside ``[lo, hi]``.

    ``offset`` (per layer, in log-odds) is added before the common shift: it moves budget between layers.

    Raises:
        BudgetError: ``target`` lies outside :func:`reachable` ``(n, lo, hi)``.
    """
    a, b = reachable(n, lo, hi)
    if not (a - 1e-12 <= target <= b + 1e-12):
        raise BudgetError(
            f"target sparsity {target:.4f} is outside the reachable interval [{a:.4f}, {b:.4f}] of these ranges; "
            "choose a target inside it, or let the ranges move (on_unreachable='extend', CLI --extend-ranges)"
        )
    z = _logit(rho) + offset
    total = float(n.sum())

    def glob(t: float) -> float:
        return float((n * np.clip(_sigmoid(z + t), lo, hi)).sum()) / total

    t = _solve(glob, target)
    return np.clip(_sigmoid(z + t), lo, hi)


@dataclass(frozen=True)
class Extension:
    """How :func:`extend_ranges` moved the ranges: ``log-odds`` (both ends shifted by ``amount``) or ``density``
    (every kept fraction scaled by ``exp(-amount)``)."""

    kind: Literal["log-odds", "density"]
    amount: float

    def __str__(self) -> str:
        if self.kind == "log-odds":
            return f"every range was moved by {self.amount:+.2f} in log-odds"
        return f"every range's kept fraction was scaled by {math.exp(-self.amount):.3g}"


def extend_ranges(
    n: np.ndarray, lo: np.ndarray, hi: np.ndarray, floor: np.ndarray, ceil: np.ndarray, target: float
) -> tuple[np.ndarray, np.ndarray, Extension]:
    """Move every range by one common step until the ranges' midpoints meet ``target``.

    First both ends shift by one log-odds step ``u``; an end at exactly 0 stays at 0. Where the ends at 0 keep
    the midpoints from the target however far the others move (the authors' LeViT ranges start at 0 for every
    role but one, and at 70 % the shift drove that one, the attention projection's [0.5, 0.8], to the ceiling
    while the rest stayed), every range's kept fraction is scaled instead, ``1 - r -> (1 - r) * k``, ends at 0
    included: the rules' proportions between layers hold. (Downwards the shift cannot saturate: every positive end
    can reach 0.) Layers with ``lo == hi`` (fixed) stay; the result is clipped into the hard bounds. Returns
    ``(lo', hi', how)``.

    Raises:
        BudgetError: not even the hard bounds can reach ``target``.
    """
    a, b = reachable(n, floor, ceil)
    if not (a - 1e-12 <= target <= b + 1e-12):
        raise BudgetError(
            f"target sparsity {target:.4f} cannot be reached even at the hard bounds: reachable is [{a:.4f}, {b:.4f}]; "
            "switch constraints off (--no-constraint ID) or choose a target inside"
        )
    free = hi > lo

    def mid(ends: tuple[np.ndarray, np.ndarray]) -> float:  # the ranges' midpoint: the middle of what they reach
        return sum(reachable(n, *ends)) / 2

    up = target > mid((lo, hi))

    def shifted(t: float) -> tuple[np.ndarray, np.ndarray]:
        new_lo = np.where((lo > 0) & free, _sigmoid(_logit(lo) + t), lo)
        new_hi = np.where((hi > 0) & free, _sigmoid(_logit(hi) + t), hi)
        return np.clip(new_lo, floor, ceil), np.clip(new_hi, floor, ceil)

    def scaled(k: float) -> tuple[np.ndarray, np.ndarray]:
        return (np.clip(np.where(free, 1.0 - (1.0 - lo) * k, lo), floor, ceil),
                np.clip(np.where(free, 1.0 - (1.0 - hi) * k, hi), floor, ceil))

    u = _solve(lambda t: mid(shifted(t)), target)
    ends, how = shifted(u), Extension("log-odds", u)
    if up and abs(mid(ends) - target) > 1e-6:  # the log-odds shift saturated: scale the kept fractions
        s = _solve(lambda x: mid(scaled(1.0 - x)), target, 0.0, 1.0)
        ends, how = scaled(1.0 - s), Extension("density", -math.log(max(1.0 - s, 1e-300)))
    ra, rb = reachable(n, *ends)
    if not (ra - 1e-9 <= target <= rb + 1e-9):
        raise BudgetError(
            f"target sparsity {target:.4f} cannot be reached by moving the ranges (reachable [{ra:.4f}, {rb:.4f}]); "
            "choose a different target or widen the ranges"
        )
    return ends[0], ends[1], how


def exact_counts(rho: np.ndarray, n: np.ndarray, target: float | None = None) -> np.ndarray:
    """Whole numbers of weights to prune per layer; never every weight of a layer.

    Without ``target``: ``round(rho * n)``, at most ``n - 1``. With ``target``: the largest-remainder
    rounding whose total is ``round(target * sum(n))`` exactly (each layer is at most one weight off
    ``rho * n``, and keeps at least one weight: a ratio of 1 is not a strategy).

    Raises:
        BudgetError: the total cannot be met without emptying a layer.
    """
    raw = rho * n
    most = np.maximum(n - 1, 0)
    if target is None:
        return np.minimum(np.rint(raw).astype(np.int64), most)
    k = np.minimum(np.floor(raw).astype(np.int64), most)
    want = round(target * float(n.sum()))
    short = want - int(k.sum())
    if short > 0:
        frac = raw - np.floor(raw)
        order = np.argsort(-frac, kind="stable")
        eligible = order[(frac[order] > 0) & (k[order] < most[order])]
        k[eligible[:short]] += 1
    if int(k.sum()) < want:
        raise BudgetError(
            f"{want} of {int(n.sum())} weights cannot be pruned in whole weights without emptying a layer; lower the target"
        )
    return k


def convex_curve(channels: int, removed: Sequence[int], dloss: Sequence[float]) -> np.ndarray:
    """Loss increase for 0..``channels`` removed channels from measured ``dloss`` at counts ``removed``: made
    non-decreasing (noise is never a gain), their lower convex hull, extended with its last slope."""
    xs = np.array([0, *removed], float)
    ys = np.maximum.accumulate(np.maximum(np.array([0.0, *dloss], float)[np.argsort(xs)], 0.0))
    xs = np.sort(xs)
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2 and (ys[hull[-1]] - ys[hull[-2]]) * (xs[i] - xs[hull[-2]]) >= (ys[i] - ys[hull[-2]]) * (xs[hull[-1]] - xs[hull[-2]]):
            hull.pop()
        hull.append(i)
    hx, hy = xs[hull], ys[hull]
    slope = (hy[-1] - hy[-2]) / (hx[-1] - hx[-2]) if len(hull) > 1 else 0.0
    j = np.arange(channels + 1, dtype=float)
    return np.where(j > hx[-1], hy[-1] + slope * (j - hx[-1]), np.interp(j, hx, hy))


def module_costs(keep: np.ndarray, channels: np.ndarray, cost: np.ndarray, uses: np.ndarray) -> np.ndarray:
    """Each module's cost with ``keep`` of each group's ``channels`` kept: ``cost[m] Π_{g: uses[m, g]} keep_g / C_g``."""
    return cost * np.exp(uses @ np.log(keep / channels))


def removal_path(curves: Sequence[np.ndarray], cost: np.ndarray, uses: np.ndarray, lo: Sequence[int],
                 step: int | Sequence[int] = 1) -> list[tuple[int, int]]:
    """The greedy removal order of channels across groups, ``[(group, channels removed), ...]``, down to ``lo``.

    ``curves[g][j]``: the convex loss increase with ``j`` of group ``g``'s ``C_g`` channels removed. The cost is
    ``Σ_m cost[m] Π_{g: uses[m, g]} keep_g / C_g``, exact for layers whose widths are groups'. Each move takes one
    group to its next multiple of its ``step`` (one for all, or one per group): the one with the least loss increase
    per unit of cost saved, from the exact marginal cost, so coupled groups (a conv between two pruned groups) are
    accounted for.
    """
    size = np.array([len(c) - 1 for c in curves], float)
    keep, low, use = size.copy(), np.asarray(lo, float), np.asarray(uses, float)
    steps = np.broadcast_to(np.asarray(step, float), size.shape)
    path: list[tuple[int, int]] = []
    while True:
        saving = (use.T @ module_costs(keep, size, cost, use)) / keep  # the cost is linear in each keep_g
        s = np.minimum(np.where(keep % steps > 0, keep % steps, steps), keep - low).astype(int)
        r = (size - keep).astype(int)
        loss = np.array([c[ri + si] - c[ri] for c, ri, si in zip(curves, r, s, strict=True)])
        ratio = np.where((s > 0) & (saving > 0), loss / np.maximum(saving * s, 1e-300), np.inf)
        g = int(np.argmin(ratio))
        if not np.isfinite(ratio[g]):
            return path
        keep[g] -= s[g]
        path.append((g, int(s[g])))


def skip_overshoot(path: Sequence[tuple[int, int]], at: int) -> list[tuple[int, int]]:
    """``path`` without its move at ``at`` and that group's later moves: when one group's step jumps across a
    budget, the other groups' later (smaller) steps can land closer. Each group's moves depend only on its own
    width, so the moves kept stay valid."""
    g = path[at][0]
    return [*path[:at], *(m for m in path[at + 1:] if m[0] != g)]


def closest_prefix(n: int, cost: Callable[[int], float], budget: float) -> tuple[int, float]:
    """The prefix length in ``[0, n]`` whose ``cost`` (non-increasing in the length) is closest to ``budget``,
    and its cost, by bisection (about ``log2(n)`` calls of ``cost``)."""
    f = functools.cache(cost)
    lo, hi = 0, n
    while hi - lo > 1 and f(hi) <= budget:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if f(mid) > budget else (lo, mid)
    best = lo if hi - lo <= 1 and f(hi) <= budget and abs(f(lo) - budget) <= abs(f(hi) - budget) else hi
    return best, f(best)
