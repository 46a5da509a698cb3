"""Strategies: vectors of per-layer target sparsities, sampled systematically from the ranges.

A strategy is not a criterion: it says *how much* each layer is pruned; its ``signal`` says *which*
weights go inside each layer. Every strategy is generated from one interpolation ``alpha`` in
``[0, 1]`` per **group** of layers (group = role and stage, e.g. ``attn_qkv@2``):
``rho_l = lo_l + alpha_g(l) * (hi_l - lo_l)``. So every rule strategy is a point of the Optuna search
space (:mod:`mixmatch_plugin.adapters.optuna`), and searched points are strategies like any other.

The ten shapes per signal (paper, Phase 2):

============== ==================================================================================
all-min        alpha = 0
all-max        alpha = 1
midpoint       alpha = 0.5
alpha-0.3      alpha = 0.3 (likewise alpha-0.7, alpha-0.9)
sensitivity    replaces the paper's alpha-0.5, which *is* the midpoint. Groups are ranked by the
               fraction of their score mass that the midpoint ratio would remove (under the
               strategy's own signal); the least damaged group gets alpha = 1, the most damaged 0,
               linearly by rank. The one shape that differs between signals.
size-proportional  alpha = min(1, 0.1 * |W_g| / |W_avg|), the paper's formula
late-heavy     alpha = depth (stage / last stage); heads 1, stems and embeddings 0
early-heavy    alpha = 1 - depth; stems and embeddings 1, heads 0
============== ==================================================================================

The **score family** (:meth:`StrategySpace.score_strategies`, budget mode only) lets a signal's scores
allocate instead of a shape: ``"<signal>:score-<norm>-<clip>"`` sets one global threshold on the raw
or LAMP-normalised scores, clips each layer into its (budget-shifted) range, its hard bounds or the
``free`` limits, and water-fills to the budget (:mod:`mixmatch_plugin.allocation`).

Two modes. **native** (``target=None``): the global sparsity is whatever the ranges give.
**budget-matched** (``target=S``): each strategy is moved by one log-odds shift inside the ranges
(:func:`mixmatch_plugin.budget.move_to_budget`) until it prunes exactly ``round(S * N)`` weights.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .allocation import CLIPS, NORMS, Clip, Norm, score_ratios, sorted_scores
from .budget import Extension, exact_counts, extend_ranges, move_to_budget
from .errors import MixMatchError
from .layers import Layer
from .ranges import Range, validate_ratio
from .signals import SIGNALS, Signals

logger = logging.getLogger(__name__)

OnUnreachable = Literal["error", "extend"]


@dataclass
class Strategy:
    """Per-layer target sparsities plus the signal that ranks weights within each layer.

    Attributes:
        name: unique within a plan, ``"<signal>:<shape>"`` for rule strategies.
        signal: ``magnitude``, ``gradient``, ``product`` (or ``grasp`` for the GraSP baseline).
        ratios: sparsity per layer name, covering every layer of the inventory (norms at 0).
        global_sparsity: pruned weights over all inventory weights, with per-layer counts rounded as
            :func:`mixmatch_plugin.masks.prune_count` does.
        meta: provenance: ``shape``, ``mode``, ``alphas``, ``out_of_range`` (layers a budget had to
            move outside their original range), ``method`` for baselines, ``trial`` for searched ones.
        layer_signals: per-layer exceptions to ``signal``; a layer not listed uses ``signal``.
    """

    name: str
    signal: str
    ratios: dict[str, float]
    global_sparsity: float
    meta: dict[str, Any] = field(default_factory=dict)
    layer_signals: dict[str, str] = field(default_factory=dict)

    def signal_of(self, layer: str) -> str:
        """The signal that ranks the weights of ``layer``."""
        return self.layer_signals.get(layer, self.signal)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name,
            "signal": self.signal,
            "global_sparsity": self.global_sparsity,
            "layers": dict(self.ratios),
            "meta": self.meta,
        }
        if self.layer_signals:
            d["layer_signals"] = dict(self.layer_signals)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Strategy:
        try:
            return cls(
                name=str(d["name"]),
                signal=str(d["signal"]),
                ratios={str(k): float(v) for k, v in d["layers"].items()},
                global_sparsity=float(d["global_sparsity"]),
                meta=dict(d.get("meta") or {}),
                layer_signals={str(k): str(v) for k, v in (d.get("layer_signals") or {}).items()},
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MixMatchError(f"malformed strategy entry ({type(exc).__name__}: {exc}); regenerate the plan") from None


def global_sparsity(ratios: Mapping[str, float], layers: Sequence[Layer]) -> float:
    """Pruned fraction of all inventory weights, counting whole weights per layer."""
    n = np.array([layer.params for layer in layers], dtype=np.int64)
    r = np.array([ratios.get(layer.name, 0.0) for layer in layers])
    return float(exact_counts(r, n).sum()) / float(n.sum())


def group_key(layer: Layer) -> str:
    """The search-space group of a layer: ``"<role>@<stage>"``."""
    return f"{layer.role}@{layer.stage}"


class StrategySpace:
    """Ranges, hard bounds and groups of one inventory: turns per-group alphas into strategies.

    Args:
        layers: the inventory.
        ranges: per-layer ranges, already clamped into ``bounds``.
        bounds: per-layer hard bounds.
        target: global sparsity to match, or None for native mode.
        on_unreachable: ``"error"`` (default) raises when ``target`` lies outside what the ranges can
            reach; ``"extend"`` shifts the ranges (inside the hard bounds) until it does, and every
            strategy then lists the layers it moved outside their original range in ``meta["out_of_range"]``.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        ranges: Mapping[str, Range],
        bounds: Mapping[str, Range],
        *,
        target: float | None = None,
        on_unreachable: OnUnreachable = "error",
    ) -> None:
        if on_unreachable not in ("error", "extend"):
            raise MixMatchError(f"on_unreachable must be 'error' or 'extend', got {on_unreachable!r}")
        if target is not None:
            target = validate_ratio(target, "target sparsity")
        self.layers = tuple(layers)
        self.names = [layer.name for layer in self.layers]
        self.n = np.array([layer.params for layer in self.layers], dtype=np.float64)
        self.original_lo = np.array([ranges[m][0] for m in self.names])
        self.original_hi = np.array([ranges[m][1] for m in self.names])
        self.floor = np.array([bounds[m][0] for m in self.names])
        self.ceil = np.array([bounds[m][1] for m in self.names])
        self.lo, self.hi = self.original_lo.copy(), self.original_hi.copy()
        self.target = target
        self.extension: Extension | None = None
        if target is not None:
            a, b = float((self.n * self.lo).sum() / self.n.sum()), float((self.n * self.hi).sum() / self.n.sum())
            if not (a <= target <= b) and on_unreachable == "extend":
                self.lo, self.hi, self.extension = extend_ranges(self.n, self.lo, self.hi, self.floor, self.ceil, target)
                logger.info(
                    "target %.3f is outside the ranges' reach [%.3f, %.3f]: %s",
                    target, a, b, self.extension,
                )
        free = self.hi > self.lo
        self.groups: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if free[i]:
                self.groups.setdefault(group_key(layer), []).append(i)

    # ---------------------------------------------------------------------------------- alphas
    def alphas(self, shape: str, signal: str, signals: Signals | None = None) -> dict[str, float]:
        """Per-group alphas of the shape registered as ``shape`` in :data:`REGISTRY` (see the module docstring)."""
        fn = REGISTRY.get(shape)
        if fn is None:
            raise MixMatchError(f"unknown strategy shape {shape!r}; shapes are {', '.join(REGISTRY)}")
        return fn(self, signal, signals)

    # ------------------------------------------------------------------------------ strategies
    def ratios(self, alphas: Mapping[str, float]) -> np.ndarray:
        """Per-layer sparsities for per-group alphas, moved to the target in budget mode."""
        missing = [g for g in self.groups if g not in alphas]
        if missing:
            raise MixMatchError(f"no alpha for group {missing[0]!r}; groups are {', '.join(self.groups)}")
        a = np.zeros(len(self.layers))
        for g, idx in self.groups.items():
            v = float(alphas[g])
            if not 0.0 <= v <= 1.0:
                raise MixMatchError(f"alpha for group {g!r} must lie in [0, 1], got {v}")
            a[idx] = v
        rho = self.lo + a * (self.hi - self.lo)
        if self.target is not None:
            rho = move_to_budget(rho, self.n, self.lo, self.hi, self.target)
        return rho

    def strategy(
        self, name: str, signal: str, alphas: Mapping[str, float], meta: Mapping[str, Any] | None = None
    ) -> Strategy:
        """Build a :class:`Strategy` from per-group alphas."""
        return self.build(name, signal, self.ratios(alphas), {"alphas": {g: float(v) for g, v in alphas.items()}, **(meta or {})})

    def from_ratios(
        self, name: str, signal: str, ratios: Mapping[str, float], meta: Mapping[str, Any] | None = None
    ) -> Strategy:
        """Build a :class:`Strategy` from per-layer sparsities (e.g. another method's allocation).

        The ratios are clipped into the ranges and, in budget mode, moved to the target as
        :meth:`ratios` moves a shape's, so the result is a strategy this space could produce per layer.
        """
        missing = [m for m in self.names if m not in ratios]
        if missing:
            raise MixMatchError(f"no sparsity for layer {missing[0]!r}; give one for every layer of the inventory")
        rho = np.clip(np.array([float(ratios[m]) for m in self.names]), self.lo, self.hi)
        if self.target is not None:
            rho = move_to_budget(rho, self.n, self.lo, self.hi, self.target)
        return self.build(name, signal, rho, dict(meta or {}))

    def build(self, name: str, signal: str, rho: np.ndarray, meta: dict[str, Any]) -> Strategy:
        """A :class:`Strategy` from a vector of per-layer sparsities in inventory order, as they are (rounded to whole weights)."""
        if signal not in SIGNALS and signal not in ("grasp", "progressive"):
            raise MixMatchError(f"unknown signal {signal!r}; signals are {', '.join(SIGNALS)}")
        n = self.n.astype(np.int64)
        k = exact_counts(rho, n, self.target)
        ratios = {m: float(k[i]) / float(n[i]) if self.target is not None else float(rho[i]) for i, m in enumerate(self.names)}
        outside = [
            m for i, m in enumerate(self.names)
            if ratios[m] < self.original_lo[i] - 1.0 / n[i] or ratios[m] > self.original_hi[i] + 1.0 / n[i]
        ]
        info: dict[str, Any] = {"mode": "budget" if self.target is not None else "native", **meta}
        if outside:
            info["out_of_range"] = outside
        return Strategy(name, signal, ratios, float(k.sum()) / float(n.sum()), info)

    def rule_strategies(
        self, signals: Sequence[str], scores: Signals | None = None, shapes: Sequence[str] | None = None
    ) -> list[Strategy]:
        """The ten (or ``shapes``) rule strategies for each signal, duplicates dropped with a warning."""
        out: list[Strategy] = []
        for signal in signals:
            kept: list[Strategy] = []
            for shape in shapes or SHAPES:
                s = self.strategy(f"{signal}:{shape}", signal, self.alphas(shape, signal, scores), {"shape": shape})
                twin = next((t for t in kept if _same(t, s)), None)
                if twin is not None:
                    logger.info("strategy %s equals %s under these ranges: dropped", s.name, twin.name)
                    twin.meta.setdefault("same_as", []).append(s.name)  # Plan.strategy(dropped name) finds it
                    continue
                kept.append(s)
            out += kept
        return out


    def limits(self, clip: Clip, free: Mapping[str, Range] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The per-layer ``(lo, hi)`` of a clip: the (budget-shifted) ranges, the hard bounds, or ``free``."""
        if clip == "ranges":
            return self.lo, self.hi
        if clip == "bounds" or free is None:
            return self.floor, self.ceil
        return np.array([free[m][0] for m in self.names]), np.array([free[m][1] for m in self.names])

    def score_strategies(
        self, scores: Signals, signals: Sequence[str] = ("magnitude", "product", "wanda"), *,
        norms: Sequence[Norm] = NORMS, clips: Sequence[Clip] = CLIPS, free: Mapping[str, Range] | None = None,
    ) -> list[Strategy]:
        """The score family: ``"<signal>:score-<norm>-<clip>"`` for each available signal, norm and clip.

        ``free`` holds the limits of the ``free`` clip (the hard bounds without the preset's structural
        constraints but the normalization one); without it, ``free`` is skipped. Needs budget mode.
        Allocations equal to an earlier one of the same signal are dropped.
        """
        if self.target is None:
            raise MixMatchError("the score family allocates a budget: give the space a target sparsity")
        out: list[Strategy] = []
        for signal in (s for s in signals if s in scores.available):
            for norm in norms:
                sorted_ = [sorted_scores(scores.score(m, signal), norm) for m in self.names]
                if not any(len(x) and x[-1] > 0 for x in sorted_):
                    logger.warning("the %s scores are all zero: no score strategy for them", signal)
                    break
                for clip in clips:
                    if clip == "free" and free is None:
                        continue
                    lo, hi = self.limits(clip, free)
                    used = [x if h > 0 else None for x, h in zip(sorted_, hi, strict=True)]
                    if not any(x is not None and len(x) and x[-1] > 0 for x in used):
                        logger.warning("the %s scores are zero in every layer the %s limits let be pruned: no %s:score-%s-%s",
                                       signal, clip, signal, norm, clip)
                        continue
                    rho = score_ratios(used, self.n, lo, hi, self.target)
                    s = self.build(f"{signal}:score-{norm}-{clip}", signal, rho, {"family": "score", "norm": norm, "clip": clip})
                    if not any(_same(t, s) for t in out if t.signal == signal):
                        out.append(s)
        return out


    @functools.cached_property
    def shift_groups(self) -> dict[str, list[int]]:
        """The groups of :meth:`shifted`: every layer the hard bounds let be pruned, by role and stage."""
        out: dict[str, list[int]] = {}
        for i, layer in enumerate(self.layers):
            if self.ceil[i] > 0:
                out.setdefault(group_key(layer), []).append(i)
        return out

    def shifted(self, base: Strategy, shifts: Mapping[str, float], name: str, signal: str | None = None) -> Strategy:
        """``base`` with budget moved between groups: the pool search's point (budget mode only).

        Layer ``l`` of group ``g`` gets ``sigmoid(logit(rho_l) + shifts[g] + t)``, with the one common
        ``t`` that meets the target, inside the hard bounds widened to hold ``base`` (a ``free``
        strategy may lie outside them). All shifts 0 give ``base``'s allocation itself.
        """
        if self.target is None:
            raise MixMatchError("shifting a strategy keeps a budget: give the space a target sparsity")
        rho = np.array([base.ratios[m] for m in self.names])
        offset = np.zeros(len(self.names))
        for g, idx in self.shift_groups.items():
            offset[idx] = float(shifts.get(g, 0.0))
        if offset.any():
            rho = move_to_budget(rho, self.n, np.minimum(self.floor, rho), np.maximum(self.ceil, rho), self.target, offset)
        moved = {g: float(v) for g, v in shifts.items() if v}
        return self.build(name, signal or base.signal, rho, {"base": base.name, "shifts": moved})


def _same(a: Strategy, b: Strategy, tol: float = 1e-9) -> bool:
    return all(abs(a.ratios[k] - b.ratios[k]) <= tol for k in a.ratios)


def twins(strategies: Sequence[Strategy]) -> dict[str, str]:
    """Each strategy that gives the same masks as an earlier one (the same per-layer ratios and signals), by name,
    mapped to the earlier one's name.

    Pools merged from several plans hold such twins: the score family's ``free`` members do not depend on the
    ranges, so both range variants build them alike (and its ``bounds`` members where the variants' hard bounds
    agree). Example::

        pool = [*rules_plan.strategies, *empirical_plan.strategies]
        same = twins(pool)      # {"empirical/product:score-raw-free": "rules/product:score-raw-free", ...}
    """
    first: dict[tuple[Any, ...], str] = {}
    out = {}
    for s in strategies:
        key = (s.signal, tuple(sorted(s.layer_signals.items())), tuple(sorted((k, round(v, 9)) for k, v in s.ratios.items())))
        if key in first:
            out[s.name] = first[key]
        else:
            first[key] = s.name
    return out


def distinct(strategies: Sequence[Strategy]) -> list[Strategy]:
    """``strategies`` without the :func:`twins` of earlier ones, in order."""
    same = twins(strategies)
    return [s for s in strategies if s.name not in same]


# ------------------------------------------------------------------------------------------ shapes
#: A shape: ``(space, signal, scores) -> {group: alpha}``, one alpha in [0, 1] per group of ``space.groups``.
#: The same one-method contract as Torch-Pruning's ``Importance.__call__(group)``.
Shape = Callable[[StrategySpace, str, "Signals | None"], dict[str, float]]


def _fixed(alpha: float) -> Shape:
    return lambda space, signal, scores: dict.fromkeys(space.groups, alpha)


def size_proportional(space: StrategySpace, signal: str, scores: Signals | None) -> dict[str, float]:
    """The paper's formula: ``alpha_g = min(1, 0.1 * |W_g| / |W_avg|)``."""
    free = [i for idx in space.groups.values() for i in idx]
    avg = float(space.n[free].mean()) if free else 1.0
    return {g: min(1.0, 0.1 * float(space.n[idx].mean()) / avg) for g, idx in space.groups.items()}


def late_heavy(space: StrategySpace, signal: str, scores: Signals | None) -> dict[str, float]:
    """``alpha`` = depth (stage / last stage, else the mean position); heads 1, stems and embeddings 0."""
    stages = {g: space.layers[idx[0]].stage for g, idx in space.groups.items()}
    last = max(stages.values(), default=0)
    out = {}
    for g, idx in space.groups.items():
        role = space.layers[idx[0]].role
        if role == "head":
            out[g] = 1.0
        elif role in ("stem", "embedding"):
            out[g] = 0.0
        else:
            out[g] = stages[g] / last if last > 0 else float(np.mean([space.layers[i].position for i in idx]))
    return out


def early_heavy(space: StrategySpace, signal: str, scores: Signals | None) -> dict[str, float]:
    """The mirror of :func:`late_heavy`: stems and embeddings 1, heads 0."""
    return {g: 1.0 - a for g, a in late_heavy(space, signal, scores).items()}


def sensitivity(space: StrategySpace, signal: str, scores: Signals | None) -> dict[str, float]:
    """Groups ranked by the score mass the midpoint would remove under ``signal``: least damaged 1, most 0."""
    if scores is None:
        raise MixMatchError("the 'sensitivity' shape needs signals (compute_signals(model, calib))")
    mids = {space.names[i]: float(space.lo[i] + space.hi[i]) / 2 for idx in space.groups.values() for i in idx}
    dmg = scores.damage(signal, mids)
    gd = {g: float(np.average([dmg[space.names[i]] for i in idx], weights=space.n[idx])) for g, idx in space.groups.items()}
    order = sorted(gd, key=lambda g: (gd[g], g))
    span = max(len(order) - 1, 1)
    return {g: 1.0 - rank / span if len(order) > 1 else 0.5 for rank, g in enumerate(order)}


#: The shapes by name, in the order a plan lists them (the paper's ten, with ``sensitivity`` for its alpha-0.5).
REGISTRY: dict[str, Shape] = {
    "all-min": _fixed(0.0), "all-max": _fixed(1.0), "midpoint": _fixed(0.5), "alpha-0.3": _fixed(0.3),
    "sensitivity": sensitivity, "alpha-0.7": _fixed(0.7), "alpha-0.9": _fixed(0.9),
    "size-proportional": size_proportional, "late-heavy": late_heavy, "early-heavy": early_heavy,
}
SHAPES = tuple(REGISTRY)
