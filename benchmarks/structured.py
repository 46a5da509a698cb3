"""Structured rows of the benchmark: uniform vs Mix-and-Match channel pruning at matched MACs.

Through the Torch-Pruning adapter, at about 30 % and 50 % MACs reduction:

* **uniform**: every layer at the same ratio (one ratio per dependency group), bisected to the MACs target;
* **Mix-and-Match**: the 30 rule strategies at the plan target where ``magnitude:midpoint`` meets
  the MACs target; candidates whose MACs reduction is within ``tolerance`` of the target are
  ranked on the validation split (BatchNorm re-estimated), and the best is kept.

Both are fine-tuned with the same budget and measured on the test split; the realized MACs of each
are reported next to the accuracy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.run import eval_loaders, screen_loader
from mixmatch_plugin.app import data
from mixmatch_plugin.batches import model_device
from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.evaluation import evaluate, reestimate_bn
from mixmatch_plugin.finetuning import finetune
from mixmatch_plugin.layers import inventory
from mixmatch_plugin.planning import PlanOptions, plan
from mixmatch_plugin.signals import compute_signals
from mixmatch_plugin.strategies import Strategy

logger = logging.getLogger(__name__)


def _uniform(layers: Any, r: float) -> Strategy:
    ratios = {layer.name: (0.0 if layer.kind == "norm" else r) for layer in layers}
    return Strategy("uniform", "magnitude", ratios, r, {"method": "uniform-structured"})


def _bisect(fn: Callable[[float], float], goal: float, lo: float = 0.0, hi: float = 0.9, iters: int = 9) -> float:
    """``t`` in [lo, hi] with ``fn(t)`` (non-decreasing) closest to ``goal``."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if fn(mid) < goal:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def structured_rows(name: str, cfg: Any, splits: data.Splits, model: torch.nn.Module, *, tolerance: float = 0.03) -> list[dict[str, Any]]:
    """The structured comparison for benchmark model ``name``: one row per (MACs target, method).

    ``model`` is the trained dense model (left unchanged: every pruning works on a copy). The MACs
    targets are ``cfg.structured_macs`` (reductions, e.g. ``(0.3, 0.5)``).
    """
    try:
        from mixmatch_plugin.adapters import torch_pruning as tpa
    except ImportError:
        logger.warning("structured rows skipped: install the tp extra (torch-pruning)")
        return []
    return _model_rows(tpa, name, model, cfg, splits, tuple(cfg.structured_macs), tolerance)


def _model_rows(tpa: Any, name: str, model: torch.nn.Module, cfg: Any, splits: data.Splits,
                macs_targets: tuple[float, ...], tolerance: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seed = cfg.seeds[0]
    model.eval()
    layers = inventory(model)
    x = splits.train.tensors[0][:2].to(model_device(model))  # example inputs beside the model
    calib = splits.calibration(cfg.calib_samples, 128, seed)
    screen, (val, test) = screen_loader(cfg, splits, seed), eval_loaders(cfg, splits)
    # held: every candidate and method re-estimates BatchNorm on the same batches
    bn = splits.held_batches(cfg.bn_batches, seed=seed)
    scores = compute_signals(model, calib)

    def pruned(s: Strategy, verify: bool = False) -> Any:
        return tpa.prune(model, s, x, calib=calib, options=tpa.TPOptions(verify=verify))

    def reduction(s: Strategy) -> float:
        return 1.0 - pruned(s).report.macs_ratio

    def finish(s: Strategy, method: str, macs_goal: float) -> None:
        res = pruned(s, verify=True)
        m = res.model
        reestimate_bn(m, bn, cfg.bn_batches)
        one_shot = evaluate(m, test).accuracy
        finetune(m, {}, data.loader(splits.train, 128, shuffle=True, seed=seed), max_steps=cfg.finetune_steps,
                 lr=cfg.finetune_lr)
        rows.append({"model": name, "macs_target": macs_goal, "method": method, "strategy": s.name,
                     "macs_reduction": 1.0 - res.report.macs_ratio, "params_reduction": 1.0 - res.report.params_ratio,
                     "test_one_shot": one_shot, "test_finetuned": evaluate(m, test).accuracy,
                     "val_finetuned": evaluate(m, val).accuracy, "seed": seed})

    for goal in macs_targets:
        t_u = _bisect(lambda t: reduction(_uniform(layers, t)), goal)
        finish(_uniform(layers, t_u), "uniform", goal)

        def mid(t: float) -> float:
            p = plan(model, calib, target=t, on_unreachable="extend", scores=scores, options=PlanOptions(shapes=("midpoint",)), signals=("magnitude",))
            return reduction(p.strategies[0])

        try:
            t_m = _bisect(mid, goal)
            p = plan(model, calib, target=t_m, on_unreachable="extend", scores=scores)
        except MixMatchError as exc:
            logger.warning("%s: no Mix-and-Match plan reaches %.0f %% MACs reduction (%s)", name, 100 * goal, exc)
            continue
        cands = []
        for s in p.strategies:
            res = pruned(s)
            red = 1.0 - res.report.macs_ratio
            if abs(red - goal) <= tolerance:
                work = copy.deepcopy(res.model)
                reestimate_bn(work, bn, cfg.bn_batches)
                cands.append((evaluate(work, screen).accuracy, s))
        if not cands:
            logger.warning("%s: no Mix-and-Match strategy within %.2f of %.0f %% MACs reduction", name, tolerance, 100 * goal)
            continue
        cands.sort(key=lambda c: -c[0])
        best = max(cands[: cfg.top_k], key=lambda c: _val(pruned(c[1]).model, bn, cfg.bn_batches, val))[1]
        finish(best, "mix-and-match", goal)
    return rows


def _val(m: torch.nn.Module, bn: Any, bn_batches: int, val: Any) -> float:
    reestimate_bn(m, bn, bn_batches)
    return evaluate(m, val).accuracy


def markdown(rows: list[dict[str, Any]]) -> str:
    """The structured rows of all models as one Markdown table."""
    lines = ["**Structured (Torch-Pruning adapter, channels removed physically)**: test accuracy in %, one seed; "
             "Mix-and-Match's strategy chosen on validation among those within 3 points of the MACs target.",
             "", "| model | MACs target | method | MACs removed | params removed | test one-shot | test fine-tuned |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "method" not in r:
            continue
        lines.append(f"| {r['model']} | {r['macs_target']:.0%} | {r['method']} ({r['strategy']}) | {r['macs_reduction']:.1%} | "
                     f"{r['params_reduction']:.1%} | {100 * r['test_one_shot']:.2f} | {100 * r['test_finetuned']:.2f} |")
    return "\n".join(lines)
