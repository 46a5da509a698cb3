"""Optuna refinement around the rule strategies: resumable, multi-worker, seeded by the 30 rules.

The search space is the plan's own :class:`~mixmatch_plugin.strategies.StrategySpace`: one
interpolation ``alpha`` in ``[0, 1]`` per role group (``"alpha:<role>@<stage>"``, e.g.
``alpha:attn_qkv@1``) plus the signal as a categorical (``"signal"``). Every rule strategy of the
plan is a point of that space (its ``meta["alphas"]`` and signal), so the rules are enqueued first,
named in ``user_attrs["mixmatch_seed"]``, and the samplers refine around them::

    import mixmatch_plugin as mm
    from mixmatch_plugin.adapters import optuna as mmo

    p = mm.plan(model, calib)                                   # 30 rule strategies, native sparsity
    ev = mmo.ProxyEvaluator(model, val_loader, signals=p.signals)
    res = mmo.search(p, ev, mmo.SearchOptions(n_trials=70), storage="sqlite:///out/search.db", study_name="resnet")
    res.best                                                    # the feasible Pareto front
    mmo.export(res, "out/plan.json")                            # searched points as plan strategies
    mmo.plot_pareto(res, "out/pareto.png")

**Objectives.** ``objective="multi"`` (default): validation accuracy up and global sparsity (or the
sparse-MACs reduction, ``metric="macs"``) up; the result is ``study.best_trials``, the Pareto front.
``objective="single"``: accuracy up, with the budget ``metric >= target`` as a constraint through
:meth:`optuna.trial.Trial.set_constraint`. For a single-objective search at a sparsity target, make
the plan budget-matched at that target (``mm.plan(..., target=S)``): every point then prunes exactly
``round(S * N)`` weights and the comparison with the rules is at equal sparsity.

**Samplers.** ``nsga2`` (multi-objective default; its population defaults to the number of seeds, so
generation 0 is exactly the rules), ``tpe`` (single-objective default; multivariate, constant liar)
and ``gp``; or any :class:`optuna.samplers.BaseSampler`.

**Evaluation** is any callable ``strategy -> {"accuracy": ..., ...}`` (:class:`Evaluator`):
:class:`ProxyEvaluator` (masked validation accuracy and loss, optional BatchNorm re-estimation on
training batches), :class:`FinetuneEvaluator` (a short fine-tune that keeps the masks, then
validation), :class:`CallbackEvaluator` (a user function). Only the loaders you pass are read: pass
the *validation* split, never the test split.

**Storage, resume, workers.** ``storage`` is an Optuna RDB URL (``sqlite:///x.db``,
``postgresql+psycopg2://user@host/db``), a ``.db`` file, a journal file (``journal:PATH``) or None
(in memory). RDB storages use Optuna's heartbeat with
:class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`: a trial whose worker was killed is failed
once its heartbeat is stale and re-queued, finished trials are never touched, and rerunning the same
command continues the study (``total_trials`` stops it at the same end point, through
:class:`~optuna.study.MaxTrialsCallback`). A trial cut short by Ctrl-C is failed; a rule seed cut
short is queued again by the next run. Opening the storage, the study and seeding run under one lock
(a file lock beside a SQLite or journal file, a PostgreSQL advisory lock), so concurrent workers
enqueue every rule exactly once.

**MACs.** :class:`MacsProfile` measures each weight layer's dense MACs once with forward hooks and
estimates a strategy's unstructured *sparse-MACs count* as ``sum_l (1 - ratio_l) * MACs_l``.

**Modules.** :mod:`.evaluators` (strategy -> metrics, sparse MACs), :mod:`.search` (space, storages,
the search, results, export) and :mod:`.plots` (Optuna's matplotlib plots).
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
