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

import logging

from . import baselines
from ._version import __version__
from .errors import BudgetError, MixMatchError, PlanMismatchError, RulesError, SignalError
from .evaluate import Metrics, Ranked, evaluate, rank, reestimate_bn
from .finetune import FinetuneResult, finetune
from .inventory import Layer, inventory
from .masks import PruneResult, apply, compute_masks, sparsity_of, to_torch_prune
from .mixing import mix_signals
from .plan import Plan, load_plan, plan
from .rules import builtin_presets, load_rules, preset_for
from .signals import SIGNALS, Signals, compute_grasp, compute_signals
from .strategies import SHAPES, Strategy, StrategySpace

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SHAPES", "SIGNALS", "BudgetError", "FinetuneResult", "Layer", "Metrics", "MixMatchError", "Plan",
    "PlanMismatchError", "PruneResult", "Ranked", "RulesError", "SignalError", "Signals", "Strategy",
    "StrategySpace", "__version__", "apply", "baselines", "builtin_presets", "compute_grasp", "compute_masks",
    "compute_signals", "evaluate", "finetune", "inventory", "load_plan", "load_rules", "mix_signals", "plan", "preset_for",
    "rank", "reestimate_bn", "sparsity_of", "to_torch_prune",
]
