"""The search space: a plan's StrategySpace as Optuna distributions, and the rule strategies as seeds."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.plan import Plan
from mixmatch_plugin.strategies import SHAPES, Strategy, StrategySpace

logger = logging.getLogger(__name__)

SIGNAL_PARAM = "signal"
ALPHA_PREFIX = "alpha:"
SEED_ATTR = "mixmatch_seed"
WORKER_ATTR = "mixmatch_worker"
RESULT_ATTR = "mixmatch_result"
STUDY_ATTR = "mixmatch"
OBJECTIVES = ("multi", "single")
METRICS = ("sparsity", "macs")
SAMPLERS = ("nsga2", "tpe", "gp")
SCORES = ("accuracy", "loss")


# ============================================================================ the space
def search_space(space: StrategySpace, signals: Sequence[str]) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a strategy space: ``signal`` (categorical) and one ``alpha:<group>`` in [0, 1] per group."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {
        SIGNAL_PARAM: optuna.distributions.CategoricalDistribution(list(signals))
    }
    for g in space.groups:
        dists[ALPHA_PREFIX + g] = optuna.distributions.FloatDistribution(0.0, 1.0)
    return dists


def params_of(strategy: Strategy) -> dict[str, Any]:
    """The search-space point of a strategy built from alphas (every rule strategy is one)."""
    alphas = strategy.meta.get("alphas")
    if not isinstance(alphas, Mapping):
        raise MixMatchError(f"strategy {strategy.name!r} has no per-group alphas (meta['alphas']): it is not a point of the space")
    return {SIGNAL_PARAM: strategy.signal, **{ALPHA_PREFIX + g: float(a) for g, a in alphas.items()}}


def strategy_of(space: StrategySpace, params: Mapping[str, Any], name: str, meta: Mapping[str, Any] | None = None) -> Strategy:
    """Rebuild the strategy of a search-space point (``params`` as Optuna stores them)."""
    alphas = {k[len(ALPHA_PREFIX):]: float(v) for k, v in params.items() if k.startswith(ALPHA_PREFIX)}
    return space.strategy(name, str(params[SIGNAL_PARAM]), alphas, meta)


def rule_seeds(plan: Plan, signals: Sequence[str] | None = None) -> list[Strategy]:
    """The plan's rule strategies (``meta["shape"]`` one of the ten shapes) for ``signals``, checked to be
    reproduced *exactly* by the plan's space (else the plan was made by another version: regenerate it)."""
    space = plan.space()
    keep = set(signals) if signals is not None else None
    out = []
    for s in plan.strategies:
        if s.meta.get("shape") not in SHAPES or not isinstance(s.meta.get("alphas"), Mapping):
            continue
        if keep is not None and s.signal not in keep:
            continue
        again = strategy_of(space, params_of(s), s.name)
        if again.ratios != s.ratios:
            worst = max(s.ratios, key=lambda k: abs(s.ratios[k] - again.ratios[k]))
            raise MixMatchError(
                f"rule strategy {s.name!r} is not reproduced by the plan's search space (layer {worst!r}: "
                f"{s.ratios[worst]} vs {again.ratios[worst]}); regenerate the plan with this version (`mixmatch plan`)"
            )
        out.append(s)
    return out


def plan_fingerprint(plan: Plan) -> str:
    """A short hash of what defines the search space: layers, sizes, ranges, bounds, target."""
    obj = {
        "layers": [[layer.name, layer.params, layer.role, layer.stage] for layer in plan.layers],
        "ranges": {k: list(v) for k, v in sorted(plan.ranges.items())},
        "bounds": {k: list(v) for k, v in sorted(plan.bounds.items())},
        "target": plan.meta.get("target"),
        "extend": bool(plan.meta.get("extend_ranges")),
    }
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
