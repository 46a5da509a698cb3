"""Mix-and-Match pruning: architecture-aware per-layer sparsity for NNI, Torch-Pruning and plain PyTorch.

The core is small, pure functions over plain data::

    import mixmatch_plugin as mm

    layers = mm.inventory(model)                    # name, role, stage, size of every weight tensor
    p = mm.plan(model, calib_loader, target=0.8)    # ranges + 10 strategies per signal, at 80 % sparsity
    ranked = mm.rank(model, p.strategies, val_loader, signals=p.signals)
    pruned = p.apply(model, ranked[0].strategy)     # masks by the strategy's signal, on a copy
    mm.finetune(pruned.model, pruned.masks, train_loader, val_loader=val_loader)
    p.save("plan.json")

Framework glue (NNI, Torch-Pruning, Optuna) lives in :mod:`mixmatch_plugin.adapters` and is imported
only when used.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import BudgetError, MixMatchError, PlanMismatchError, RulesError, SignalError

# The public names are loaded on first use (PEP 562): ``import mixmatch_plugin`` and the ``mixmatch``
# command start without importing torch, so the command answers --help at once. No submodule is named
# like a function here (``planning`` holds ``plan``, ``layers`` holds ``inventory``), so importing one
# never hides a function.
_LAZY = {
    "baselines": ".baselines",
    **dict.fromkeys(("Choice", "Metrics", "Ranked", "choose", "evaluate", "hold_batches", "rank", "reestimate_bn"), ".evaluation"),
    **dict.fromkeys(("FinetuneOptions", "FinetuneResult", "finetune"), ".finetuning"),
    **dict.fromkeys(("Layer", "inventory"), ".layers"),
    **dict.fromkeys(("PruneResult", "apply", "compute_masks", "sparsity_of", "to_torch_prune"), ".masks"),
    **dict.fromkeys(("Plan", "PlanOptions", "load_plan", "plan"), ".planning"),
    **dict.fromkeys(("builtin_presets", "load_rules", "preset_for"), ".rules"),
    **dict.fromkeys(("DEFAULT_SIGNALS", "SIGNALS", "Signals", "compute_grasp", "compute_signals"), ".signals"),
    **dict.fromkeys(("SHAPES", "Strategy", "StrategySpace"), ".strategies"),
}

if TYPE_CHECKING:
    from . import baselines
    from .evaluation import Choice, Metrics, Ranked, choose, evaluate, hold_batches, rank, reestimate_bn
    from .finetuning import FinetuneOptions, FinetuneResult, finetune
    from .layers import Layer, inventory
    from .masks import PruneResult, apply, compute_masks, sparsity_of, to_torch_prune
    from .planning import Plan, PlanOptions, load_plan, plan
    from .rules import builtin_presets, load_rules, preset_for
    from .signals import DEFAULT_SIGNALS, SIGNALS, Signals, compute_grasp, compute_signals
    from .strategies import SHAPES, Strategy, StrategySpace


def __getattr__(name: str) -> Any:
    if (target := _LAZY.get(name)) is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(target, __name__)
    value = module if name == "baselines" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "DEFAULT_SIGNALS", "SHAPES", "SIGNALS", "BudgetError", "Choice", "FinetuneOptions", "FinetuneResult", "Layer", "Metrics", "MixMatchError", "Plan",
    "PlanMismatchError", "PlanOptions", "PruneResult", "Ranked", "RulesError", "SignalError", "Signals", "Strategy",
    "StrategySpace", "__version__", "apply", "baselines", "builtin_presets", "choose", "compute_grasp", "compute_masks",
    "compute_signals", "evaluate", "finetune", "hold_batches", "inventory", "load_plan", "load_rules", "plan", "preset_for",
    "rank", "reestimate_bn", "sparsity_of", "to_torch_prune",
]
