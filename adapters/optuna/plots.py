"""Plots of a search: the Pareto front, the history, parameter importances."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from .search import SearchResult
from .space import ALPHA_PREFIX

logger = logging.getLogger(__name__)


# ================================================================================== plots
_SIGNAL_STYLE = {"magnitude": ("^", "tab:blue"), "gradient": ("s", "tab:orange"), "product": ("D", "tab:green")}


def _score_label(result: SearchResult) -> str:
    return f"validation {result.score} ({result.evaluator})"


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    import io as _io

    from mixmatch_plugin.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _figure(w: float = 7.5, h: float = 5.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h))
    ax.grid(True, alpha=0.3)
    return fig, ax


def plot_pareto(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score against sparsity (or MACs removed); searched trials, the rule seeds by signal, and the front."""
    fig, ax = _figure()
    searched = [r for r in result.trials if r.seed is None]
    seeds = [r for r in result.trials if r.seed is not None]
    if searched:
        ax.scatter([r.x for r in searched], [r.accuracy for r in searched], s=18, c="0.55", alpha=0.7,
                   label=f"searched ({len(searched)})", zorder=2)
    for sig, (marker, color) in _SIGNAL_STYLE.items():
        pts = [r for r in seeds if r.strategy.signal == sig]
        if pts:
            ax.scatter([r.x for r in pts], [r.accuracy for r in pts], marker=marker, s=46, facecolor="none",
                       edgecolor=color, linewidths=1.4, label=f"rule, {sig} ({len(pts)})", zorder=3)
    infeasible = [r for r in result.trials if not r.feasible]
    if infeasible:
        ax.scatter([r.x for r in infeasible], [r.accuracy for r in infeasible], marker="x", s=22, c="0.3",
                   linewidths=0.8, label=f"below the budget ({len(infeasible)})", zorder=4)
    if result.best:
        xs, ys = [r.x for r in result.best], [r.accuracy for r in result.best]
        if result.objective == "multi" and len(result.best) > 1:
            ax.step(xs, ys, where="pre", color="tab:red", lw=1.4, zorder=4)
        ax.scatter(xs, ys, s=70, marker="*", c="tab:red", edgecolor="k", linewidths=0.5, zorder=5,
                   label="Pareto front" if result.objective == "multi" else "best feasible")
    if result.best_rule is not None:
        ax.annotate("best rule", (result.best_rule.x, result.best_rule.accuracy), xytext=(-28, -22),
                    textcoords="offset points", fontsize=8, color="0.2", ha="right",
                    arrowprops={"arrowstyle": "-", "color": "0.4", "lw": 0.6})
    if result.target is not None:
        ax.axvline(result.target, color="tab:purple", ls="--", lw=1, label=f"budget {result.target:g}")
    xs_all = [r.x for r in result.trials] + ([result.target] if result.target is not None else [])
    if xs_all and max(xs_all) - min(xs_all) < 1e-3:
        c = float(np.mean(xs_all))
        ax.set_xlim(c - 0.01, c + 0.01)
    ax.set_xlabel(result.x_label)
    ax.set_ylabel(_score_label(result))
    ax.set_title(f"study {result.study.study_name!r}: {len(result.trials)} trials, {len(seeds)} rule seeds", fontsize=10)
    if result.trials:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_history(result: SearchResult, path: str | os.PathLike[str]) -> Path:
    """PNG: score per trial, rule seeds against searched trials, with the best feasible so far."""
    fig, ax = _figure(8.0, 4.5)
    sign = 1.0 if result.score == "accuracy" else -1.0
    searched = [r for r in result.trials if r.seed is None]
    if searched:
        ax.scatter([r.number for r in searched], [r.accuracy for r in searched], s=16, c="0.55", label="searched", zorder=2)
    for sig, (marker, color) in _SIGNAL_STYLE.items():
        pts = [r for r in result.trials if r.seed is not None and r.strategy.signal == sig]
        if pts:
            ax.scatter([r.number for r in pts], [r.accuracy for r in pts], marker=marker, s=40, facecolor="none",
                       edgecolor=color, linewidths=1.3, label=f"rule, {sig}", zorder=3)
    best: list[tuple[int, float]] = []
    cur = None
    for r in sorted(result.trials, key=lambda r: r.number):
        if r.feasible and (cur is None or sign * r.accuracy > sign * cur):
            cur = r.accuracy
        if cur is not None:
            best.append((r.number, cur))
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="tab:red", lw=1.3, label="best so far" + (" (within the budget)" if result.target is not None else ""))
    if result.best_rule is not None:
        ax.axhline(result.best_rule.accuracy, color="tab:blue", ls=":", lw=1, label="best rule")
    ax.set_xlabel("trial number")
    ax.set_ylabel(_score_label(result))
    ax.set_title(f"study {result.study.study_name!r}: rule seeds first, then the sampler", fontsize=10)
    if result.trials:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def param_importances(result: SearchResult) -> dict[str, float]:
    """Optuna's parameter importances for the score (objective 0); empty when they cannot be computed."""
    study = result.study
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 3:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(
                study, target=lambda t: float(t.values[0]),
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            ))
    except (RuntimeError, ValueError) as exc:
        logger.info("parameter importances unavailable (%s)", exc)
        return {}


def plot_importances(result: SearchResult, path: str | os.PathLike[str], *, top: int = 20) -> Path | None:
    """PNG: horizontal bars of the parameter importances (fANOVA) for the score; None when unavailable."""
    imp = param_importances(result)
    if not imp:
        return None
    items = sorted(imp.items(), key=lambda kv: kv[1], reverse=True)[:top]
    labels = [k[len(ALPHA_PREFIX):] if k.startswith(ALPHA_PREFIX) else k for k, _ in items]
    fig, ax = _figure(7.0, 0.35 * len(items) + 1.4)
    ax.barh(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"importance for the {result.score} (fANOVA, normalized)")
    ax.set_title(f"parameter importances over {len(result.trials)} trials (alpha:<role>@<stage>, signal)", fontsize=10)
    ax.grid(True, axis="y", alpha=0)
    return _save(fig, path)
