"""Plots of a search, drawn by :mod:`optuna.visualization.matplotlib`: the Pareto front, the history, importances."""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mixmatch_plugin.io import atomic_write_bytes

from .search import RESULT_ATTR, SearchResult

logger = logging.getLogger(__name__)


def _score(t: FrozenTrial) -> float:
    return float(t.values[0])


def _draw(path: str | os.PathLike[str], plot: Any, *args: Any, **kwargs: Any) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are experimental
        ax = plot(*args, **kwargs)
    fig = ax.figure
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_pareto(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score against sparsity (or MACs removed) of every completed trial, the feasible front highlighted."""
    from optuna.visualization.matplotlib import plot_pareto_front

    names = [f"validation {result.score} ({result.evaluator})", result.x_label]
    return _draw(path, plot_pareto_front, result.study, target_names=names,
                 targets=lambda t: (_score(t), float((t.user_attrs.get(RESULT_ATTR) or {}).get("x", float("nan")))),
                 constraints_func=(lambda t: list(t.constraints.values())) if result.target is not None else None)


def plot_history(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score per trial (rule seeds first, then the sampler's), with the best so far."""
    from optuna.visualization.matplotlib import plot_optimization_history

    return _draw(path, plot_optimization_history, result.study, target=_score,
                 target_name=f"validation {result.score} ({result.evaluator})")


def param_importances(result: SearchResult) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) for the score; empty when they cannot be computed."""
    if len(result.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(
                result.study, target=_score, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))
    except (RuntimeError, ValueError) as exc:
        logger.info("parameter importances unavailable (%s)", exc)
        return {}


def plot_importances(result: SearchResult, path: str | os.PathLike[str]) -> Path | None:
    """PNG: the parameter importances for the score (``alpha:<role>@<stage>``, ``signal``); None when unavailable."""
    from optuna.visualization.matplotlib import plot_param_importances

    if not param_importances(result):
        return None
    return _draw(path, plot_param_importances, result.study, target=_score, target_name=f"validation {result.score}",
                 evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
