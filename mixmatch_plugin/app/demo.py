"""The demo: what Mix-and-Match does to a small model, end to end, in about two minutes on 2 CPU cores.

1. Train a small timm ResNet on Fashion-MNIST (scikit-learn's digits when Fashion-MNIST is not
   installed), or load it from the cache.
2. Compute the signals on calibration data drawn from the *training* split.
3. Build the 30 strategies budget-matched to the target sparsity, and the baselines at the same
   sparsity (uniform, global magnitude, LAMP, ERK, SNIP, GraSP).
4. Rank everything on the *validation* split after masking (BatchNorm re-estimated on the same few
   training batches for every strategy).
5. Fine-tune the validation-chosen strategy and the main baselines with the same mask-keeping
   budget and the same batch order, and measure the *test* split once, for the report.
6. Write the plan JSON, a summary JSON, a Markdown report and the plots into the output folder.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixmatch_plugin import baselines
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import TrainConfig, train_cached
from mixmatch_plugin.evaluation import evaluate, rank, reestimate_bn
from mixmatch_plugin.finetuning import FinetuneOptions, finetune
from mixmatch_plugin.io import atomic_write_json
from mixmatch_plugin.masks import apply_masks, compute_masks
from mixmatch_plugin.planning import Plan, plan
from mixmatch_plugin.signals import compute_grasp
from mixmatch_plugin.strategies import Strategy

logger = logging.getLogger(__name__)

FINETUNED = ("uniform", "global_magnitude", "lamp")


@dataclass
class DemoResult:
    """Everything the demo measured; ``rows`` is the summary table."""

    dataset: str
    model: str
    target: float
    dense_test: float
    chosen: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def demo_config(splits: data.Splits, quick: bool = False) -> TrainConfig:
    """The demo model's training configuration for the dataset at hand."""
    if splits.name == "fashion-mnist":
        return TrainConfig(model="mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 24}, dataset=splits.name,
                           epochs=1 if quick else 2, lr=3e-3, max_train=4000 if quick else 20000, warmup_steps=50)
    return TrainConfig(model="mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 24}, dataset=splits.name,
                       epochs=4 if quick else 20, lr=3e-3, batch_size=64, warmup_steps=30, augment=False)


def _masked(model: torch.nn.Module, s: Strategy, p: Plan, bn: Any, bn_batches: int) -> torch.nn.Module:
    work = copy.deepcopy(model)
    apply_masks(work, compute_masks(work, s, p.signals, layers=p.layers))
    if bn_batches:
        reestimate_bn(work, bn, bn_batches)
    return work


def run_demo(
    out: str | Path = "mixmatch-demo",
    *,
    dataset: str = "auto",
    data_dir: str | None = None,
    target: float = 0.9,
    seed: int = 0,
    finetune_steps: int = 100,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo and write its outputs into ``out``; see the module docstring."""
    from mixmatch_plugin.app import plots, report

    t0 = time.time()
    out = Path(out)
    if dataset == "auto":
        dataset = "fashion-mnist" if data.has_fashion_mnist(data_dir) else "digits"
    splits = data.load(dataset, root=data_dir, seed=seed)
    cfg = demo_config(splits, quick)
    model, info = train_cached(cfg, splits, cache_dir=cache_dir, progress=progress)
    torch.manual_seed(seed)

    if quick:
        finetune_steps = min(finetune_steps, 20)
    calib = splits.calibration(256 if quick else 512, 128, seed)
    val = data.loader(data.subset(splits.val, 500 if quick else 2000, seed), 500)
    bn_batches = 2 if quick else 4
    bn = splits.held_batches(bn_batches, seed=seed)  # the same for every strategy
    test = data.loader(data.subset(splits.test, 2000, seed) if quick else splits.test, 1000)

    p = plan(model, calib, target=target, on_unreachable="extend", progress=progress)
    assert p.signals is not None
    p.signals.grasp = compute_grasp(model, calib, layers=p.layers, mean_gradient=p.signals.mean_gradient, progress=progress)
    base = {b: baselines.make(b, p.layers, p.signals, target) for b in baselines.available()}
    p.strategies += list(base.values())
    p.meta["model_spec"] = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "dataset": splits.name}

    ranked = rank(model, p.strategies, val, signals=p.signals, bn_loader=bn, bn_batches=bn_batches, progress=progress)
    val_acc = {r.strategy: r.accuracy for r in ranked}
    mm_ranked = [r for r in ranked if r.strategy not in base]
    chosen = mm_ranked[0].strategy
    logger.info("validation chose %s (%.4f)", chosen, mm_ranked[0].accuracy)

    # accuracy against sparsity: the native strategies and baselines at a few sparsities (validation)
    native = plan(model, calib, progress=False)
    native.signals = p.signals
    curve = [{"sparsity": s.global_sparsity, "accuracy": r.accuracy, "group": s.signal, "name": s.name}
             for r in rank(model, native.strategies, val, signals=p.signals, bn_loader=bn, bn_batches=bn_batches)
             for s in [native.strategy(r.strategy)]]
    sweep = sorted({round(x, 2) for x in (0.5, 0.7, target)})
    for b in ("global_magnitude", "uniform", "lamp"):
        strats = [baselines.make(b, p.layers, p.signals, t) for t in sweep]
        for s, r in zip(strats, sorted(rank(model, strats, val, signals=p.signals, bn_loader=bn, bn_batches=bn_batches),
                                       key=lambda r: r.global_sparsity), strict=True):
            curve.append({"sparsity": s.global_sparsity, "accuracy": r.accuracy, "group": "baseline", "name": f"{b}"})

    dense_test = evaluate(model, test).accuracy
    rows = []
    for name in [chosen, *FINETUNED]:
        s = p.strategy(name)
        work = _masked(model, s, p, bn, bn_batches)
        one_shot = evaluate(work, test).accuracy
        masks = compute_masks(work, s, p.signals, layers=p.layers)
        ft = finetune(work, masks, data.loader(splits.train, 128, shuffle=True, seed=seed), val_loader=val, epochs=1, max_steps=finetune_steps, lr=1e-3,
                      options=FinetuneOptions(eval_every=max(1, finetune_steps // 3)), progress=progress)
        rows.append({
            "method": "Mix-and-Match " + name if name == chosen else name, "strategy": name,
            "sparsity": ft.global_sparsity, "val_one_shot": val_acc[name], "test_one_shot": one_shot,
            "test_finetuned": evaluate(work, test).accuracy, "finetune_steps": ft.steps,
        })
    for name in ("erk", "snip", "grasp"):
        work = _masked(model, p.strategy(name), p, bn, bn_batches)
        rows.append({"method": name, "strategy": name, "sparsity": p.strategy(name).global_sparsity,
                     "val_one_shot": val_acc[name], "test_one_shot": evaluate(work, test).accuracy,
                     "test_finetuned": None, "finetune_steps": 0})

    out.mkdir(parents=True, exist_ok=True)
    files = {"plan": str(p.save(out / "plan.json"))}
    files["strategies_png"] = str(plots.strategy_heatmap(p, out / "strategies.png", strategies=[s.name for s in p.strategies if s.name not in base]))
    files["ranges_png"] = str(plots.ranges_plot(p, out / "ranges.png", highlight=[chosen, "global_magnitude", "uniform"]))
    files["accuracy_png"] = str(plots.accuracy_vs_sparsity(
        curve, out / "accuracy_vs_sparsity.png", reference=evaluate(model, val).accuracy,
        title=f"{splits.name}: masked validation accuracy, native strategies and baselines"))
    files["sensitivity_png"] = str(plots.sensitivity_bars(p, out / "sensitivity.png"))
    result = DemoResult(splits.name, cfg.model, target, dense_test, chosen, rows, files, time.time() - t0)
    summary = {"schema": "mixmatch.demo/1", **asdict(result), "train": {k: v for k, v in info.items() if k != "history"},
               "ranking": [asdict(r) for r in ranked], "curve": curve}
    files["summary"] = str(atomic_write_json(out / "summary.json", summary))
    files["report"] = str(report.write_report(out / "summary.json", out / "report.md"))
    result.files = files
    return result
