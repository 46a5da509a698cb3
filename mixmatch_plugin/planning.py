"""The plan: a model's inventory, ranges and strategies, as versioned JSON.

``mixmatch.plan/1``::

    {"schema": "mixmatch.plan/1",
     "layers": [{"name": "...", "role": "...", "stage": 0, "params": 0, "range": [0.0, 0.0],
                 "bounds": [0.0, 0.99], "type": "Conv2d", "kind": "conv", "shape": [..], ...}],
     "strategies": [{"name": "...", "signal": "...", "global_sparsity": 0.0, "layers": {"<name>": 0.0},
                     "meta": {...}}],
     "sensitivity": {"<signal>": {"<name>": 0.0}},
     "meta": {"preset": "...", "target": null, "ranges": "rules", ...}}

``range`` is the layer's sparsity range, ``bounds`` its hard bounds (structural constraints).
Saving writes atomically; loading validates every field and refuses newer schema versions.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from . import baselines as _baselines
from ._version import __version__
from .allocation import CLIPS, curve_ratios
from .batches import LossFn
from .errors import MixMatchError, RulesError
from .evaluation import Choice, choose, hold_batches
from .io import atomic_write_json, read_json
from .layers import Layer, check_prunable, inventory
from .masks import PruneResult
from .masks import apply as _apply
from .progressive import progressive_scores
from .ranges import (
    Range,
    RangeSource,
    bounds,
    clamp_ranges,
    combine,
    empirical_ranges,
    pinned,
    rule_ranges,
    validate_ratio,
)
from .rules import KINDS, RuleSet, load_rules, preset_for
from .sensitivity import Curves, measure_curves
from .signals import (
    ALL_SIGNALS,
    DEFAULT_SIGNALS,
    SIGNALS,
    SignalName,
    Signals,
    compute_grasp,
    compute_signals,
)
from .strategies import SHAPES, OnUnreachable, Strategy, StrategySpace

logger = logging.getLogger(__name__)

SCHEMA = "mixmatch.plan/1"
SCHEMA_VERSION = 1


#: The signals whose masks :meth:`Plan.choose` also tries the winner's allocation with (the benchmark's; gradient
#: masks alone are weak, and those the plan lacks are skipped).
MASK_SIGNALS: tuple[SignalName, ...] = ("magnitude", "product", "wanda")


@dataclass
class Plan:
    """Inventory, ranges, hard bounds and strategies of one model. Plain data; JSON round-trips exactly.

    ``signals`` holds the per-weight scores in memory (not saved): pass them to :meth:`apply`
    to prune by the gradient or product signal without another calibration pass.
    """

    layers: list[Layer]
    ranges: dict[str, Range]
    bounds: dict[str, Range]
    strategies: list[Strategy]
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    signals: Signals | None = field(default=None, repr=False, compare=False)

    # --------------------------------------------------------------------------------- access
    def strategy(self, name: str) -> Strategy:
        """The strategy called ``name`` (e.g. ``"magnitude:alpha-0.7"``), or the one it collapsed into (``meta["same_as"]``)."""
        for s in self.strategies:
            if s.name == name:
                return s
        for s in self.strategies:
            if name in s.meta.get("same_as", ()):
                logger.info("strategy %s was dropped as equal to %s under these ranges: using that", name, s.name)
                return s
        raise MixMatchError(
            f"no strategy {name!r} in this plan; strategies are: {', '.join(s.name for s in self.strategies[:12])}"
            + (" ..." if len(self.strategies) > 12 else "")
        )

    def apply(self, model: nn.Module, strategy: str | Strategy, **kwargs: Any) -> PruneResult:
        """Prune ``model`` by one of this plan's strategies (see :func:`mixmatch_plugin.apply`)."""
        s = self.strategy(strategy) if isinstance(strategy, str) else strategy
        kwargs.setdefault("signals", self.signals)
        if s.signal == "progressive" and (kwargs["signals"] is None or kwargs["signals"].progressive is None):
            kwargs["signals"] = self.progressive_signals(model, kwargs.get("calib"), s, kwargs.get("loss_fn"))
        return _apply(model, s, plan_layers=self.layers, **kwargs)

    def choose(self, model: nn.Module, val_loader: Iterable[Any], *, bn_loader: Iterable[Any] | None = None,
               bn_batches: int = 4, screen_batches: int = 1, top_k: int = 5, progress: bool = False) -> Choice:
        """This plan's best strategy on validation data (:func:`mixmatch_plugin.choose` with the plan's signals).

        Every strategy is screened on the first ``screen_batches`` batches of ``val_loader``, the ``top_k`` are
        ranked on all of it, and the winner's allocation is tried with the masks of :data:`MASK_SIGNALS` as well.
        ``bn_loader``: training batches to re-estimate BatchNorm on after masking (``bn_batches`` of them, the
        same for every strategy). Pass the validation split, never the test split; ``model`` is not changed.

        Example::

            chosen = plan.choose(model, val_loader, bn_loader=train_loader)
            best = plan.apply(model, chosen.strategy)
        """
        if self.signals is None and any(s.signal != "magnitude" or s.layer_signals for s in self.strategies):
            raise MixMatchError("this plan holds no signals (a saved plan keeps none): set plan.signals = "
                                "mm.compute_signals(model, calib, signals=('magnitude', 'gradient', 'wanda')) first")
        return choose(model, self.strategies, hold_batches(val_loader, screen_batches, what="screening"), val_loader,
                      signals=self.signals, bn_loader=bn_loader, bn_batches=bn_batches,
                      top_k=top_k, masks=MASK_SIGNALS, progress=progress)

    def progressive_signals(self, model: nn.Module, calib: Iterable[Any] | None, strategy: Strategy,
                            loss_fn: LossFn | None = None) -> Signals:
        """Signals with ``strategy``'s progressive scores computed again on ``model`` (a saved plan keeps no
        scores); the plan's calibration batches, in the same order, give the same masks."""
        if calib is None:
            raise MixMatchError(f"strategy {strategy.name!r} masks by progressive SNIP, which is recomputed from the "
                                "calibration data the plan was built on: pass calib= (CLI: the plan's --calib)")
        target = self.meta.get("target")
        if target is None:
            raise MixMatchError(f"strategy {strategy.name!r} needs a budget-mode plan (one built with a target)")
        signals = compute_signals(model, calib, layers=self.layers, signals=("magnitude",), loss_fn=loss_fn)
        signals.progressive, _ = progressive_scores(model, calib, self.layers, float(target), rounds=int(strategy.meta.get("rounds", 10)),
                                                    hi=kept_dense(self.bounds), loss_fn=loss_fn)
        return signals

    def space(self) -> StrategySpace:
        """The strategy space of this plan (same ranges, bounds and target), for search."""
        return StrategySpace(
            self.layers, self.ranges, self.bounds, target=self.meta.get("target"),
            on_unreachable="extend" if self.meta.get("extend_ranges") else "error",
        )

    # ----------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            d = layer.to_dict()
            d["range"] = list(self.ranges[layer.name])
            d["bounds"] = list(self.bounds[layer.name])
            layers.append(d)
        return {
            "schema": SCHEMA,
            "created_by": f"mixmatch-plugin {__version__}",
            "layers": layers,
            "strategies": [s.to_dict() for s in self.strategies],
            "sensitivity": self.sensitivity,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "plan") -> Plan:
        if not isinstance(d, Mapping):
            raise MixMatchError(f"{source}: a plan must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema")
        m = re.fullmatch(r"mixmatch\.plan/(\d+)", str(schema))
        if m is None:
            raise MixMatchError(f"{source}: not a Mix-and-Match plan ('schema' is {schema!r}, expected {SCHEMA!r})")
        if int(m.group(1)) > SCHEMA_VERSION:
            raise MixMatchError(
                f"{source}: plan schema {schema} is newer than this version reads ({SCHEMA}); "
                "upgrade mixmatch-plugin (pip install -U mixmatch-plugin)"
            )
        try:
            layers = [_layer(x, source) for x in d["layers"]]
            ranges = {x["name"]: _range(x["range"], f"{source}: layer {x['name']!r} range") for x in d["layers"]}
            hard = {x["name"]: _range(x.get("bounds", [0.0, 0.99]), f"{source}: layer {x['name']!r} bounds") for x in d["layers"]}
            strategies = [Strategy.from_dict(s) for s in d["strategies"]]
            sensitivity = {str(k): {str(n): float(v) for n, v in per.items()} for k, per in (d.get("sensitivity") or {}).items()}
            meta = dict(d.get("meta") or {})
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MixMatchError(f"{source}: malformed plan (missing or wrong field {exc}); regenerate it with `mixmatch plan`") from None
        names = {layer.name for layer in layers}
        if len(names) != len(layers):
            dup = next(n for n in names if sum(layer.name == n for layer in layers) > 1)
            raise MixMatchError(f"{source}: layer {dup!r} is listed twice; regenerate the plan with `mixmatch plan`")
        for s in strategies:
            if s.signal not in ALL_SIGNALS:
                raise MixMatchError(f"{source}: strategy {s.name!r} has an unknown signal {s.signal!r}; signals are {', '.join(ALL_SIGNALS)}")
            _ratio(s.global_sparsity, f"{source}: strategy {s.name!r} global_sparsity")
            for name, sig in s.layer_signals.items():
                if name not in names or sig not in ALL_SIGNALS:
                    raise MixMatchError(f"{source}: strategy {s.name!r} has an invalid layer signal {name!r}: {sig!r}")
            for name, r in s.ratios.items():
                if name not in names:
                    raise MixMatchError(f"{source}: strategy {s.name!r} names unknown layer {name!r}")
                _ratio(r, f"{source}: strategy {s.name!r} layer {name!r}")
        _check_meta(meta, source)
        return cls(layers, ranges, hard, strategies, sensitivity, meta)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    def summary(self) -> str:
        """One line: layers, strategies (and why fewer than built), preset, target."""
        t, gone = self.meta.get("target"), self.meta.get("collapsed") or []
        return (
            f"{self.meta.get('model', 'model')}: {len(self.layers)} layers, {len(self.strategies)} strategies"
            + (f" ({len(gone)} more collapsed into duplicates under these ranges: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''})"
               if gone else "")
            + f", preset {self.meta.get('preset')}, " + (f"budget-matched at {t:g}" if t is not None else "native sparsity")
        )

    def __repr__(self) -> str:
        return f"Plan({self.summary()})"


def _ratio(v: Any, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not 0.0 <= v < 1.0:
        raise MixMatchError(f"{where}: sparsity {v!r} must be a number in [0, 1)")
    return float(v)


def _layer(x: Any, source: str) -> Layer:
    """A :class:`Layer` from a plan's layer entry, every field type-checked (the file may come from anyone)."""
    if not isinstance(x, Mapping):
        raise MixMatchError(f"{source}: a layer entry must be a JSON object, got {type(x).__name__}")
    name = x.get("name")
    where = f"{source}: layer {name!r}"

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    problems = [
        ("name", isinstance(name, str) and bool(name)),
        ("type", isinstance(x.get("type"), str)),
        ("kind", x.get("kind") in KINDS),
        ("role", isinstance(x.get("role"), str)),
        ("stage", isinstance(x.get("stage"), int) and not isinstance(x.get("stage"), bool)),
        ("params", count(x.get("params")) and x["params"] > 0),
        ("shape", isinstance(x.get("shape"), list) and all(count(v) for v in x["shape"])
         and count(x.get("params")) and math.prod(x["shape"]) == x["params"]),
        ("position", isinstance(x.get("position"), (int, float)) and not isinstance(x.get("position"), bool)
         and math.isfinite(x["position"])),
        ("groups", count(x.get("groups", 1)) and x.get("groups", 1) >= 1),
        ("aliases", isinstance(x.get("aliases", []), list) and all(isinstance(a, str) for a in x.get("aliases", []))),
    ]
    bad = next((key for key, ok in problems if not ok), None)
    if bad is not None:
        raise MixMatchError(f"{where}: field {bad!r} is missing or invalid ({x.get(bad)!r}); regenerate the plan with `mixmatch plan`")
    return Layer.from_dict(x)


def _check_meta(meta: Mapping[str, Any], source: str) -> None:
    """The meta fields that code acts on: the target and the recorded model spec."""
    if meta.get("target") is not None:
        _ratio(meta["target"], f"{source}: meta target")
    for key in ("collapsed", "warnings"):
        if not isinstance(meta.get(key, []), list) or not all(isinstance(v, str) for v in meta.get(key, [])):
            raise MixMatchError(f"{source}: meta {key} must be a list of strings, got {meta[key]!r}")
    spec = meta.get("model_spec")
    if spec is None:
        return
    if not isinstance(spec, Mapping) or not isinstance(spec.get("model", ""), str):
        raise MixMatchError(f"{source}: meta model_spec must be an object with a 'model' string, got {spec!r}")
    kwargs = spec.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, (str, Mapping)):
        raise MixMatchError(f"{source}: meta model_spec model_kwargs must be an object or a JSON string, got {kwargs!r}")
    shape = spec.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
    ):
        raise MixMatchError(f"{source}: meta model_spec input_shape must be [C, H, W] with positive integers, got {shape!r}")


def _range(v: Any, where: str) -> Range:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise MixMatchError(f"{where}: expected [low, high], got {v!r}")
    lo, hi = _ratio(v[0], where), _ratio(v[1], where)
    if lo > hi:
        raise MixMatchError(f"{where}: low {lo} exceeds high {hi}")
    return lo, hi


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by :meth:`Plan.save` (or ``mixmatch plan``), validating every field."""
    return Plan.from_dict(read_json(path, "plan"), source=str(path))


def _protect(layers: Sequence[Layer], hard: dict[str, Range], patterns: Iterable[str]) -> None:
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise MixMatchError(f"protect pattern {pattern!r} is not a valid regular expression ({exc})") from None
        hits = [layer.name for layer in layers if rx.search(layer.name)]
        if not hits:
            raise MixMatchError(f"protect pattern {pattern!r} matches no layer; run `mixmatch inspect` to see the names")
        for h in hits:
            hard[h] = (0.0, 0.0)


def compute_empirical_ranges(
    layers: Sequence[Layer], signals: Signals, methods: Sequence[str] = ("global_magnitude", "snip", "grasp"),
    sparsities: Sequence[float] = (0.7, 0.8, 0.9),
) -> dict[str, Range]:
    """The paper's Phase 1: min/max per-layer sparsity over ``methods`` x ``sparsities`` (no fine-tuning)."""
    unknown = [m for m in methods if m not in _baselines.REGISTRY]
    if unknown:
        raise RulesError(f"'empirical.methods' names {unknown[0]!r}, which is not a baseline; choose from {', '.join(_baselines.REGISTRY)}")
    runs = [s.ratios for m in methods for s in _baselines.sweep(m, layers, signals, sparsities)]
    return empirical_ranges(runs)


#: Share of the prunable weights above which fixed layers earn a warning rather than an info line.
PINNED_WARN_SHARE = 0.05


def _report_pinned(layers: Sequence[Layer], final: Mapping[str, Range], fixed: Mapping[str, list[str]]) -> list[str]:
    """Log the layers the constraints fix at a nonzero sparsity; the messages about a large share of the weights are returned."""
    out: list[str] = []
    params = {layer.name: layer.params for layer in layers}
    total = sum(params.values())
    for cid, names in fixed.items():
        share = sum(params[n] for n in names) / total
        at = sorted({round(final[n][0], 4) for n in names})
        msg = (f"constraint {cid!r} fixes {len(names)} layer(s) holding {100 * share:.1f} % of the prunable weights at sparsity "
               f"{'/'.join(f'{v:g}' for v in at)} ({', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}): "
               "no rule strategy or search can move them (the score family's `free` strategies can), and the budget goes to the "
               "other layers; if that is not meant (the paper "
               "set its clamps for ImageNet-size models; on a small one they can catch whole roles), "
               f"PlanOptions(disable_constraints=({cid!r},)) or `mixmatch plan --no-constraint {cid}`")
        (out.append if share >= PINNED_WARN_SHARE else logger.info)(msg)
    return out


def kept_dense(limits: Mapping[str, Range]) -> dict[str, float]:
    """The layers ``limits`` keep dense, as progressive SNIP's caps: no ceilings, one global threshold per round as SNIP."""
    return {m: 0.0 for m, b in limits.items() if b[1] == 0.0}


@dataclass(frozen=True)
class PlanOptions:
    """The less common settings of :func:`plan`.

    Attributes:
        ranges: ``"rules"``, ``"empirical"`` (the paper's 9 pruning runs), ``"union"`` or
            ``"intersection"`` of both; ``"auto"`` follows the preset's ``source``.
        disable_constraints: ids of structural constraints to switch off (``norm``, ``small_layers``,
            ``patch_embed``).
        roles: role overrides ``{regex: role}``.
        protect: regexes of layers to keep dense (hard bound [0, 0]).
        shapes: strategy shapes to build (default: all ten, :data:`~mixmatch_plugin.strategies.SHAPES`).
        score_family: in budget mode, add the score family (``"<signal>:score-<norm>-<clip>"``, see
            :meth:`~mixmatch_plugin.strategies.StrategySpace.score_strategies`).
        measure: also measure every layer's damage curve under this signal's masks
            (:func:`~mixmatch_plugin.sensitivity.measure_curves`, about 10 forward passes per layer) and
            add ``"<signal>:measured-<clip>"``, the allocations that minimise the measured damage; or
            curves measured before (reused across targets).
        progressive: in budget mode, also add ``"product:progressive"``: SNIP rescored on the pruned model over
            this many rounds (:mod:`~mixmatch_plugin.progressive`; one forward+backward pass over ``calib``
            per round after the first, which reuses the plan's signals), whose allocation and masks both come
            from the rounds; 0 (default) leaves it out.
        loss_fn, max_batches: see :func:`~mixmatch_plugin.compute_signals`.
    """

    ranges: RangeSource | Literal["auto"] = "auto"
    disable_constraints: tuple[str, ...] = ()
    roles: Mapping[str, str] | None = None
    protect: tuple[str, ...] = ()
    shapes: tuple[str, ...] | None = None
    score_family: bool = True
    measure: SignalName | Curves | None = None
    progressive: int = 0
    loss_fn: LossFn | None = None
    max_batches: int | None = None


def plan(
    model: nn.Module,
    calib: Iterable[Any] | None = None,
    *,
    signals: Sequence[SignalName] = DEFAULT_SIGNALS,
    target: float | None = None,
    on_unreachable: OnUnreachable = "error",
    preset: str | Path | Mapping[str, Any] | RuleSet = "auto",
    options: PlanOptions | None = None,
    scores: Signals | None = None,
    progress: bool = False,
) -> Plan:
    """Build the Mix-and-Match plan of ``model``: inventory, ranges and ten strategies per signal.

    Args:
        model: the trained model; it is only read.
        calib: labelled calibration batches (5-10 % of the training data in the paper). Needed for the
            gradient and product signals and for empirical ranges.
        signals: which of ``magnitude``, ``gradient``, ``product``, ``wanda`` to build rule strategies for.
        target: global sparsity to match (budget-matched mode); None for native mode.
        on_unreachable: ``"error"`` or ``"extend"`` (shift ranges to reach ``target``; see
            :class:`~mixmatch_plugin.strategies.StrategySpace`).
        preset: ``"auto"`` (by model class: swin, resnet, levit, vgg, else generic), a preset name, a
            rules file path, a parsed mapping, or a :class:`~mixmatch_plugin.rules.RuleSet`.
        options: ranges source, constraints switched off, role overrides, protected layers, shapes,
            loss (see :class:`PlanOptions`).
        scores: precomputed signals of this very model (reused, e.g. across targets); ``calib`` is then
            only needed for what ``scores`` lacks (GraSP scores for empirical ranges).
        progress: show progress bars.
    """
    o = options or PlanOptions()
    loss_fn, max_batches = o.loss_fn, o.max_batches
    if target is not None:
        target = validate_ratio(target, "target sparsity")
    layers = inventory(model, roles=o.roles)
    check_prunable(layers)
    rules = preset if isinstance(preset, RuleSet) else load_rules(preset_for(model) if preset == "auto" else preset)
    if o.disable_constraints:
        rules = rules.without(*o.disable_constraints)
    how = ("empirical" if rules.source == "empirical" else "rules") if o.ranges == "auto" else o.ranges
    hard = bounds(layers, rules)
    _protect(layers, hard, o.protect)

    scored = o.score_family and target is not None
    needs_grad = any(s != "magnitude" for s in signals) or how != "rules" or isinstance(o.measure, str) or (scored and calib is not None)
    needs_grasp = how != "rules" and "grasp" in rules.empirical_methods
    if scores is not None:
        missing = sorted(set(layer.name for layer in layers) ^ set(scores.magnitude))
        if missing:
            raise MixMatchError(f"the given scores do not match the model (first differing layer {missing[0]!r})")
    lacking = (needs_grad and (scores is None or scores.gradient is None)) or (needs_grasp and (scores is None or scores.grasp is None))
    if (lacking or isinstance(o.measure, str) or (o.progressive and target is not None)) and calib is None:
        raise MixMatchError(
            "the gradient, product and wanda signals, measured allocations and empirical ranges need calibration data: pass calib=<DataLoader> "
            "(CLI: --calib digits|fashion-mnist|random), or use signals=('magnitude',) with rule ranges"
        )
    if scores is None or (needs_grad and scores.gradient is None):
        scores = compute_signals(
            model, calib, layers=layers, signals=signals if not needs_grad else SIGNALS,
            loss_fn=loss_fn, max_batches=max_batches, progress=progress,
        )
    emp = None
    if how != "rules":
        if needs_grasp and scores.grasp is None:
            assert calib is not None
            scores.grasp = compute_grasp(model, calib, layers=layers, loss_fn=loss_fn, max_batches=max_batches,
                                         mean_gradient=scores.mean_gradient, progress=progress)
        try:
            emp = compute_empirical_ranges(layers, scores, rules.empirical_methods, rules.empirical_sparsities)
        except RulesError as exc:
            raise RulesError(f"{rules.origin or rules.name}: {exc}") from None
    raw = combine(rule_ranges(layers, rules) if how != "empirical" else None, emp, how)
    final = clamp_ranges(raw, hard)
    fixed = pinned(layers, raw, final, rules)
    notes = _report_pinned(layers, final, fixed)

    space = StrategySpace(layers, final, hard, target=target, on_unreachable=on_unreachable)
    strategies = space.rule_strategies(signals, scores, o.shapes)
    built = {s.name for s in strategies}
    collapsed = [f"{sig}:{shape}" for sig in signals for shape in o.shapes or SHAPES if f"{sig}:{shape}" not in built]
    if collapsed:
        notes.append(f"{len(collapsed)} of {len(strategies) + len(collapsed)} strategies equal another one under these ranges "
                     f"and were dropped ({', '.join(collapsed[:4])}{' ...' if len(collapsed) > 4 else ''}): the ranges leave "
                     "little room; see plan.strategies for those kept, or loosen the constraints (PlanOptions)")
    if space.extension is not None:
        notes.append(f"target {target:g} is outside the ranges' reach: {space.extension} to reach it (on_unreachable='extend'); "
                     "each strategy lists its layers outside their range")
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    # the "free" limits: only the constraints that keep a layer dense (normalization, protected layers) hold
    free = bounds(layers, rules.without(*[c.id for c in rules.constraints if c.clamp != (0.0, 0.0)]))
    _protect(layers, free, o.protect)
    if scored:
        strategies += space.score_strategies(scores, free=free)
    measured = None
    if o.measure is not None and target is not None:
        curves = o.measure if isinstance(o.measure, Curves) else measure_curves(
            model, layers, scores, calib or (), signal=o.measure, hi={m: b[1] for m, b in free.items()}, progress=progress)
        grid = [np.array(curves.grid[x.name]) if x.name in curves.grid else None for x in layers]
        cost = [np.array(curves.cost[x.name]) if x.name in curves.cost else None for x in layers]
        for clip in CLIPS:
            lo, hi = space.limits(clip, free)
            rho = curve_ratios(grid, cost, space.n, lo, hi, target)
            strategies.append(space.build(f"{curves.signal}:measured-{clip}", curves.signal, rho, {"family": "measured", "clip": clip}))
        measured = {"signal": curves.signal, "forwards": curves.forwards, "seconds": round(curves.seconds, 2)}
    if o.progressive and target is not None:
        assert calib is not None
        prog, counts = progressive_scores(model, calib, layers, target, rounds=o.progressive, hi=kept_dense(free), loss_fn=loss_fn,
                                          max_batches=max_batches, dense=scores, progress=progress)
        scores = replace(scores, progressive=prog)  # for this target only: the caller's signals are not changed
        rho = np.array([counts.get(x.name, 0) / x.params for x in layers])
        strategies.append(space.build("product:progressive", "progressive", rho, {"family": "progressive", "rounds": o.progressive}))
    sensitivity = {str(s): scores.layer_means(s) for s in scores.available if s in SIGNALS}
    n = np.array([layer.params for layer in layers], dtype=np.float64)
    meta = {
        "model": type(model).__name__,
        "params": int(n.sum()),
        "preset": rules.name,
        "ranges": how,
        "constraints": [c.id for c in rules.constraints],
        "pinned": fixed,
        "target": target,
        "extend_ranges": on_unreachable == "extend",
        "range_shift": space.extension.amount if space.extension else None,
        "range_extension": str(space.extension) if space.extension else None,
        "reachable": [float((n * space.original_lo).sum() / n.sum()), float((n * space.original_hi).sum() / n.sum())],
        "signals": list(signals),
        "calibration": {"batches": scores.batches, "samples": scores.samples},
        "collapsed": collapsed,
        "warnings": notes,
        **({"measured": measured} if measured else {}),
    }
    logger.info("plan: %d layers, %d strategies (preset %s, ranges %s)", len(layers), len(strategies), rules.name, how)
    return Plan(layers, final, hard, strategies, sensitivity, meta, signals=scores)
