"""The search space, storages, the search itself, its results and their export as plan strategies."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.planning import Plan, load_plan
from mixmatch_plugin.progress import progress_enabled
from mixmatch_plugin.signals import SIGNALS, SignalName, Signals
from mixmatch_plugin.strategies import SHAPES, Strategy, StrategySpace

from .evaluators import Evaluator, MacsProfile

logger = logging.getLogger(__name__)

Objective = Literal["multi", "single"]
Metric = Literal["sparsity", "macs"]
Score = Literal["accuracy", "loss"]
SamplerName = Literal["nsga2", "tpe", "gp"]
SpaceName = Literal["rules", "pool"]
OBJECTIVES, METRICS, SCORES, SAMPLERS = get_args(Objective), get_args(Metric), get_args(Score), get_args(SamplerName)
SPACES = get_args(SpaceName)

SIGNAL_PARAM = "signal"
ALPHA_PREFIX = "alpha:"
BASE_PARAM = "base"
SHIFT_PREFIX = "shift:"
#: The pool space's per-group log-odds shifts lie in [-SHIFT_SPAN, SHIFT_SPAN] (2: a layer at 0.5 can go to 0.12 or 0.88).
SHIFT_SPAN = 2.0
SEED_ATTR = "mixmatch_seed"
RESULT_ATTR = "mixmatch_result"
STUDY_ATTR = "mixmatch"
_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"mixmatch-plugin:storage").digest()[:8], "big", signed=True)


# ============================================================================ the space
def search_space(
    space: StrategySpace, signals: Sequence[str], bases: Sequence[str] | None = None
) -> dict[str, optuna.distributions.BaseDistribution]:
    """Optuna distributions of a strategy space: ``signal`` (categorical), then

    * the ``rules`` space (``bases`` None): one ``alpha:<group>`` in [0, 1] per group of the ranges;
    * the ``pool`` space: ``base``, one of the strategies ``bases`` names, and one log-odds
      ``shift:<group>`` in [-SHIFT_SPAN, SHIFT_SPAN] per group (:meth:`StrategySpace.shifted`).
    """
    dists: dict[str, optuna.distributions.BaseDistribution] = {SIGNAL_PARAM: optuna.distributions.CategoricalDistribution(list(signals))}
    if bases is None:
        return {**dists, **{ALPHA_PREFIX + g: optuna.distributions.FloatDistribution(0.0, 1.0) for g in space.groups}}
    return {**dists, BASE_PARAM: optuna.distributions.CategoricalDistribution(list(bases)),
            **{SHIFT_PREFIX + g: optuna.distributions.FloatDistribution(-SHIFT_SPAN, SHIFT_SPAN) for g in space.shift_groups}}


def pool_bases(plan: Plan) -> dict[str, Strategy]:
    """The strategies the ``pool`` space moves: every strategy of the plan but earlier searches' exports."""
    return {s.name: s for s in plan.strategies if s.meta.get("source") != "optuna"}


def params_of(strategy: Strategy, space: StrategySpace | None = None) -> dict[str, Any]:
    """The search-space point of a strategy: of the ``pool`` space (``space`` given: the strategy
    itself as base, no shift), else of the ``rules`` space (built from alphas, as every rule strategy is)."""
    if space is not None:
        return {SIGNAL_PARAM: strategy.signal, BASE_PARAM: strategy.name, **dict.fromkeys(
            (SHIFT_PREFIX + g for g in space.shift_groups), 0.0)}
    alphas = strategy.meta.get("alphas")
    if not isinstance(alphas, Mapping):
        raise MixMatchError(f"strategy {strategy.name!r} has no per-group alphas (meta['alphas']): it is not a point of the space")
    return {SIGNAL_PARAM: strategy.signal, **{ALPHA_PREFIX + g: float(a) for g, a in alphas.items()}}


def strategy_of(space: StrategySpace, params: Mapping[str, Any], name: str, meta: Mapping[str, Any] | None = None,
                bases: Mapping[str, Strategy] | None = None) -> Strategy:
    """Rebuild the strategy of a search-space point (``params`` as Optuna stores them; ``bases``: the pool space's)."""
    if bases is not None:
        shifts = {k[len(SHIFT_PREFIX):]: float(v) for k, v in params.items() if k.startswith(SHIFT_PREFIX)}
        s = space.shifted(bases[str(params[BASE_PARAM])], shifts, name, str(params[SIGNAL_PARAM]))
        s.meta.update(meta or {})
        return s
    alphas = {k[len(ALPHA_PREFIX):]: float(v) for k, v in params.items() if k.startswith(ALPHA_PREFIX)}
    return space.strategy(name, str(params[SIGNAL_PARAM]), alphas, meta)


def rule_seeds(plan: Plan, signals: Sequence[str] | None = None) -> list[Strategy]:
    """The plan's rule strategies (``meta["shape"]`` one of the ten shapes) for ``signals``, checked to be
    reproduced *exactly* by the plan's space (else the plan was made by another version: regenerate it)."""
    space = plan.space()
    out = []
    for s in plan.strategies:
        if s.meta.get("shape") not in SHAPES or not isinstance(s.meta.get("alphas"), Mapping):
            continue
        if signals is not None and s.signal not in signals:
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


# ============================================================================== storage
def _locate(storage: str | os.PathLike[str]) -> tuple[str | Path, Path | None]:
    """An RDB URL or a journal file, and the lock file of a file database (None for a server)."""
    text = os.fspath(storage).strip()
    if text.startswith("journal:") or Path(text).suffix in _JOURNAL_SUFFIXES:
        if not (rest := text.removeprefix("journal:").removeprefix("//")):
            raise MixMatchError(f"storage {text!r}: journal storage needs a file, e.g. journal:out/search.log")
        path = Path(rest).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, path.with_name(path.name + ".lock")
    if "://" not in text:
        if Path(text).suffix not in _SQLITE_SUFFIXES:
            raise MixMatchError(
                f"bad storage {text!r}: pass an RDB URL (sqlite:///search.db, postgresql+psycopg2://user@host/db), "
                "a journal file (journal:PATH or *.log), or a *.db SQLite file"
            )
        text = f"sqlite:///{Path(text).expanduser().absolute()}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(text)
        url.get_dialect()
    except (ArgumentError, NoSuchModuleError):
        raise MixMatchError(
            f"bad storage URL {text!r}: expected an RDB URL such as sqlite:///search.db or "
            "postgresql+psycopg2://user@host:5432/db, or a journal file (journal:PATH)"
        ) from None
    except ImportError as exc:
        raise MixMatchError(f"storage URL {text!r} needs a database driver that is not installed ({exc})") from None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database).expanduser().absolute()
        db.parent.mkdir(parents=True, exist_ok=True)
        return text, db.with_name(db.name + ".lock")
    return text, None


def _display(where: str | Path) -> str:
    if isinstance(where, Path):
        return f"journal:{where}"
    from sqlalchemy.engine import make_url

    return make_url(where).render_as_string(hide_password=True)


def open_storage(
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None,
    *,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> optuna.storages.BaseStorage:
    """Open ``storage`` as an Optuna storage: an RDB URL, a ``.db`` file, ``journal:PATH`` (or ``*.log``), None (memory).

    RDB storages get Optuna's heartbeat: a trial whose worker died (SIGKILL, lost machine) is failed once
    its heartbeat is ``grace_period`` (default ``2 * heartbeat_interval``) seconds old and re-queued by
    :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback` (up to ``max_retry`` times). Journal
    files have no heartbeat. Connection problems become one-line :class:`MixMatchError`.
    """
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if storage is None:
        return optuna.storages.InMemoryStorage()
    where, _ = _locate(storage)
    if isinstance(where, Path):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(where)))
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if where.startswith("sqlite") else {}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                if heartbeat_interval:
                    kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                  heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
                return optuna.storages.RDBStorage(where, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            first = first_line(exc)
            # Optuna creates a new database's tables on first open: a process outside the storage lock (a
            # dashboard) doing it at the same moment makes this one fail; opening again finds the tables
            if attempt < 3 and any(s in first for s in ("alembic_version", "version_info", "already exists")):
                time.sleep(0.1 * (attempt + 1))
                continue
            raise MixMatchError(f"cannot open storage {_display(where)} ({first}); check the URL and that the server is running") from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def storage_lock(storage: Any) -> Iterator[None]:
    """A lock shared by every worker of ``storage``, held while it opens the storage, the study, and seeds.

    A file database (SQLite, journal) gets a :class:`filelock.FileLock` beside it; PostgreSQL a session
    advisory lock. The kernel or the server releases either when its holder dies. Other storages: none.
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        yield
        return
    where, lock_file = _locate(storage)
    if lock_file is not None:
        from filelock import FileLock

        with FileLock(lock_file):
            yield
        return
    if not (isinstance(where, str) and where.startswith("postgresql")):
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.pool import NullPool

    engine = create_engine(where, poolclass=NullPool)
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        raise MixMatchError(f"cannot open storage {_display(where)} ({first_line(exc)}); "
                            "check the URL and that the server is running") from None
    try:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        conn.commit()
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        conn.commit()
        conn.close()
        engine.dispose()


def seed_study(study: optuna.Study, seeds: Sequence[Strategy], space: StrategySpace | None = None) -> int:
    """Enqueue the seed strategies the study does not hold yet (by name, in ``user_attrs``); returns how many.

    A seed counts as present in any state but FAIL: one cut short by Ctrl-C is queued again (a killed
    worker's seed is re-queued by the heartbeat, and its copy counts). Call it under :func:`storage_lock`.
    ``space``: seed the ``pool`` space (see :func:`params_of`).
    """
    have = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
    todo = [s for s in seeds if s.name not in have]
    for s in todo:
        study.enqueue_trial(params_of(s, space), user_attrs={SEED_ATTR: s.name})
    return len(todo)


def quiet() -> None:
    """Silence Optuna's per-trial lines and its traceback of a failed trial (the CLI does this unless ``-v``:
    an error that ends a trial ends the command too, which reports it in one line)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def make_sampler(
    name: SamplerName | optuna.samplers.BaseSampler | None, objective: Objective, *, seed: int | None = None,
    population_size: int | None = None, n_seeds: int = 0, deterministic: bool = False,
) -> optuna.samplers.BaseSampler:
    """``nsga2`` (multi-objective default), ``tpe`` (single-objective default) or ``gp``, or a sampler object."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    name = name or ("nsga2" if objective == "multi" else "tpe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if name == "nsga2":
            pop = population_size if population_size is not None else max(n_seeds, 10)
            if pop < 2:
                raise MixMatchError(f"population_size must be at least 2, got {pop}")
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, deterministic_objective=deterministic)
    raise MixMatchError(f"unknown sampler {name!r}; choose {', '.join(SAMPLERS)}")


# ================================================================================ results
@dataclass
class TrialRecord:
    """One finished trial: its strategy and what it scored.

    Attributes:
        number: the Optuna trial number.
        strategy: the strategy (named after the seed for rule strategies, ``<signal>:search-<study>-t<n>`` otherwise).
        accuracy: validation accuracy (the score; loss when ``score="loss"``).
        x: the second axis, global sparsity or the sparse-MACs reduction.
        seed: the rule strategy's name for seed trials, else None.
        feasible: every constraint <= 0.
        seconds: evaluation wall time.
        metrics: everything the evaluator returned.
        retry_of: the trial this one re-runs (a killed worker's), or None.
    """

    number: int
    strategy: Strategy
    accuracy: float
    x: float
    seed: str | None
    feasible: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    retry_of: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial": self.number, "strategy": self.strategy.name, "signal": self.strategy.signal,
            "accuracy": self.accuracy, "x": self.x, "global_sparsity": self.strategy.global_sparsity,
            "seed": self.seed, "feasible": self.feasible, "seconds": self.seconds, "metrics": self.metrics,
            "retry_of": self.retry_of,
        }


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        study: the Optuna study (still attached to its storage).
        plan: the plan searched.
        trials: every COMPLETE trial, in trial order.
        best: the feasible Pareto front (``study.best_trials``, by ascending ``x``; a seed and a searched
            copy of it count once) or the best feasible trial (``study.best_trial``); empty when none is feasible.
        best_rule: the best feasible seed (highest score, then highest ``x``).
    """

    study: optuna.Study
    plan: Plan
    objective: Objective
    metric: Metric
    score: Score
    target: float | None
    trials: list[TrialRecord]
    best: list[TrialRecord]
    best_rule: TrialRecord | None
    storage: str
    evaluator: str = "evaluator"

    @property
    def x_label(self) -> str:
        return "global sparsity" if self.metric == "sparsity" else "MACs removed (sparse-MACs count)"

    @property
    def seconds_per_trial(self) -> float:
        """Mean evaluation wall time of the completed trials (seconds)."""
        return float(np.mean([t.seconds for t in self.trials])) if self.trials else float("nan")

    @property
    def wall_per_trial(self) -> float:
        """Mean wall time from trial start to completion, storage and sampler included (seconds)."""
        spans = [(t.datetime_complete - t.datetime_start).total_seconds()
                 for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.datetime_start and t.datetime_complete]
        return float(np.mean(spans)) if spans else float("nan")

    def states(self) -> dict[str, int]:
        """Number of trials per state (COMPLETE, FAIL, RUNNING, WAITING ...)."""
        return dict(collections.Counter(t.state.name for t in self.study.get_trials(deepcopy=False)))


def _better(score: str) -> Callable[[TrialRecord], tuple[float, float]]:
    sign = 1.0 if score == "accuracy" else -1.0
    return lambda r: (sign * r.accuracy, r.x)


def _trial_record(t: FrozenTrial, space: StrategySpace, score: str, study_name: str,
                  bases: Mapping[str, Strategy] | None) -> TrialRecord:
    seed = t.user_attrs.get(SEED_ATTR)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "study"
    name = seed if isinstance(seed, str) else f"{t.params[SIGNAL_PARAM]}:search-{slug}-t{t.number}"
    meta: dict[str, Any] = {"source": "optuna", "study": study_name, "trial": t.number, **({"seed": seed} if seed else {})}
    s = strategy_of(space, t.params, name, meta, bases)
    metrics = dict(t.user_attrs.get("metrics") or {})
    res = t.user_attrs.get(RESULT_ATTR) or {}
    return TrialRecord(
        t.number, s, float(metrics.get(score, (t.values or [float("nan")])[0])), float(res.get("x", s.global_sparsity)),
        seed if isinstance(seed, str) else None, all(v <= 0.0 for v in t.constraints.values()),
        float(res.get("seconds", float("nan"))), metrics, t.system_attrs.get("failed_trial"),
    )


def result_of(study: optuna.Study, plan: Plan, *, evaluator_name: str = "evaluator", storage: str = "") -> SearchResult:
    """Collect a study's finished trials into a :class:`SearchResult` (also for a study loaded later)."""
    info = study.user_attrs.get(STUDY_ATTR)
    if not isinstance(info, Mapping):
        raise MixMatchError(f"study {study.study_name!r} was not made by mixmatch search")
    if info.get("plan") != plan_fingerprint(plan):
        raise MixMatchError(f"study {study.study_name!r} was made for another plan; pass the plan it was searched on")
    space, score = plan.space(), str(info["score"])
    bases = pool_bases(plan) if info.get("space") == "pool" else None
    # the best trials first: another worker may finish a trial between two queries, and a trial once complete stays so,
    # so every best trial is among the completed trials read after them
    if info["objective"] == "multi":
        best_numbers = [t.number for t in study.best_trials]
    else:
        try:
            best_numbers = [study.best_trial.number]
        except ValueError:  # no feasible completed trial yet
            best_numbers = []
    records = [_trial_record(t, space, score, study.study_name, bases) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    by_number = {r.number: r for r in records}
    best = [by_number[n] for n in best_numbers]
    if info["objective"] == "multi":
        sign = 1.0 if score == "accuracy" else -1.0
        front = sorted(best, key=lambda r: (r.x, -sign * r.accuracy, r.number))
        best = [r for i, r in enumerate(front) if not any((o.x, o.accuracy) == (r.x, r.accuracy) for o in front[:i])]
    seeds = [r for r in records if r.feasible and r.seed is not None]
    best_rule = max(seeds, key=lambda r: (*_better(score)(r), -r.number)) if seeds else None
    return SearchResult(study, plan, info["objective"], info["metric"], info["score"], info.get("target"),
                        records, best, best_rule, storage, evaluator_name)


# ================================================================================= search
@dataclass(frozen=True)
class SearchOptions:
    """How :func:`search` runs.

    Attributes:
        n_trials: trials this call runs (Optuna's meaning); None runs until ``total_trials`` or ``timeout``.
        total_trials: stop once the study holds this many COMPLETE trials (all workers together,
            :class:`~optuna.study.MaxTrialsCallback`); the way to resume a killed run to the same end point.
        timeout: start no trial after this many seconds.
        objective: ``"multi"`` (score and ``metric`` both up; Pareto front) or ``"single"`` (score up,
            ``metric >= target`` as a constraint).
        metric: ``"sparsity"`` (global sparsity) or ``"macs"`` (sparse-MACs reduction; needs ``macs``).
        target: the budget in [0, 1): constraint ``metric >= target`` (``trial.set_constraint("budget", ...)``).
            Single-objective with ``metric="sparsity"`` defaults to the plan's own target.
        score: ``"accuracy"`` (maximized) or ``"loss"`` (minimized), read from the evaluator's metrics.
        sampler: ``"nsga2"``, ``"tpe"``, ``"gp"`` or a sampler object (default by objective).
        sampler_seed: the sampler's seed. Give each worker its own (or None), or they propose the same points.
        population_size: NSGA-II population (default: the number of seeds, at least 10).
        signals: the signals the search may choose (default: the plan's, and in the pool space its strategies').
        macs: a :class:`MacsProfile` of the model (needed for ``metric="macs"``; recorded when given).
        space: ``"rules"``: per-group alphas inside the ranges, seeded by the plan's rule strategies
            (the paper's refinement). ``"pool"``: any of the plan's strategies (rules, score family,
            measured: :func:`pool_bases`) as base, with per-group log-odds shifts of its allocation,
            seeded by all of them; needs a budget-matched plan and ``objective="single"``.
        seed_rules: enqueue the space's seeds first.
        heartbeat_interval, grace_period, max_retry: see :func:`open_storage`.
        catch: exception types that fail a trial without stopping the search.
        callbacks: Optuna callbacks run after every trial.
    """

    n_trials: int | None = 40
    total_trials: int | None = None
    timeout: float | None = None
    objective: Objective = "multi"
    metric: Metric = "sparsity"
    target: float | None = None
    score: Score = "accuracy"
    sampler: SamplerName | optuna.samplers.BaseSampler | None = None
    sampler_seed: int | None = None
    population_size: int | None = None
    signals: tuple[SignalName, ...] | None = None
    macs: MacsProfile | None = None
    space: SpaceName = "rules"
    seed_rules: bool = True
    heartbeat_interval: int | None = 10
    grace_period: int | None = None
    max_retry: int | None = 3
    catch: tuple[type[Exception], ...] = ()
    callbacks: tuple[Callable[[optuna.Study, FrozenTrial], None], ...] = ()


def _validate(p: Plan, o: SearchOptions, study_name: str) -> float | None:
    """Check the options (one-line errors); returns the effective target."""
    for value, allowed, what in ((o.objective, OBJECTIVES, "objective"), (o.metric, METRICS, "metric"), (o.score, SCORES, "score")):
        if value not in allowed:
            raise MixMatchError(f"unknown {what} {value!r}; choose {' or '.join(allowed)}")
    if o.space not in SPACES:
        raise MixMatchError(f"unknown space {o.space!r}; choose {' or '.join(SPACES)}")
    if o.space == "pool" and (o.objective != "single" or p.meta.get("target") is None):
        raise MixMatchError("the pool space moves budget between layers at the plan's budget: use objective='single' "
                            "(CLI --objective single) on a plan made at a target (`mixmatch plan --target S`)")
    if isinstance(o.sampler, str) and o.sampler not in SAMPLERS:
        raise MixMatchError(f"unknown sampler {o.sampler!r}; choose {', '.join(SAMPLERS)}")
    target = o.target
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0):
        raise MixMatchError(f"target must be a number in [0, 1), got {target!r}")
    if o.n_trials is not None and o.n_trials < 0:
        raise MixMatchError(f"n_trials must be 0 or more, got {o.n_trials}")
    if o.total_trials is not None and o.total_trials < 1:
        raise MixMatchError(f"total_trials must be at least 1, got {o.total_trials}")
    if o.n_trials is None and o.total_trials is None and o.timeout is None:
        raise MixMatchError("give n_trials, total_trials or timeout: the search would never stop")
    if o.metric == "macs" and o.macs is None:
        raise MixMatchError("metric 'macs' needs macs=MacsProfile.measure(model, input_shape)")
    if not re.fullmatch(r"[^\x00-\x1f]{1,200}", study_name or ""):
        raise MixMatchError(f"study name {study_name!r} must be 1-200 printable characters")
    plan_target = p.meta.get("target")
    if o.objective == "single" and target is None:
        if o.metric != "sparsity" or plan_target is None:
            what = "fraction of MACs removed" if o.metric == "macs" else "global sparsity"
            raise MixMatchError(
                f"a single-objective search needs target=<{what} in [0, 1)> (CLI: --target), "
                "or for sparsity a plan budget-matched at it (`mixmatch plan --target S`)"
            )
        target = float(plan_target)
    if o.metric == "sparsity" and target is not None and plan_target is not None and target > float(plan_target) + 1e-9:
        raise MixMatchError(
            f"the plan is budget-matched at sparsity {plan_target}: no point reaches target {target}; "
            f"make the plan at that target (`mixmatch plan --target {target}`) or lower the target"
        )
    if o.objective == "multi" and o.metric == "sparsity" and plan_target is not None:
        logger.warning("the plan is budget-matched at %s: every point has that sparsity, so the front has one point; "
                       "use objective='single' or metric='macs'", plan_target)
    return None if target is None else float(target)


def search(
    plan: Plan | str | os.PathLike[str],
    evaluator: Evaluator | Callable[[Strategy], float | Mapping[str, float]],
    options: SearchOptions | None = None,
    *,
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None = None,
    study_name: str = "mixmatch",
    progress: bool = False,
) -> SearchResult:
    """Refine the plan's rule strategies with Optuna; resumable and safe for many workers.

    Args:
        plan: a :class:`~mixmatch_plugin.Plan` or the path of its JSON.
        evaluator: an :class:`Evaluator` (any callable ``strategy -> accuracy or metrics``).
        options: see :class:`SearchOptions` (default: 40 trials, multi-objective, NSGA-II).
        storage: see :func:`open_storage`; None keeps the study in memory (no resume).
        study_name: the study; workers sharing ``storage`` and ``study_name`` share the search.
        progress: show Optuna's progress bar over this call's trials.

    Raises:
        MixMatchError: bad options, a storage that cannot be opened, a study that exists with
            another objective or for another plan.
    """
    o = options or SearchOptions()
    p = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    target = _validate(p, o, study_name)
    if not callable(evaluator):
        raise MixMatchError(f"the evaluator must be callable (strategy -> metrics), got {type(evaluator).__name__}")
    space = p.space()
    pool = pool_bases(p) if o.space == "pool" else None
    if pool is not None and not (pool and space.shift_groups):
        raise MixMatchError("the pool space needs a plan with strategies and prunable layers; make it with `mixmatch plan --target S`")
    if pool is None and not space.groups:
        raise MixMatchError("the plan's ranges leave nothing to search (every layer has low == high); widen the ranges")
    plan_signals = [s for s in (p.meta.get("signals") or []) if s in SIGNALS] or sorted({s.signal for s in p.strategies if s.signal in SIGNALS})
    if pool is not None:  # every base with its own signal
        plan_signals += sorted({s.signal for s in pool.values() if s.signal in SIGNALS} - set(plan_signals))
    choices = list(o.signals) if o.signals is not None else plan_signals
    if not choices or any(s not in SIGNALS for s in choices):
        raise MixMatchError(f"signals {list(choices)!r}: choose from {', '.join(SIGNALS)}")
    have = getattr(evaluator, "signals", None)
    if missing := [s for s in choices if isinstance(have, Signals) and s not in have.available]:
        raise MixMatchError(f"the evaluator has no {missing[0]!r} scores: build it with signals=compute_signals(model, calib), "
                            f"or search only {', '.join(have.available)} (signals=...)")  # type: ignore[union-attr]
    if pool is None:
        seeds = rule_seeds(p, choices) if o.seed_rules else []
    else:
        seeds = [s for s in pool.values() if s.signal in choices] if o.seed_rules else []
    info = {"plan": plan_fingerprint(p), "objective": o.objective, "metric": o.metric, "target": target, "score": o.score,
            "signals": choices, "groups": list(space.groups if pool is None else space.shift_groups), "space": o.space,
            "bases": None if pool is None else hashlib.sha256(json.dumps(list(pool)).encode()).hexdigest()[:16]}
    first = optuna.study.StudyDirection.MAXIMIZE if o.score == "accuracy" else optuna.study.StudyDirection.MINIMIZE
    directions = [first] + ([optuna.study.StudyDirection.MAXIMIZE] if o.objective == "multi" else [])
    sampler = make_sampler(o.sampler, o.objective, seed=o.sampler_seed, population_size=o.population_size,
                           n_seeds=len(seeds), deterministic=bool(getattr(evaluator, "deterministic", False)))
    display = "memory" if storage is None else "object" if isinstance(storage, optuna.storages.BaseStorage) else _display(_locate(storage)[0])
    with storage_lock(storage):  # two workers creating the tables of a new database, or seeding, at once collide
        store = open_storage(storage, heartbeat_interval=o.heartbeat_interval, grace_period=o.grace_period, max_retry=o.max_retry)
        study = _open_study(store, study_name, sampler, directions, info, display)
        added = seed_study(study, seeds, space if pool is not None else None)
    if added:
        logger.info("enqueued %d strategies as seeds of study %r", added, study_name)
    # a budget-matched point prunes round(S * N) weights: allow half a weight of rounding below the target
    tol = 0.5 / max(float(space.n.sum()), 1.0) if o.metric == "sparsity" else 1e-9
    objective = functools.partial(_objective, space=space, evaluator=evaluator, options=o, dists=search_space(space, choices, None if pool is None else list(pool)),
                                  bases=pool, target=target, tol=tol)
    callbacks = list(o.callbacks)
    if o.total_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(o.total_trials, states=(TrialState.COMPLETE,)))
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if o.total_trials is None or done < o.total_trials:
        study.optimize(objective, n_trials=o.n_trials, timeout=o.timeout, catch=o.catch, callbacks=callbacks,
                       gc_after_trial=False, show_progress_bar=progress and progress_enabled())
    return result_of(study, p, evaluator_name=str(getattr(evaluator, "name", "evaluator")), storage=display)


def _open_study(store: optuna.storages.BaseStorage, study_name: str, sampler: optuna.samplers.BaseSampler,
                directions: Sequence[optuna.study.StudyDirection], info: Mapping[str, Any], display: str) -> optuna.Study:
    """Create or load the study and check that it was made for this plan and these settings."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        study = optuna.create_study(storage=store, sampler=sampler, study_name=study_name, directions=directions, load_if_exists=True)
    except SQLAlchemyError as exc:
        raise MixMatchError(f"cannot open study {study_name!r} in {display} ({first_line(exc)})") from None
    if list(study.directions) != list(directions):
        raise MixMatchError(
            f"study {study_name!r} in {display} exists with {len(study.directions)} objective(s) "
            f"({', '.join(d.name.lower() for d in study.directions)}); use another --study name for this objective"
        )
    if (old := study.user_attrs.get(STUDY_ATTR)) is None:
        study.set_user_attr(STUDY_ATTR, dict(info))
        return study
    for key in ("plan", "objective", "metric", "target", "score", "signals", "space", "bases"):
        if old.get(key, "rules" if key == "space" else None) != info.get(key):
            raise MixMatchError(f"study {study_name!r} in {display} was made with {key} {old.get(key)!r}, not {info.get(key)!r}; "
                                "use the same settings to resume, or another --study name")
    return study


def _objective(trial: optuna.Trial, *, space: StrategySpace, evaluator: Callable[[Strategy], Any], options: SearchOptions,
               dists: Mapping[str, optuna.distributions.BaseDistribution], bases: Mapping[str, Strategy] | None,
               target: float | None, tol: float) -> float | tuple[float, float]:
    params: dict[str, Any] = {}
    for k, d in dists.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            params[k] = trial.suggest_categorical(k, d.choices)
        elif isinstance(d, optuna.distributions.FloatDistribution):
            params[k] = trial.suggest_float(k, d.low, d.high)
    seed = trial.user_attrs.get(SEED_ATTR)
    strategy = strategy_of(space, params, seed if isinstance(seed, str) else f"{params[SIGNAL_PARAM]}:search-t{trial.number}", bases=bases)
    t0 = time.perf_counter()
    raw, seconds = evaluator(strategy), time.perf_counter() - t0
    metrics = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {"accuracy": float(raw)}
    if options.score not in metrics:
        raise MixMatchError(f"the evaluator returned {sorted(metrics)} but no {options.score!r}; return a mapping with {options.score!r}")
    value = float(metrics[options.score])
    macs = options.macs
    x = macs.reduction(strategy) if options.metric == "macs" and macs is not None else strategy.global_sparsity
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if math.isfinite(v)})
    result: dict[str, Any] = {"x": x, "global_sparsity": strategy.global_sparsity, "seconds": seconds}
    if macs is not None:
        result["macs_reduction"] = macs.reduction(strategy)
    trial.set_user_attr(RESULT_ATTR, result)
    if target is not None:
        trial.set_constraint("budget", target - x - tol)
    if not math.isfinite(value):
        logger.warning("trial %d: the evaluator returned %s %s: the trial fails", trial.number, options.score, value)
    return (value, x) if options.objective == "multi" else value


# ================================================================================= export
def export(
    result: SearchResult, path: str | os.PathLike[str] | None = None, *, which: Literal["best", "all"] = "best",
    top: int | None = None,
) -> Plan:
    """The plan with the searched strategies appended as ordinary strategies; written atomically to ``path``.

    Args:
        result: from :func:`search`.
        path: where to write the plan JSON. When it already holds a plan for the same model and
            ranges, the strategies are added to *that* plan (replacing earlier exports of the same
            names), so several studies can export into one file.
        which: ``"best"`` (the Pareto front or the single best) or ``"all"`` (every completed trial).
        top: keep at most this many (the best by score; for a front, evenly spaced along it).

    Seeds among the exported trials are already in the plan under their rule names and are not
    duplicated; ``plan.meta["search"]["best"]`` lists the names of the best strategies either way.
    """
    if which not in ("best", "all"):
        raise MixMatchError(f"which must be 'best' or 'all', got {which!r}")
    if top is not None and top < 1:
        raise MixMatchError(f"top must be at least 1, got {top}")
    picked = list(result.best if which == "best" else result.trials)
    if top is not None and len(picked) > top:
        if which == "best" and result.objective == "multi":
            picked = [picked[i] for i in np.unique(np.round(np.linspace(0, len(picked) - 1, top)).astype(int))]
        else:
            picked = sorted(picked, key=_better(result.score), reverse=True)[:top]
    base = result.plan
    if path is not None and Path(path).exists():
        base = load_plan(Path(path))
        if plan_fingerprint(base) != plan_fingerprint(result.plan):
            raise MixMatchError(f"{path} holds a plan for another model or ranges; export to a new file")
    out = dataclasses.replace(base, strategies=list(base.strategies), meta=copy.deepcopy(base.meta), signals=result.plan.signals)
    for r in (r for r in picked if r.seed is None):
        s = copy.deepcopy(r.strategy)
        s.meta.update({"objective": result.objective, "metric": result.metric, "score": result.score,
                       "validation": {result.score: r.accuracy, **r.metrics}, "x": r.x, "evaluator": result.evaluator})
        out.strategies = [t for t in out.strategies if t.name != s.name] + [s]
    out.meta["search"] = {
        "study": result.study.study_name, "storage": result.storage, "objective": result.objective,
        "metric": result.metric, "score": result.score, "target": result.target, "evaluator": result.evaluator,
        "trials": len(result.trials), "best": [r.strategy.name for r in result.best],
        "best_rule": result.best_rule.strategy.name if result.best_rule else None,
    }
    if path is not None:
        out.save(Path(path))
        logger.info("exported %d searched strategies to %s", sum(r.seed is None for r in picked), path)
    return out
