"""Optuna refinement around the rule strategies: resumable, multi-worker, seeded by the 30 rules.

:mod:`.evaluators` (strategy -> metrics, sparse MACs), :mod:`.search` (space, storages, the search, results,
export) and :mod:`.plots` (Optuna's matplotlib plots). The space, objectives, samplers, storages and resume
are described in ``docs/search.md``.
"""

from __future__ import annotations

from mixmatch_plugin.errors import MixMatchError

try:
    import optuna  # noqa: F401 - checked here, once, with an install hint
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MixMatchError(
        f"the Optuna adapter needs optuna ({_exc}); install it with: pip install 'mixmatch-plugin[optuna]'"
    ) from None

from .evaluators import CallbackEvaluator, FinetuneEvaluator, MacsProfile, ProxyEvaluator
from .plots import plot_history, plot_importances, plot_pareto
from .search import SearchOptions, SearchResult, export, search

__all__ = [
    "CallbackEvaluator", "FinetuneEvaluator", "MacsProfile", "ProxyEvaluator", "SearchOptions", "SearchResult", "export",
    "plot_history", "plot_importances", "plot_pareto", "search",
]
