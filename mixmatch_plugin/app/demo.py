"""The demo: what Mix-and-Match does to a small model, end to end, in six phases (one line each).

1. Train a small timm ResNet on Fashion-MNIST (scikit-learn's digits when Fashion-MNIST is not
   installed), or load it from the cache.
2. Compute the signals on calibration data drawn from the *training* split; build the 30 strategies
   budget-matched to the target, and the baselines at the same sparsity (uniform, global magnitude,
   LAMP, ERK, SNIP, GraSP).
3. Rank everything on the *validation* split after masking (BatchNorm re-estimated on the same few
   training batches for every strategy).
4. Accuracy against sparsity: the native strategies and three baselines at a few sparsities.
5. Fine-tune the validation-chosen strategy, the main baselines and the dense model itself with the
   same mask-keeping budget and batch order; measure the *test* split once, for the report.
6. Write the plan JSON, a summary JSON, a Markdown report and the plots into the output folder.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixmatch_plugin import baselines
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import TrainConfig, checkpoint_path, train_cached
from mixmatch_plugin.evaluation import evaluate, rank, reestimate_bn
from mixmatch_plugin.finetuning import FinetuneOptions, finetune
from mixmatch_plugin.io import atomic_write_json
from mixmatch_plugin.planning import plan
from mixmatch_plugin.signals import compute_grasp

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
    dense_finetuned: float | None = None  # the dense model after the same fine-tune: what "no pruning" reaches
    phases: dict[str, list[float]] = field(default_factory=dict)  # wall and CPU seconds per phase


@contextmanager
def _phase(phases: dict[str, list[float]], name: str, echo: Callable[[str], None]) -> Iterator[list[str]]:
    """Time one phase; the body appends what it found to the yielded list, shown on the phase's one line."""
    t, c, note = time.time(), time.process_time(), list[str]()
    yield note
    phases[name] = [time.time() - t, time.process_time() - c]
    echo(f"[{len(phases)}/6] {name}: {phases[name][0]:.0f} s (CPU {phases[name][1]:.0f} s)" + (f"; {note[0]}" if note else ""))


def demo_config(splits: data.Splits, quick: bool = False) -> TrainConfig:
    """The demo model's training configuration for the dataset at hand."""
    fm = splits.name == "fashion-mnist"
    return TrainConfig(model="mixmatch_plugin.models:tiny_resnet", model_kwargs={"width": 24}, dataset=splits.name,
                       epochs=(1 if quick else 2) if fm else (4 if quick else 20), lr=3e-3, batch_size=128 if fm else 64,
                       warmup_steps=50 if fm else 30, augment=fm, max_train=(4000 if quick else 20000) if fm else None)


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
    echo: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo and write its outputs into ``out``; ``echo`` gets one line per phase. See the module docstring."""
    from mixmatch_plugin.app import plots, report

    t0, phases, say = time.time(), dict[str, list[float]](), echo or logger.info
    out = Path(out)
    with _phase(phases, "dense model", say) as note:
        if dataset == "auto":
            dataset = "fashion-mnist" if data.has_fashion_mnist(data_dir) else "digits"
        splits = data.load(dataset, root=data_dir, seed=seed)
        cfg = demo_config(splits, quick)
        cached = checkpoint_path(cfg, cache_dir).exists()
        model, info = train_cached(cfg, splits, cache_dir=cache_dir, progress=progress)
        note.append(f"{cfg.model.split(':')[-1]} {'loaded from the cache' if cached else f'trained {cfg.epochs} epoch(s)'} on "
                    f"{splits.name}, validation accuracy {info['val_accuracy']:.1%}")
    torch.manual_seed(seed)
    finetune_steps = min(finetune_steps, 20) if quick else finetune_steps
    calib = splits.calibration(256 if quick else 512, 128, seed)
    val = data.loader(data.subset(splits.val, 500 if quick else 1000, seed), 500)
    bn_batches = 2 if quick else 4
    bn = splits.held_batches(bn_batches, seed=seed)  # the same for every strategy
    test = data.loader(data.subset(splits.test, 2000 if quick else 5000, seed), 1000)

    with _phase(phases, "signals and strategies", say) as note:
        p = plan(model, calib, target=target, on_unreachable="extend", progress=progress)
        assert p.signals is not None
        p.signals.grasp = compute_grasp(model, calib, layers=p.layers, mean_gradient=p.signals.mean_gradient, progress=progress)
        base = {b: baselines.make(b, p.layers, p.signals, target) for b in baselines.available()}
        note.append(f"{len(p.strategies)} strategies and {len(base)} baselines, all at {target:.0%} sparsity")
        p.strategies += list(base.values())
        p.meta["model_spec"] = {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "input_shape": list(splits.input_shape)}
        p.meta["calib_spec"] = {"calib": splits.name, "data_dir": data_dir, "calib_samples": 256 if quick else 512,
                                "batch_size": 128, "seed": seed}

    with _phase(phases, "validation ranking", say) as note:
        ranked = rank(model, p.strategies, val, signals=p.signals, bn_loader=bn, bn_batches=bn_batches, progress=progress)
        val_acc = {r.strategy: r.accuracy for r in ranked}
        best = next(r for r in ranked if r.strategy not in base)
        chosen = best.strategy
        note.append(f"chose {chosen} ({best.accuracy:.1%} masked validation accuracy)")

    with _phase(phases, "accuracy against sparsity", say) as note:
        native = plan(model, calib, scores=p.signals)
        curve = [{"sparsity": s.global_sparsity, "accuracy": r.accuracy, "group": s.signal, "name": s.name}
                 for r in rank(model, native.strategies, val, signals=p.signals, bn_loader=bn, bn_batches=bn_batches, progress=progress)
                 for s in [native.strategy(r.strategy)]]
        sweep = sorted({round(x, 2) for x in (0.5, 0.7, target)})
        for b in ("global_magnitude", "uniform", "lamp"):
            for r in rank(model, [baselines.make(b, p.layers, p.signals, x) for x in sweep], val, signals=p.signals,
                          bn_loader=bn, bn_batches=bn_batches):
                curve.append({"sparsity": r.global_sparsity, "accuracy": r.accuracy, "group": "baseline", "name": b})
        note.append(f"{len(curve)} points")

    with _phase(phases, "fine-tune and test", say) as note:
        train_loader = data.loader(splits.train, 128, shuffle=True, seed=seed)
        ft_opts = FinetuneOptions(eval_every=max(1, finetune_steps // 3))
        dense_test = evaluate(model, test).accuracy
        dense = copy.deepcopy(model)  # the dense model on the same fine-tune: what "no pruning" reaches with these steps
        finetune(dense, {}, train_loader, val_loader=val, epochs=1, max_steps=finetune_steps, lr=1e-3, options=ft_opts, progress=progress)
        rows = []
        for name in [chosen, *FINETUNED, "erk", "snip", "grasp"]:
            pruned = p.apply(model, name)
            work = pruned.model
            reestimate_bn(work, bn, bn_batches)
            row = {"method": "Mix-and-Match " + name if name == chosen else name, "strategy": name, "sparsity": pruned.global_sparsity,
                   "val_one_shot": val_acc[name], "test_one_shot": evaluate(work, test).accuracy, "test_finetuned": None,
                   "finetune_steps": 0}
            if name in (chosen, *FINETUNED):
                ft = finetune(work, pruned.masks, train_loader, val_loader=val, epochs=1,
                              max_steps=finetune_steps, lr=1e-3, options=ft_opts, progress=progress)
                row.update(sparsity=ft.global_sparsity, test_finetuned=evaluate(work, test).accuracy, finetune_steps=ft.steps)
            rows.append(row)
        note.append(f"test accuracy: dense {dense_test:.1%}, {rows[0]['method']} {rows[0]['test_finetuned']:.1%} fine-tuned")

    with _phase(phases, "files", say) as note:
        out.mkdir(parents=True, exist_ok=True)
        files = {"plan": str(p.save(out / "plan.json"))}
        files["strategies_png"] = str(plots.strategy_heatmap(p, out / "strategies.png", strategies=[s.name for s in p.strategies if s.name not in base]))
        files["ranges_png"] = str(plots.ranges_plot(p, out / "ranges.png", highlight=[chosen, "global_magnitude", "uniform"]))
        files["accuracy_png"] = str(plots.accuracy_vs_sparsity(
            curve, out / "accuracy_vs_sparsity.png", reference=evaluate(model, val).accuracy,
            marked={"sparsity": p.strategy(chosen).global_sparsity, "accuracy": best.accuracy, "name": f"chosen: {chosen}"},
            title=f"{splits.name}: masked validation accuracy, native strategies and baselines"))
        files["sensitivity_png"] = str(plots.sensitivity_bars(p, out / "sensitivity.png"))
        result = DemoResult(splits.name, cfg.model, target, dense_test, chosen, rows, files, time.time() - t0,
                            evaluate(dense, test).accuracy, phases)
        summary = {"schema": "mixmatch.demo/1", **asdict(result), "train": {k: v for k, v in info.items() if k != "history"},
                   "ranking": [asdict(r) for r in ranked], "curve": curve}
        files["summary"] = str(atomic_write_json(out / "summary.json", summary))
        files["report"] = str(report.write_report(out / "summary.json", out / "report.md"))
        note.append(f"{len(files)} files in {out}")
    result.files, result.seconds = files, time.time() - t0
    return result
