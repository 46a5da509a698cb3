"""Seeding, samplers, the search loop, its results and their export as plan strategies."""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.interrupts import deferred, sigint_defers, undeferred
from mixmatch_plugin.plan import Plan, load_plan
from mixmatch_plugin.progress import progress_bar
from mixmatch_plugin.signals import SIGNALS, Signals
from mixmatch_plugin.strategies import Strategy, StrategySpace

from .evaluators import Evaluator, MacsProfile
from .space import (
    ALPHA_PREFIX,
    METRICS,
    OBJECTIVES,
    RESULT_ATTR,
    SAMPLERS,
    SCORES,
    SEED_ATTR,
    SIGNAL_PARAM,
    STUDY_ATTR,
    WORKER_ATTR,
    params_of,
    plan_fingerprint,
    rule_seeds,
    strategy_of,
)
from .storage import (
    NoInterruptTraceback,
    StorageSpec,
    fail_stale,
    heartbeat_on,
    open_spec,
    parse_storage,
    recover_orphans,
    requeue_interrupted,
    storage_lock,
    worker_token,
)

logger = logging.getLogger(__name__)


# ================================================================================ seeding
def seed_study(study: optuna.Study, seeds: Sequence[Strategy]) -> int:
    """Enqueue the seed strategies the study does not hold yet (by name, in ``user_attrs``); returns how many.

    Call it under :func:`storage_lock` when several workers may seed at once (:func:`search` does).
    A seed counts as present in any state (waiting, running, done, failed, or re-queued).
    """
    have = {t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False)}
    added = 0
    for s in seeds:
        if s.name in have:
            continue
        study.enqueue_trial(params_of(s), user_attrs={SEED_ATTR: s.name})
        added += 1
    return added


def quiet() -> None:
    """Silence Optuna's per-trial INFO lines (the CLI does this unless ``-v``)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ============================================================================== samplers
def make_sampler(
    name: str | optuna.samplers.BaseSampler | None, objective: str, *, seed: int | None = None,
    population_size: int | None = None, n_seeds: int = 0, deterministic: bool = False,
) -> optuna.samplers.BaseSampler:
    """``nsga2`` (multi-objective default), ``tpe`` (single-objective default) or ``gp``, or a sampler object."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name is None:
        name = "nsga2" if objective == "multi" else "tpe"
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
        best: the feasible Pareto front (multi-objective, by ascending ``x``) or the best feasible
            trial (single-objective); empty when no trial is feasible.
        best_rule: the best feasible seed under the same criterion (for single-objective: highest
            score; for multi-objective: highest score among seeds).
    """

    study: optuna.Study
    plan: Plan
    objective: str
    metric: str
    score: str
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
        spans = [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.datetime_start and t.datetime_complete
        ]
        return float(np.mean(spans)) if spans else float("nan")

    def states(self) -> dict[str, int]:
        """Number of trials per state (COMPLETE, FAIL, RUNNING, WAITING ...)."""
        out: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            out[t.state.name] = out.get(t.state.name, 0) + 1
        return out


def _better(score: str) -> Callable[[TrialRecord], tuple[float, float]]:
    sign = 1.0 if score == "accuracy" else -1.0
    return lambda r: (sign * r.accuracy, r.x)


def _records(study: optuna.Study, space: StrategySpace, info: Mapping[str, Any], study_name: str) -> list[TrialRecord]:
    out = []
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study_name).strip("-") or "study"
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        seed = t.user_attrs.get(SEED_ATTR)
        name = seed if isinstance(seed, str) else f"{t.params[SIGNAL_PARAM]}:search-{slug}-t{t.number}"
        metrics = dict(t.user_attrs.get("metrics") or {})
        meta: dict[str, Any] = {"source": "optuna", "study": study_name, "trial": t.number}
        if isinstance(seed, str):
            meta["seed"] = seed
        s = strategy_of(space, t.params, name, meta)
        values = list(t.values or [])
        acc = float(metrics.get(info["score"], values[0] if values else float("nan")))
        res = t.user_attrs.get(RESULT_ATTR) or {}
        x = float(res.get("x", s.global_sparsity))
        feasible = all(v <= 0.0 for v in t.constraints.values())
        out.append(TrialRecord(
            t.number, s, acc, x, seed if isinstance(seed, str) else None, feasible,
            float(res.get("seconds", float("nan"))), metrics, t.system_attrs.get("failed_trial"),
        ))
    return out


def _pareto(records: Sequence[TrialRecord], score: str) -> list[TrialRecord]:
    sign = 1.0 if score == "accuracy" else -1.0
    pts = [r for r in records if r.feasible]
    front = []
    for r in pts:
        a, x = sign * r.accuracy, r.x
        dominated = any(
            (sign * o.accuracy >= a and o.x >= x) and (sign * o.accuracy > a or o.x > x) for o in pts if o is not r
        )
        if not dominated:
            front.append(r)
    front.sort(key=lambda r: (r.x, -sign * r.accuracy, r.number))
    # identical points (a seed and a searched copy of it): keep the first trial
    uniq: list[TrialRecord] = []
    for r in front:
        if not any(u.x == r.x and u.accuracy == r.accuracy for u in uniq):
            uniq.append(r)
    return uniq


# ================================================================================= search
def _check_target(target: float | None) -> float | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or not 0.0 <= target < 1.0:
        raise MixMatchError(f"target must be a number in [0, 1), got {target!r}")
    return float(target)


def _validate(
    p: Plan, *, objective: str, metric: str, score: str, sampler: Any, target: float | None, n_trials: int | None,
    total_trials: int | None, timeout: float | None, macs: MacsProfile | None, study_name: str,
) -> float | None:
    """Check :func:`search`'s arguments (one-line errors); returns the effective target."""
    if objective not in OBJECTIVES:
        raise MixMatchError(f"unknown objective {objective!r}; choose multi or single")
    if metric not in METRICS:
        raise MixMatchError(f"unknown metric {metric!r}; choose sparsity or macs")
    if score not in SCORES:
        raise MixMatchError(f"unknown score {score!r}; choose accuracy or loss")
    if isinstance(sampler, str) and sampler not in SAMPLERS:
        raise MixMatchError(f"unknown sampler {sampler!r}; choose {', '.join(SAMPLERS)}")
    if not isinstance(sampler, (str, optuna.samplers.BaseSampler)) and sampler is not None:
        raise MixMatchError(f"sampler must be one of {', '.join(SAMPLERS)} or an optuna sampler, got {type(sampler).__name__}")
    target = _check_target(target)
    if n_trials is not None and n_trials < 0:
        raise MixMatchError(f"n_trials must be 0 or more, got {n_trials}")
    if total_trials is not None and total_trials < 1:
        raise MixMatchError(f"total_trials must be at least 1, got {total_trials}")
    if n_trials is None and total_trials is None and timeout is None:
        raise MixMatchError("give n_trials, total_trials or timeout: the search would never stop")
    if metric == "macs" and macs is None:
        raise MixMatchError("metric 'macs' needs macs=MacsProfile.measure(model, input_shape)")
    if not re.fullmatch(r"[^\x00-\x1f]{1,200}", study_name or ""):
        raise MixMatchError(f"study name {study_name!r} must be 1-200 printable characters")
    plan_target = p.meta.get("target")
    if objective == "single" and target is None:
        if metric == "sparsity" and plan_target is not None:
            target = float(plan_target)
        else:
            what = "fraction of MACs removed" if metric == "macs" else "global sparsity"
            raise MixMatchError(
                f"a single-objective search needs target=<{what} in [0, 1)> (CLI: --target), "
                "or for sparsity a plan budget-matched at it (`mixmatch plan --target S`)"
            )
    if metric == "sparsity" and target is not None and plan_target is not None and target > float(plan_target) + 1e-9:
        raise MixMatchError(
            f"the plan is budget-matched at sparsity {plan_target}: no point reaches target {target}; "
            f"make the plan at that target (`mixmatch plan --target {target}`) or lower the target"
        )
    if objective == "multi" and metric == "sparsity" and plan_target is not None:
        logger.warning(
            "the plan is budget-matched at %s: every point has that sparsity, so the front has one point; "
            "use objective='single' or metric='macs'", plan_target,
        )
    return target


def search(
    plan: Plan | str | os.PathLike[str],
    evaluator: Evaluator | Callable[[Strategy], float | Mapping[str, float]],
    *,
    storage: str | os.PathLike[str] | optuna.storages.BaseStorage | None = None,
    study_name: str = "mixmatch",
    n_trials: int | None = 40,
    total_trials: int | None = None,
    timeout: float | None = None,
    objective: str = "multi",
    metric: str = "sparsity",
    target: float | None = None,
    score: str = "accuracy",
    sampler: str | optuna.samplers.BaseSampler | None = None,
    sampler_seed: int | None = None,
    population_size: int | None = None,
    signals: Sequence[str] | None = None,
    macs: MacsProfile | None = None,
    seed_rules: bool = True,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    max_retry: int | None = 3,
    catch: tuple[type[Exception], ...] = (),
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
    progress: bool = False,
) -> SearchResult:
    """Refine the plan's rule strategies with Optuna; resumable and safe for many workers.

    Args:
        plan: a :class:`~mixmatch_plugin.Plan` or the path of its JSON.
        evaluator: an :class:`Evaluator` (or a plain function, wrapped in :class:`CallbackEvaluator`).
        storage: see :func:`open_storage`; None keeps the study in memory (no resume).
        study_name: the study; workers sharing ``storage`` and ``study_name`` share the search.
        n_trials: trials this call runs (Optuna's meaning); None runs until ``total_trials`` or ``timeout``.
        total_trials: stop once the study holds this many COMPLETE trials (all workers together);
            the way to resume a killed run to the same end point.
        timeout: stop starting new trials after this many seconds.
        objective: ``"multi"`` (score and ``metric`` both up; Pareto front) or ``"single"`` (score up,
            ``metric >= target`` as a constraint).
        metric: ``"sparsity"`` (global sparsity) or ``"macs"`` (sparse-MACs reduction; needs ``macs``).
        target: the budget in [0, 1): constraint ``metric >= target`` (``set_constraint("budget", ...)``).
            Single-objective with ``metric="sparsity"`` defaults to the plan's own target.
        score: ``"accuracy"`` (maximized) or ``"loss"`` (minimized), read from the evaluator's metrics.
        sampler: ``"nsga2"``, ``"tpe"``, ``"gp"`` or a sampler object (default by objective).
        sampler_seed: the sampler's seed. Give each worker a different one (or None), or they
            propose the same points.
        population_size: NSGA-II population (default: the number of seeds, at least 10).
        signals: the signals the search may choose (default: the plan's).
        macs: a :class:`MacsProfile` of the model (needed for ``metric="macs"``; recorded when given).
        seed_rules: enqueue the plan's rule strategies first.
        heartbeat_interval, grace_period, max_retry: see :func:`open_storage`.
        catch: exception types that fail a trial without stopping the search.
        callbacks: Optuna callbacks run after every trial.
        progress: show a progress bar over this call's trials.

    Raises:
        MixMatchError: bad arguments, a storage that cannot be opened, a study that exists with
            another objective or for another plan.
    """
    p = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    target = _validate(
        p, objective=objective, metric=metric, score=score, sampler=sampler, target=target, n_trials=n_trials,
        total_trials=total_trials, timeout=timeout, macs=macs, study_name=study_name,
    )
    if not callable(evaluator):
        raise MixMatchError(f"the evaluator must be callable (strategy -> metrics), got {type(evaluator).__name__}")
    ev = evaluator

    space = p.space()
    if not space.groups:
        raise MixMatchError("the plan's ranges leave nothing to search (every layer has low == high); widen the ranges")
    plan_signals = [s for s in (p.meta.get("signals") or []) if s in SIGNALS] or sorted({s.signal for s in p.strategies if s.signal in SIGNALS})
    choices = list(signals) if signals is not None else plan_signals
    bad = [s for s in choices if s not in SIGNALS]
    if bad or not choices:
        raise MixMatchError(f"signals {list(choices)!r}: choose from {', '.join(SIGNALS)}")
    have = getattr(ev, "signals", None)
    if isinstance(have, Signals):
        missing = [s for s in choices if s not in have.available]
        if missing:
            raise MixMatchError(
                f"the evaluator has no {missing[0]!r} scores: build it with signals=compute_signals(model, calib), "
                f"or search only {', '.join(have.available)} (signals=...)"
            )
    seeds = rule_seeds(p, choices) if seed_rules else []
    # a budget-matched point prunes round(S * N) weights: allow half a weight of rounding below the target
    tol = 0.5 / max(float(space.n.sum()), 1.0) if metric == "sparsity" else 1e-9

    spec = parse_storage(storage) if not isinstance(storage, optuna.storages.BaseStorage) else StorageSpec("object")
    first_dir = optuna.study.StudyDirection.MAXIMIZE if score == "accuracy" else optuna.study.StudyDirection.MINIMIZE
    directions = [first_dir] + ([optuna.study.StudyDirection.MAXIMIZE] if objective == "multi" else [])
    smp = make_sampler(
        sampler, objective, seed=sampler_seed, population_size=population_size, n_seeds=len(seeds),
        deterministic=bool(getattr(ev, "deterministic", False)),
    )
    info = {
        "plan": plan_fingerprint(p), "objective": objective, "metric": metric, "target": target, "score": score,
        "signals": choices, "groups": list(space.groups),
    }
    study, added = _open_study(spec, storage, study_name, smp, directions, info, seeds, heartbeat_interval, grace_period, max_retry)
    if added:
        logger.info("enqueued %d rule strategies as seeds of study %r", added, study_name)
    fail_stale(study)  # Optuna's check (trials whose heartbeat went stale), then ours (dead or never-beating workers)
    recover_orphans(study, max_retry)
    token = worker_token(heartbeat_on(study._storage))  # recorded in every trial this process runs

    current: list[optuna.Trial] = []

    def run(trial: optuna.Trial) -> float | tuple[float, float]:
        current[:] = [trial]
        with undeferred():  # an interrupt cuts the evaluation short; Optuna records the trial as failed
            return _objective(trial, token, space, ev, info, choices, macs, target, tol, study_name)

    t_start = time.monotonic()
    counter: Iterable[int] = range(n_trials) if n_trials is not None else _forever()
    quiet = NoInterruptTraceback()
    optimize_logger = logging.getLogger("optuna.study._optimize")
    optimize_logger.addFilter(quiet)
    with sigint_defers():
        try:
            for _ in progress_bar(counter, f"search {study_name}", enable=progress, total=n_trials):
                if total_trials is not None and len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= total_trials:
                    break
                if timeout is not None and time.monotonic() - t_start >= timeout:
                    break
                current.clear()
                try:
                    with deferred():  # not while Optuna writes the trial's state (ask, tell, heartbeat)
                        study.optimize(run, n_trials=1, catch=catch, callbacks=list(callbacks), gc_after_trial=False)
                except KeyboardInterrupt:
                    if current:
                        requeue_interrupted(study, current[0], max_retry)
                    raise
                recover_orphans(study, max_retry)
        finally:
            optimize_logger.removeFilter(quiet)
    fail_stale(study)
    recover_orphans(study, max_retry)
    return result_of(study, p, evaluator_name=str(getattr(ev, "name", "evaluator")), storage=spec.display)


def _open_study(
    spec: StorageSpec, storage: Any, study_name: str, sampler: optuna.samplers.BaseSampler,
    directions: Sequence[optuna.study.StudyDirection], info: Mapping[str, Any], seeds: Sequence[Strategy],
    heartbeat_interval: int | None, grace_period: int | None, max_retry: int | None,
) -> tuple[optuna.Study, int]:
    """Open the storage, create or load the study, check it, enqueue the missing seeds: all under one lock."""
    with storage_lock(spec):
        store = storage if isinstance(storage, optuna.storages.BaseStorage) else open_spec(spec, heartbeat_interval, grace_period, max_retry)
        try:
            study = optuna.create_study(storage=store, sampler=sampler, study_name=study_name, directions=directions, load_if_exists=True)
        except Exception as exc:
            from sqlalchemy.exc import SQLAlchemyError

            if isinstance(exc, SQLAlchemyError):
                first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:200]
                raise MixMatchError(f"cannot open study {study_name!r} in {spec.display} ({first})") from None
            raise
        _check_study(study, info, directions, spec)
        return study, seed_study(study, seeds)


def _forever() -> Iterator[int]:
    i = 0
    while True:
        yield i
        i += 1


def _check_study(
    study: optuna.Study, info: Mapping[str, Any], directions: Sequence[optuna.study.StudyDirection], spec: StorageSpec
) -> None:
    if list(study.directions) != list(directions):
        raise MixMatchError(
            f"study {study.study_name!r} in {spec.display} exists with {len(study.directions)} objective(s) "
            f"({', '.join(d.name.lower() for d in study.directions)}); use another --study name for this objective"
        )
    old = study.user_attrs.get(STUDY_ATTR)
    if old is None:
        study.set_user_attr(STUDY_ATTR, dict(info))
        return
    for key in ("plan", "objective", "metric", "target", "score", "signals"):
        if old.get(key) != info.get(key):
            raise MixMatchError(
                f"study {study.study_name!r} in {spec.display} was made with {key} {old.get(key)!r}, not {info.get(key)!r}; "
                "use the same settings to resume, or another --study name"
            )


def _objective(
    trial: optuna.Trial, token: Mapping[str, Any], space: StrategySpace, ev: Callable[[Strategy], Any], info: Mapping[str, Any], choices: Sequence[str],
    macs: MacsProfile | None, target: float | None, tol: float, study_name: str,
) -> float | tuple[float, float]:
    trial.set_user_attr(WORKER_ATTR, dict(token))
    signal = trial.suggest_categorical(SIGNAL_PARAM, list(choices))
    alphas = {g: trial.suggest_float(ALPHA_PREFIX + g, 0.0, 1.0) for g in space.groups}
    seed = trial.user_attrs.get(SEED_ATTR)
    strategy = space.strategy(seed if isinstance(seed, str) else f"{signal}:search-t{trial.number}", str(signal), alphas)
    t0 = time.perf_counter()
    raw = ev(strategy)
    seconds = time.perf_counter() - t0
    metrics = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {"accuracy": float(raw)}
    key = str(info["score"])
    if key not in metrics:
        raise MixMatchError(f"the evaluator returned {sorted(metrics)} but no {key!r}; return a mapping with {key!r}")
    value = float(metrics[key])
    x = macs.reduction(strategy) if info["metric"] == "macs" and macs is not None else strategy.global_sparsity
    # two attribute writes per trial (each is a storage round trip): the evaluator's metrics, and ours
    trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if math.isfinite(v)})
    result: dict[str, Any] = {"x": x, "global_sparsity": strategy.global_sparsity, "seconds": seconds}
    if macs is not None:
        result["macs_reduction"] = macs.reduction(strategy)
    trial.set_user_attr(RESULT_ATTR, result)
    if target is not None:
        trial.set_constraint("budget", target - x - tol)
    if not math.isfinite(value):
        logger.warning("trial %d: the evaluator returned %s %s: the trial fails", trial.number, key, value)
    return (value, x) if info["objective"] == "multi" else value


def result_of(study: optuna.Study, plan: Plan, *, evaluator_name: str = "evaluator", storage: str = "") -> SearchResult:
    """Collect a study's finished trials into a :class:`SearchResult` (also for a study loaded later)."""
    info = study.user_attrs.get(STUDY_ATTR)
    if not isinstance(info, Mapping):
        raise MixMatchError(f"study {study.study_name!r} was not made by mixmatch search")
    if info.get("plan") != plan_fingerprint(plan):
        raise MixMatchError(f"study {study.study_name!r} was made for another plan; pass the plan it was searched on")
    space = plan.space()
    records = _records(study, space, info, study.study_name)
    score = str(info["score"])
    key = _better(score)
    feasible = [r for r in records if r.feasible]
    if info["objective"] == "multi":
        best = _pareto(records, score)
    else:
        best = sorted(feasible, key=lambda r: (*key(r), -r.number), reverse=True)[:1]
    seeds = [r for r in feasible if r.seed is not None]
    best_rule = max(seeds, key=lambda r: (*key(r), -r.number)) if seeds else None
    return SearchResult(
        study, plan, str(info["objective"]), str(info["metric"]), score,
        info.get("target"), records, best, best_rule, storage, evaluator_name,
    )


# ================================================================================= export
def export(
    result: SearchResult, path: str | os.PathLike[str] | None = None, *, which: str = "best", top: int | None = None,
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
            idx = np.unique(np.round(np.linspace(0, len(picked) - 1, top)).astype(int))
            picked = [picked[i] for i in idx]
        else:
            picked = sorted(picked, key=_better(result.score), reverse=True)[:top]
    base = result.plan
    if path is not None and Path(path).exists():
        existing = load_plan(Path(path))
        if plan_fingerprint(existing) != plan_fingerprint(result.plan):
            raise MixMatchError(f"{path} holds a plan for another model or ranges; export to a new file")
        base = existing
    out = Plan(
        list(base.layers), dict(base.ranges), dict(base.bounds), [copy.deepcopy(s) for s in base.strategies],
        copy.deepcopy(base.sensitivity), copy.deepcopy(base.meta), signals=result.plan.signals,
    )
    names = {s.name for s in out.strategies}
    added = []
    for r in picked:
        if r.seed is not None:
            continue
        s = copy.deepcopy(r.strategy)
        s.meta.update({
            "objective": result.objective, "metric": result.metric, "score": result.score,
            "validation": {result.score: r.accuracy, **r.metrics}, "x": r.x, "evaluator": result.evaluator,
        })
        if s.name in names:
            out.strategies = [t for t in out.strategies if t.name != s.name]
        out.strategies.append(s)
        added.append(s.name)
    out.meta["search"] = {
        "study": result.study.study_name, "storage": result.storage, "objective": result.objective,
        "metric": result.metric, "score": result.score, "target": result.target, "evaluator": result.evaluator,
        "trials": len(result.trials), "best": [r.strategy.name for r in result.best],
        "best_rule": result.best_rule.strategy.name if result.best_rule else None,
    }
    if path is not None:
        out.save(Path(path))
        logger.info("exported %d searched strategies to %s", len(added), path)
    return out
