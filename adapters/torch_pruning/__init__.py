"""Mix-and-Match for Torch-Pruning 1.6.1: structured pruning by a strategy, one ratio per dependency group.

:func:`pruner_kwargs` (and :func:`pruning_ratio_dict`) feed your own ``tp.pruner.MetaPruner``; :func:`prune`
prunes a copy by :class:`TPOptions` and returns a :class:`TPResult` with a :class:`PruneReport`;
:func:`zeroed_reference` is what the pruned model must equal. Modules: :mod:`.options`, :mod:`.planning`
(groups and ratios), :mod:`.importance`, :mod:`.prune`, :mod:`.verify`, :mod:`.timm_layers`, :mod:`.report`.
The fold rule, the clamps and the timm architectures handled are described in ``docs/frameworks.md``.
"""

from __future__ import annotations

from .options import TPOptions
from .planning import plan_groups, pruner_kwargs, pruning_ratio_dict
from .prune import prune, rebuild
from .report import PruneReport, TPResult
from .timm_layers import attention_head_dims, fix_attention
from .verify import count_macs, zeroed_reference

__all__ = [
    "PruneReport", "TPOptions", "TPResult", "attention_head_dims", "count_macs", "fix_attention", "plan_groups", "prune",
    "pruner_kwargs", "pruning_ratio_dict", "rebuild", "zeroed_reference",
]
