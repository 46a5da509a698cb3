"""Per-layer sparsity ranges ``[lo, hi]`` and hard bounds.

Three sources, combinable:

* **rules**: a preset (``swin``, ``resnet``, ``levit``, ``vgg``, ``generic`` or a user file) maps each
  layer to a range; ``per_stage`` adds a fixed step per stage, ``per_depth`` a step scaled by
  ``stage / last_stage``.
* **empirical** (the paper): the min and max sparsity each layer receives from global magnitude, SNIP
  and GraSP at 70/80/90 % global sparsity.
* **structural constraints** on top: hard bounds (normalization dense, small layers at most 10 %,
  patch embedding [0.15, 0.30] in the paper preset) that ranges are clamped into and that budget
  matching never leaves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from .errors import MixMatchError, RulesError
from .layers import Layer
from .rules import RuleSet

Range = tuple[float, float]
RangeSource = Literal["rules", "empirical", "union", "intersection"]
COMBINE: tuple[RangeSource, ...] = get_args(RangeSource)


def _clamp_into(r: Range, c: Range) -> Range:
    """Clamp interval ``r`` into ``c``: their intersection when it is non-empty, else the nearest end of ``c``."""
    return (min(max(r[0], c[0]), c[1]), max(min(r[1], c[1]), c[0]))


def bounds(layers: Sequence[Layer], rules: RuleSet) -> dict[str, Range]:
    """Hard per-layer bounds from the preset's structural constraints and ``max_layer_sparsity``."""
    out = {}
    for layer in layers:
        b: Range = (0.0, rules.max_layer_sparsity)
        for c in rules.constraints:  # applied in order: on a conflict the last match wins
            if c.match.matches(layer):
                b = _clamp_into(b, c.clamp)
        out[layer.name] = b
    return out


def rule_ranges(layers: Sequence[Layer], rules: RuleSet) -> dict[str, Range]:
    """Ranges from the preset's rules (first match wins), before constraints."""
    last_stage = max((layer.stage for layer in layers), default=0)
    out = {}
    for layer in layers:
        if (rule := next((r for r in rules.rules if r.match.matches(layer)), None)) is None:
            raise RulesError(
                f"no rule of preset {rules.name!r} gives a range for layer {layer.name!r} "
                f"(role {layer.role}, stage {layer.stage}); add a catch-all rule {{range: [lo, hi]}} or 'extends: generic'"
            )
        shift = rule.per_stage * layer.stage + (rule.per_depth * layer.stage / last_stage if last_stage else 0.0)
        lo, hi = rule.range[0] + shift, rule.range[1] + shift
        out[layer.name] = (max(0.0, min(lo, 0.999)), max(0.0, min(hi, 0.999)))
    return out


def combine(
    rules: Mapping[str, Range] | None, empirical: Mapping[str, Range] | None, how: RangeSource = "rules"
) -> dict[str, Range]:
    """Combine rule and empirical ranges: ``rules``, ``empirical``, ``union`` (hull) or ``intersection``.

    An empty intersection falls back to the midpoint between the two ranges' facing ends.
    """
    if how not in COMBINE:
        raise MixMatchError(f"unknown range combination {how!r}; choose one of {', '.join(COMBINE)}")
    if how in ("rules", "union", "intersection") and rules is None:
        raise MixMatchError(f"range combination {how!r} needs rule ranges")
    if how in ("empirical", "union", "intersection") and empirical is None:
        raise MixMatchError(f"range combination {how!r} needs empirical ranges (calibration data)")
    if how == "rules":
        assert rules is not None
        return dict(rules)
    assert empirical is not None
    if how == "empirical":
        return dict(empirical)
    assert rules is not None
    out = {}
    for name, (a, b) in rules.items():
        c, d = empirical[name]
        if how == "union":
            out[name] = (min(a, c), max(b, d))
        else:
            lo, hi = max(a, c), min(b, d)
            out[name] = (lo, hi) if lo <= hi else ((lo + hi) / 2, (lo + hi) / 2)
    return out


def clamp_ranges(ranges: Mapping[str, Range], hard: Mapping[str, Range]) -> dict[str, Range]:
    """Clamp every range into its layer's hard bounds."""
    return {n: _clamp_into(r, hard[n]) for n, r in ranges.items()}


def pinned(layers: Sequence[Layer], raw: Mapping[str, Range], final: Mapping[str, Range], rules: RuleSet) -> dict[str, list[str]]:
    """Layers whose open range the hard bounds collapse to one nonzero sparsity, by the constraint that set it.

    A range the rules or the empirical runs left open (``lo < hi``) but the constraints fix (``lo == hi > 0``)
    cannot be moved by any strategy or search, and the budget goes to the other layers. Keeping a layer
    dense (``[0, 0]``, as for normalization) is not reported. The key is the last constraint that matches
    the layer (on a conflict the last match wins), or ``max_layer_sparsity``.
    """
    out: dict[str, list[str]] = {}
    for layer in layers:
        (a, b), (c, d) = raw[layer.name], final[layer.name]
        if a < b and c == d > 0.0:
            cid = next((k.id for k in reversed(rules.constraints) if k.match.matches(layer)), "max_layer_sparsity")
            out.setdefault(cid, []).append(layer.name)
    return out


def empirical_ranges(per_run: Sequence[Mapping[str, float]]) -> dict[str, Range]:
    """Min and max of each layer's sparsity over several pruning runs (the paper's Phase 1)."""
    if not per_run:
        raise MixMatchError("empirical ranges need at least one pruning run")
    names = per_run[0].keys()
    return {n: (min(r[n] for r in per_run), max(r[n] for r in per_run)) for n in names}


def validate_ratio(value: float | str, what: str = "sparsity") -> float:
    """Check a sparsity lies in [0, 1): the one check every entry point shares."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise MixMatchError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0):  # also false for NaN
        raise MixMatchError(f"{what} must lie in [0, 1), got {value!r}: 1.0 would remove every weight")
    return v
