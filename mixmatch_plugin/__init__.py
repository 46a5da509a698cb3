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
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import BudgetError, MixMatchError, PlanMismatchError, RulesError, SignalError

# The public names are loaded on first use (PEP 562): ``import mixmatch_plugin`` and the ``mixmatch``
# command start without importing torch, so the command answers --help at once and a Ctrl-C during
# its start-up is handled by the command (one line, ``error: interrupted``) instead of a traceback.
_LAZY = {
    "baselines": ".baselines",
    **dict.fromkeys(("Metrics", "Ranked", "evaluate", "hold_batches", "rank", "reestimate_bn"), ".evaluate"),
    **dict.fromkeys(("FinetuneResult", "finetune"), ".finetune"),
    **dict.fromkeys(("Layer", "inventory"), ".inventory"),
    **dict.fromkeys(("PruneResult", "apply", "compute_masks", "sparsity_of", "to_torch_prune"), ".masks"),
    "mix_signals": ".mixing",
    **dict.fromkeys(("Plan", "load_plan", "plan"), ".plan"),
    **dict.fromkeys(("builtin_presets", "load_rules", "preset_for"), ".rules"),
    **dict.fromkeys(("SIGNALS", "Signals", "compute_grasp", "compute_signals"), ".signals"),
    **dict.fromkeys(("SHAPES", "Strategy", "StrategySpace"), ".strategies"),
}

if TYPE_CHECKING:
    from . import baselines
    from .evaluate import Metrics, Ranked, evaluate, hold_batches, rank, reestimate_bn
    from .finetune import FinetuneResult, finetune
    from .inventory import Layer, inventory
    from .masks import PruneResult, apply, compute_masks, sparsity_of, to_torch_prune
    from .mixing import mix_signals
    from .plan import Plan, load_plan, plan
    from .rules import builtin_presets, load_rules, preset_for
    from .signals import SIGNALS, Signals, compute_grasp, compute_signals
    from .strategies import SHAPES, Strategy, StrategySpace


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(target, __name__)
    value = module if name == "baselines" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_SHADOWED = frozenset(n for n, target in _LAZY.items() if target == f".{n}" and n != "baselines")


class _Package(types.ModuleType):
    """The package: ``plan``, ``inventory``, ``evaluate`` and ``finetune`` stay the functions.

    Importing a submodule binds it to its name on the package; those four names belong to the
    functions of the same name (as with eager imports), so that binding is skipped.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "SHAPES", "SIGNALS", "BudgetError", "FinetuneResult", "Layer", "Metrics", "MixMatchError", "Plan",
    "PlanMismatchError", "PruneResult", "Ranked", "RulesError", "SignalError", "Signals", "Strategy",
    "StrategySpace", "__version__", "apply", "baselines", "builtin_presets", "compute_grasp", "compute_masks",
    "compute_signals", "evaluate", "finetune", "hold_batches", "inventory", "load_plan", "load_rules", "mix_signals", "plan", "preset_for",
    "rank", "reestimate_bn", "sparsity_of", "to_torch_prune",
]
