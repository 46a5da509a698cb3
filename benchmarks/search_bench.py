"""Benchmark: does an Optuna search around the 30 rule strategies beat the best rule at the same sparsity?

Prints figures; not a timed test. Protocol:

1. A model trained on Fashion-MNIST: ``--checkpoint`` (any ``--model`` spec, e.g. the benchmark's Swin),
   or, without one, ``--model`` (default: the small Swin ``mixmatch_plugin.models:swin_fmnist``) trained
   here for ``--train-steps`` on the training split and saved to ``<out>/model.pt``.
2. The plan, budget-matched at ``--target`` (every strategy prunes exactly ``round(target * N)`` weights;
   ranges extended when the target lies outside them), signals from a calibration draw of the training split.
3. A single-objective study (default TPE) on the proxy: masked validation accuracy (optionally after
   BatchNorm re-estimation on training batches). The 30 rule strategies run first, then ``--trials`` more.
4. Chosen on validation only: the best rule strategy and the best strategy of the whole study. Their
   *test* accuracy is measured once, after the choice (masked, no fine-tune; and, with
   ``--finetune-steps``, after the same short masked fine-tune of both).
5. Wall time per trial, from the study's own timestamps.

    python benchmarks/search_bench.py --out bench-out                       # trains a small Swin first
    python benchmarks/search_bench.py --model mixmatch_plugin.models:swin_fmnist --checkpoint swin.pt \\
        --target 0.5 --trials 40

Run it again with the same ``--out`` to reuse the checkpoint and resume the study (``--total`` semantics:
it stops once the study holds 30 + ``--trials`` completed trials).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import optuna as mmo
from mixmatch_plugin.adapters.optuna.search import rule_seeds
from mixmatch_plugin.app import data
from mixmatch_plugin.io import atomic_write_json
from mixmatch_plugin.models import build_model


def train(model: nn.Module, splits: data.Splits, steps: int, batch_size: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    loader = data.loader(splits.train, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixmatch_plugin.models:swin_fmnist", help="model spec (timm:NAME or pkg.module:factory)")
    ap.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the factory")
    ap.add_argument("--checkpoint", default=None, help="trained state dict; without it the model is trained here")
    ap.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    ap.add_argument("--input-shape", default=None, help="C,H,W the model expects (data are resized to it)")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--train-lr", type=float, default=2e-3)
    ap.add_argument("--target", type=float, default=0.5, help="global sparsity of every strategy")
    ap.add_argument("--trials", type=int, default=40, help="trials after the rule seeds (N)")
    ap.add_argument("--sampler", default="tpe", choices=["tpe", "gp", "nsga2"])
    ap.add_argument("--sampler-seed", type=int, default=0)
    ap.add_argument("--val-samples", type=int, default=5000, help="validation samples the proxy scores on")
    ap.add_argument("--bn-batches", type=int, default=0, help="BatchNorm re-estimation batches (0: off; Swin has none)")
    ap.add_argument("--calib-samples", type=int, default=2048)
    ap.add_argument("--finetune-steps", type=int, default=0, help="also compare after this many masked fine-tune steps")
    ap.add_argument("--storage", default=None, help="Optuna storage (default sqlite:///<out>/search.db)")
    ap.add_argument("--study", default=None, help="study name (default: derived from model and target)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="search-bench")
    args = ap.parse_args()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    splits = data.load("fashion-mnist", root=args.data, seed=args.seed, input_shape=shape)
    train_loader, _, test_loader = splits.loaders(batch_size=128, seed=args.seed)
    val_set = data.subset(splits.val, args.val_samples, args.seed)
    val_loader = data.loader(val_set, 256)

    model = build_model(args.model, model_kwargs=json.loads(args.model_kwargs), checkpoint=args.checkpoint)
    ckpt = out / "model.pt"
    if args.checkpoint is None:
        if ckpt.exists():
            model.load_state_dict(torch.load(ckpt, weights_only=True))
            model.eval()
            print(f"model: {args.model}, checkpoint {ckpt} (trained by an earlier run)")
        else:
            secs = train(model, splits, args.train_steps, 128, args.train_lr, args.seed)
            torch.save(model.state_dict(), ckpt)
            print(f"model: {args.model}, trained {args.train_steps} steps in {secs:.0f} s -> {ckpt}")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    dense_val = mm.evaluate(model, val_loader).accuracy
    print(f"parameters {n_params:,}; dense validation accuracy {dense_val:.4f} ({len(val_set)} samples)")

    t0 = time.perf_counter()
    plan = mm.plan(model, splits.calibration(args.calib_samples, 128, args.seed), target=args.target, on_unreachable="extend")
    lo, hi = plan.meta["reachable"]
    print(f"plan: {plan.summary()}; the rule ranges reach [{lo:.3f}, {hi:.3f}]"
          + (f", moved: {plan.meta['range_extension']}" if plan.meta.get("range_extension") else "")
          + f" ({time.perf_counter() - t0:.1f} s); {len(plan.space().groups)} alpha groups + signal")
    plan.save(out / "plan.json")

    ev = mmo.ProxyEvaluator(model, val_loader, signals=plan.signals, bn_loader=train_loader, bn_batches=args.bn_batches)
    n_seeds = len(rule_seeds(plan))
    study = args.study or f"bench-{Path(args.model.split(':')[-1]).name}-{args.target:g}"
    storage = args.storage or f"sqlite:///{(out / 'search.db').absolute()}"
    t0 = time.perf_counter()
    res = mmo.search(plan, ev, mmo.SearchOptions(objective="single", sampler=args.sampler, sampler_seed=args.sampler_seed, n_trials=None, total_trials=n_seeds + args.trials), storage=storage, study_name=study, progress=True)
    search_s = time.perf_counter() - t0
    mmo.export(res, out / "plan.json")
    mmo.plot_pareto(res, out / "pareto.png")
    mmo.plot_history(res, out / "history.png")
    mmo.plot_importances(res, out / "importances.png")

    rule, best = res.best_rule, res.best[0]
    searched = [r for r in res.trials if r.seed is None]
    best_searched = max(searched, key=lambda r: (r.accuracy, -r.number)) if searched else None
    assert rule is not None

    def test_acc(strategy: mm.Strategy) -> tuple[float, float | None]:
        pruned = plan.apply(model, strategy)
        masked = mm.evaluate(pruned.model, test_loader).accuracy
        tuned = None
        if args.finetune_steps:
            torch.manual_seed(args.seed)
            mm.finetune(pruned.model, pruned.masks, data.loader(splits.train, 128, shuffle=True, seed=args.seed),
                        epochs=100, max_steps=args.finetune_steps, lr=1e-4)
            tuned = mm.evaluate(pruned.model, test_loader).accuracy
        return masked, tuned

    rows = [("best rule", rule)] + ([("best searched", best_searched)] if best_searched else [])
    if best.seed is None and best_searched is not None and best.number != best_searched.number:
        rows.append(("best of study", best))
    print(f"\nstudy {study!r} in {res.storage}: {res.states()}")
    print(f"{'':14s} {'strategy':34s} {'trial':>5s} {'sparsity':>9s} {'val acc':>8s} {'test acc':>9s}"
          + (f" {'test acc ft':>11s}" if args.finetune_steps else ""))
    figures = {}
    for label, r in rows:
        masked, tuned = test_acc(r.strategy)
        figures[label] = {"strategy": r.strategy.name, "trial": r.number, "sparsity": r.strategy.global_sparsity,
                          "val": r.accuracy, "test": masked, "test_finetuned": tuned}
        print(f"{label:14s} {r.strategy.name:34s} {r.number:5d} {r.strategy.global_sparsity:9.4f} {r.accuracy:8.4f} {masked:9.4f}"
              + (f" {tuned:11.4f}" if tuned is not None else ""))
    if best_searched is not None:
        gain = best_searched.accuracy - rule.accuracy
        print(f"\nvalidation gain of the search over the best rule: {100 * gain:+.2f} pp "
              f"(test: {100 * (figures['best searched']['test'] - figures['best rule']['test']):+.2f} pp)")
    print(f"wall time per trial: {res.wall_per_trial:.2f} s (evaluation {res.seconds_per_trial:.2f} s); "
          f"this run's search took {search_s:.0f} s; dense test accuracy {mm.evaluate(model, test_loader).accuracy:.4f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()} (shared machine: timings are indicative)")
    atomic_write_json(out / "figures.json", {"figures": figures, "wall_per_trial": res.wall_per_trial,
                                             "eval_per_trial": res.seconds_per_trial, "states": res.states()})


if __name__ == "__main__":
    main()
