"""Plots: where a picture says more than a table. matplotlib (Agg backend), PNGs written atomically.

* :func:`strategy_heatmap` — per-layer sparsity of every strategy (layers x strategies)
* :func:`ranges_plot` — each layer's range with chosen strategies on top
* :func:`accuracy_vs_sparsity` — accuracy against global sparsity, Pareto front highlighted
* :func:`sensitivity_bars` — per-layer aggregate of each signal
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixmatch_plugin.io import atomic_write_bytes

_SIGNAL_COLORS = {"magnitude": "#1f77b4", "gradient": "#ff7f0e", "product": "#2ca02c", "grasp": "#9467bd"}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as PNG, atomically, and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _layer_labels(ax: Any, layers: Sequence[Any], width: int = 34) -> None:
    """At most 60 layer names (shortened from the left) with their roles on the y axis."""
    step = max(1, int(np.ceil(len(layers) / 60)))
    ax.set_yticks(range(0, len(layers), step), [f"{n if len(n) <= width else '…' + n[-(width - 1):]} ({layer.role})"
                                                for layer in layers[::step] for n in [layer.name]], fontsize=7)


def strategy_heatmap(plan: Any, path: str | Path, *, strategies: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Heatmap of per-layer sparsity: one row per prunable layer, one column per strategy."""
    plt = pyplot()
    layers = [layer for layer in plan.layers if layer.kind != "norm"]
    strats = [s for s in plan.strategies if strategies is None or s.name in strategies]
    mat = np.array([[s.ratios[layer.name] for s in strats] for layer in layers])
    h = min(max(4.0, 0.22 * len(layers) + 2.0), 18.0)
    w = min(max(6.0, 0.32 * len(strats) + 4.0), 22.0)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(0.05, float(mat.max())))
    ax.set_xticks(range(len(strats)), [s.name for s in strats], rotation=70, ha="right", fontsize=7)
    _layer_labels(ax, layers)
    ax.set(xlabel="strategy (signal:shape)", ylabel="layer (role), input to output")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01).set_label("layer sparsity")
    t = plan.meta.get("target")
    ax.set_title(title or f"{plan.meta.get('model', 'model')}: per-layer sparsity of {len(strats)} strategies"
                 + (f" (budget-matched at {t:.0%})" if t is not None else " (native)"))
    return save_figure(fig, path)


def ranges_plot(plan: Any, path: str | Path, *, highlight: Sequence[str] = (), title: str | None = None) -> Path:
    """Each prunable layer's range as a bar, with the sparsity of ``highlight`` strategies as markers."""
    plt = pyplot()
    layers = [layer for layer in plan.layers if layer.kind != "norm"]
    y = np.arange(len(layers))
    lo = np.array([plan.ranges[layer.name][0] for layer in layers])
    hi = np.array([plan.ranges[layer.name][1] for layer in layers])
    fig, ax = plt.subplots(figsize=(8.5, min(max(4.0, 0.22 * len(layers) + 2.0), 18.0)))
    ax.barh(y, hi - lo, left=lo, height=0.6, color="#cfd8e3", edgecolor="#7f8c9d", label="range [lo, hi]")
    if plan.meta.get("range_shift") is not None:  # budget mode moved the ranges: draw where they went
        space = plan.space()
        idx = {n: i for i, n in enumerate(space.names)}
        elo = np.array([space.lo[idx[layer.name]] for layer in layers])
        ehi = np.array([space.hi[idx[layer.name]] for layer in layers])
        how = plan.meta.get("range_extension") or f"log-odds shift {plan.meta['range_shift']:+.2f}"  # older plan files
        ax.barh(y, ehi - elo, left=elo, height=0.6, fill=False, hatch="///", edgecolor="#e08e45", lw=0.6,
                label=f"range moved to the budget ({how})")
    markers = "o^sDv<>p*h"
    for i, name in enumerate(highlight):
        s = plan.strategy(name)
        ax.scatter([s.ratios[layer.name] for layer in layers], y, s=18, marker=markers[i % len(markers)],
                   label=f"{name} ({s.global_sparsity:.1%})", zorder=3)
    _layer_labels(ax, layers)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="layer sparsity")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the axes: never on a label
    ax.set_title(title or f"{plan.meta.get('model', 'model')}: ranges (preset {plan.meta.get('preset')}) and strategies")
    return save_figure(fig, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (sparsity up, accuracy up), sorted by sparsity."""
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def accuracy_vs_sparsity(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "accuracy against sparsity",
    reference: float | None = None, marked: Mapping[str, Any] | None = None,
) -> Path:
    """Scatter of ``rows`` (``sparsity``, ``accuracy``, ``group``, ``name``) with the Pareto front.

    ``group`` picks the colour (a signal, or ``baseline``: then each ``name`` gets its own marker and
    legend entry). Points far below the rest (a collapsed method) are drawn as off-scale markers on the
    lower edge, so that the others stay readable. ``reference`` draws a dashed line (the dense accuracy);
    ``marked`` (``sparsity``, ``accuracy``, ``name``) is drawn as a star (the chosen strategy).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    pts = [(float(r["sparsity"]), float(r["accuracy"])) for r in rows]
    accs = np.array([a for _, a in pts] + ([reference] if reference is not None else []))
    top, mid = float(accs.max()), float(np.median(accs))
    floor = max(float(accs.min()), top - 4 * max(top - mid, 0.02))  # below: off-scale
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        key = f"{r.get('name')} (baseline)" if str(r.get("group")) == "baseline" else str(r.get("group", ""))
        groups.setdefault(key, []).append(r)
    for i, (g, rs) in enumerate(groups.items()):
        base = g.endswith("(baseline)")
        xs, ys = [r["sparsity"] for r in rs], [max(float(r["accuracy"]), floor) for r in rs]
        sc = ax.scatter(xs, ys, s=40 if base else 22, marker="XPD"[i % 3] if base else "o",
                        color=_SIGNAL_COLORS.get(g, ("#444444", "#8c564b", "#e377c2")[i % 3]),
                        alpha=0.85, label=g, zorder=3)
        if low := [(x, r) for x, r in zip(xs, rs, strict=True) if float(r["accuracy"]) < floor]:
            ax.scatter([x for x, _ in low], [floor] * len(low), s=60, marker="v", color=sc.get_facecolor()[0], zorder=4)
    if front := pareto_front(pts):
        ax.plot([pts[i][0] for i in front], [max(pts[i][1], floor) for i in front], color="black", lw=1.2, label="Pareto front", zorder=2)
    if marked is not None:
        ax.scatter([marked["sparsity"]], [marked["accuracy"]], s=220, marker="*", color="gold", edgecolor="black", zorder=5,
                   label=str(marked.get("name", "chosen")))
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=f"dense ({reference:.3f})")
    pad = 0.04 * (top - floor)
    if floor > accs.min():
        ax.text(0.01, 0.01, "v: below the axis (collapsed)", transform=ax.transAxes, fontsize=7, color="grey")
    ax.set(ylim=(floor - pad, top + pad), xlabel="global sparsity (fraction of weights pruned)", ylabel="validation accuracy",
           title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def sensitivity_bars(plan: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer mean score of each signal, each normalised to its largest layer (1.0)."""
    plt = pyplot()
    layers = [layer for layer in plan.layers if layer.kind != "norm"]
    sigs = [s for s in ("magnitude", "gradient", "product") if s in plan.sensitivity]
    fig, axes = plt.subplots(1, max(1, len(sigs)), figsize=(3.2 * max(1, len(sigs)) + 3, min(max(4.0, 0.2 * len(layers) + 2), 18)),
                             sharey=True, squeeze=False)
    y = np.arange(len(layers))
    for ax, sig in zip(axes[0], sigs, strict=False):
        v = np.array([plan.sensitivity[sig].get(layer.name, 0.0) for layer in layers])
        v = v / v.max() if v.max() > 0 else v
        ax.barh(y, v, color=_SIGNAL_COLORS[sig])
        ax.set_title(sig, fontsize=10)
        ax.set_xlabel("mean score / max layer")
        ax.grid(axis="x", alpha=0.3)
    _layer_labels(axes[0][0], layers)
    axes[0][0].invert_yaxis()
    fig.suptitle(title or "per-layer sensitivity (mean score per weight)")
    return save_figure(fig, path)
