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
    res = mmo.search(p, ev, storage="sqlite:///out/search.db", study_name="resnet", n_trials=70)
    res.best                                                    # the feasible Pareto front
    mmo.export(res, "out/plan.json")                            # searched points as plan strategies
    mmo.plot_pareto(res, "out/pareto.png")

**Objectives.** ``objective="multi"`` (default): validation accuracy up and global sparsity (or the
sparse-MACs reduction, ``metric="macs"``) up; the result is the Pareto front. ``objective="single"``:
accuracy up, with the budget ``metric >= target`` as a constraint through
:meth:`optuna.trial.Trial.set_constraint` (never the deprecated ``constraints_func``). For a
single-objective search at a sparsity target, make the plan budget-matched at that target
(``mm.plan(..., target=S)``): every point then prunes exactly ``round(S * N)`` weights and the
comparison with the rules is at equal sparsity.

**Samplers.** ``nsga2`` (multi-objective default; its population defaults to the number of seeds, so
generation 0 is exactly the rules), ``tpe`` (single-objective default; multivariate, constant liar)
and ``gp``; or any :class:`optuna.samplers.BaseSampler`.

**Evaluation** is any callable ``strategy -> {"accuracy": ..., ...}`` (:class:`Evaluator`):
:class:`ProxyEvaluator` (masked validation accuracy and loss, optional BatchNorm re-estimation on
training batches), :class:`FinetuneEvaluator` (a short fine-tune that keeps the masks, then
validation), :class:`CallbackEvaluator` (a user function). Only the loaders you pass are read: pass
the *validation* split, never the test split.

**Storage, resume, workers.** ``storage`` is an Optuna RDB URL (``sqlite:///x.db``,
``postgresql+psycopg2://user@host/db``, ``mysql+pymysql://...``), a journal file
(``journal:PATH`` or a path ending in ``.log``/``.journal``/``.jsonl``), a ``.db``/``.sqlite`` path
(SQLite), an Optuna storage object, or None (in memory). RDB storages record a heartbeat: a trial
whose worker died (SIGKILL, lost machine) is failed once its heartbeat is ``grace_period`` old and
re-queued by :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` (up to ``max_retry`` times);
so is one whose worker died before its first heartbeat (Optuna's own check skips such trials), once
it is ``grace_period`` old. On any storage, a RUNNING trial whose worker process (same host name) no
longer exists is failed and re-queued the same way, at the start of every run and after every trial;
this is the only recovery journal files have (they have no heartbeat).
Opening the storage, creating or loading the study and seeding run under one storage-wide lock
(PostgreSQL advisory lock, MySQL ``GET_LOCK``, or an ``flock`` beside a SQLite/journal file), and
seeding skips seeds whose name the study already holds, so re-runs and concurrent workers enqueue
every rule exactly once (and never race to create the tables of a fresh database).

**MACs.** :class:`MacsProfile` measures each weight layer's dense MACs once with forward hooks
(output positions x weight elements, i.e. output spatial size x kernel MACs) and estimates a
strategy's unstructured *sparse-MACs count* as ``sum_l (1 - ratio_l) * MACs_l``. Only the MACs of
weight layers (convolutions, linear layers) are counted: attention score products, normalization and
element-wise operations are not.

**Modules.** :mod:`.evaluators` (strategy -> metrics, sparse MACs), :mod:`.space` (distributions, rule
seeds), :mod:`.storage` (storages, locks, orphaned trials), :mod:`.search` (samplers, the loop,
results, export) and :mod:`.plots`; everything public is re-exported here.
"""

from __future__ import annotations

from mixmatch_plugin.errors import MixMatchError

try:
    import optuna  # noqa: F401 - checked here, once, with an install hint
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise MixMatchError(
        f"the Optuna adapter needs optuna ({_exc}); install it with: pip install 'mixmatch-plugin[optuna]'"
    ) from None

from .evaluators import CallbackEvaluator, Evaluator, FinetuneEvaluator, MacsProfile, ProxyEvaluator
from .plots import param_importances, plot_history, plot_importances, plot_pareto
from .search import SearchResult, TrialRecord, export, make_sampler, quiet, result_of, search, seed_study
from .space import (
    ALPHA_PREFIX,
    METRICS,
    OBJECTIVES,
    RESULT_ATTR,
    SAMPLERS,
    SCORES,
    SEED_ATTR,
    SIGNAL_PARAM,
    WORKER_ATTR,
    params_of,
    plan_fingerprint,
    rule_seeds,
    search_space,
    strategy_of,
)
from .storage import open_storage, recover_orphans, storage_lock

__all__ = [
    "ALPHA_PREFIX", "METRICS", "OBJECTIVES", "RESULT_ATTR", "SAMPLERS", "SCORES", "SEED_ATTR", "SIGNAL_PARAM",
    "WORKER_ATTR", "CallbackEvaluator", "Evaluator", "FinetuneEvaluator", "MacsProfile", "ProxyEvaluator",
    "SearchResult", "TrialRecord", "export", "make_sampler", "open_storage", "param_importances", "params_of",
    "plan_fingerprint", "plot_history", "plot_importances", "plot_pareto", "quiet", "recover_orphans", "result_of",
    "rule_seeds", "search", "search_space", "seed_study", "storage_lock", "strategy_of",
]
