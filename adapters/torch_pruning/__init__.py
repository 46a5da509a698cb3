"""Mix-and-Match for Torch-Pruning 1.6.1: structured pruning, one ratio per dependency group, or a MACs budget.

:func:`prune` (a strategy's targets folded per group, or ``macs=``/``params=``), :func:`from_metapruner` (a
``MetaPruner`` call's keywords, reallocated), :func:`pruner_kwargs`/:func:`pruning_ratio_dict` (for your own
``MetaPruner``), :func:`fix_attention`, :func:`zeroed_reference`, :func:`rebuild`. How groups are folded, the
timm handling and every trap: ``docs/adapters.md``; budgets and the drop-in: ``docs/structured.md``.
"""

from __future__ import annotations

from .options import TPOptions
from .planning import plan_groups, pruner_kwargs, pruning_ratio_dict
from .prune import from_metapruner, prune, rebuild
from .report import PruneReport, TPResult
from .timm_layers import STREAM_LEAVES, StreamLeaf, TraceAsLeaves, attention_head_dims, fix_attention
from .verify import count_macs, zeroed_reference

__all__ = [
    "STREAM_LEAVES", "PruneReport", "StreamLeaf", "TPOptions", "TPResult", "TraceAsLeaves", "attention_head_dims", "count_macs", "fix_attention", "from_metapruner",
    "plan_groups", "prune",
    "pruner_kwargs", "pruning_ratio_dict", "rebuild", "zeroed_reference",
]
