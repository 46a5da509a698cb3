"""Does CKA to the parent rank the 30 Mix-and-Match strategies better than masked validation accuracy?

For each model: build the plan (3 signals x 10 shapes, budget-matched at one sparsity), and for each
of the 30 strategies measure, without fine-tuning and on the *validation* split,

* masked validation accuracy (``mm.rank``, the plugin's default ranking),
* masked validation loss (same pass),
* debiased minibatch CKA of the masked model's penultimate features to the dense model's
  (``mixmatch_plugin.cka.rank_by_cka``),

then fine-tune every masked model with the same budget (masks kept, same data order) and measure its
accuracy. The Spearman correlation (and Kendall's tau) of each proxy with the post-fine-tune
accuracy says which proxy ranks better; the "top-1" columns give the post-fine-tune accuracy of the
strategy each proxy would have picked. The post-fine-tune accuracy is measured on the test split (it
is the quantity ranked, not a choice) and on validation.

    python benchmarks/cka_proxy.py --quick                 # a few minutes
    python benchmarks/cka_proxy.py --models resnet18,swin  # the full checkpoints when cached
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist_resnet import trained_model

import mixmatch_plugin as mm
from mixmatch_plugin.app import data
from mixmatch_plugin.cka import rank_by_cka
from mixmatch_plugin.io import atomic_write_json

SPARSITY = {"resnet18": 0.9, "swin": 0.7, "vit": 0.7}


def _reseed(loader: Any, seed: int) -> None:
    torch.manual_seed(seed)
    loader.generator.manual_seed(seed)


def measure(name: str, splits: data.Splits, args: argparse.Namespace) -> dict[str, Any] | None:
    got = trained_model(name, splits, quick=args.quick)
    if got is None:
        return None
    model, _info, note = got
    print(f"\n== {name}: {note}", flush=True)
    sparsity = args.sparsity or SPARSITY.get(name, 0.8)
    calib = splits.calibration(args.calib, 64, seed=0)
    val = data.loader(data.subset(splits.val, args.val, 0) if args.val else splits.val, 500)
    test = data.loader(data.subset(splits.test, args.test, 0) if args.test else splits.test, 500)
    train = data.loader(splits.train, args.batch_size, shuffle=True, seed=0)
    t0 = time.time()
    p = mm.plan(model, calib, target=sparsity, on_unreachable="extend",
                signals=("magnitude",) if args.quick else mm.DEFAULT_SIGNALS)
    by_acc = {r.strategy: r for r in mm.rank(model, p.strategies, val, signals=p.signals)}
    by_cka = {r.strategy: r.cka for r in rank_by_cka(model, p.strategies, val, signals=p.signals)}
    t_proxy = time.time() - t0
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(p.strategies):
        pruned = p.apply(model, s)
        _reseed(train, 1234)
        mm.finetune(pruned.model, pruned.masks, train, max_steps=args.steps, epochs=1 + args.steps // len(train),
                    lr=args.lr)
        rows.append({
            "strategy": s.name, "masked_val_accuracy": by_acc[s.name].accuracy, "masked_val_loss": by_acc[s.name].loss,
            "cka": by_cka[s.name], "ft_val_accuracy": mm.evaluate(pruned.model, val).accuracy,
            "ft_test_accuracy": mm.evaluate(pruned.model, test).accuracy,
        })
        r = rows[-1]
        print(f"  [{i + 1:>2}/{len(p.strategies)}] {s.name:<28} masked acc {r['masked_val_accuracy']:.4f}  "
              f"CKA {r['cka']:.4f}  -> fine-tuned test {r['ft_test_accuracy']:.4f}", flush=True)
    proxies = {"masked val accuracy": [r["masked_val_accuracy"] for r in rows],
               "masked val loss (negated)": [-r["masked_val_loss"] for r in rows],
               "CKA to the dense model": [r["cka"] for r in rows]}
    out: dict[str, Any] = {"model": name, "note": note, "sparsity": sparsity, "strategies": len(rows),
                           "finetune_steps": args.steps, "proxy_seconds": t_proxy, "rows": rows, "proxies": {}}
    best_test = max(r["ft_test_accuracy"] for r in rows)
    for label, values in proxies.items():
        res: dict[str, Any] = {}
        for truth in ("ft_test_accuracy", "ft_val_accuracy"):
            y = [r[truth] for r in rows]
            rho = stats.spearmanr(values, y).statistic
            tau = stats.kendalltau(values, y).statistic
            res[truth] = {"spearman": float(rho), "kendall": float(tau)}
        top = max(range(len(rows)), key=lambda j: values[j])
        res["top1_strategy"] = rows[top]["strategy"]
        res["top1_ft_test_accuracy"] = rows[top]["ft_test_accuracy"]
        res["top1_regret"] = best_test - rows[top]["ft_test_accuracy"]
        out["proxies"][label] = res
    out["best_ft_test_accuracy"] = best_test
    out["mean_ft_test_accuracy"] = sum(r["ft_test_accuracy"] for r in rows) / len(rows)
    return out


def report(r: dict[str, Any]) -> None:
    print(f"\n{r['model']} at sparsity {r['sparsity']}: {r['strategies']} strategies, {r['finetune_steps']} fine-tune "
          f"steps each; post-fine-tune test accuracy best {r['best_ft_test_accuracy']:.4f}, mean "
          f"{r['mean_ft_test_accuracy']:.4f}")
    print(f"{'proxy':<28} {'Spearman (test)':>15} {'Kendall (test)':>14} {'Spearman (val)':>14} "
          f"{'top-1 test acc':>14} {'regret':>7}")
    for label, p in r["proxies"].items():
        print(f"{label:<28} {p['ft_test_accuracy']['spearman']:>15.3f} {p['ft_test_accuracy']['kendall']:>14.3f} "
              f"{p['ft_val_accuracy']['spearman']:>14.3f} {p['top1_ft_test_accuracy']:>14.4f} {p['top1_regret']:>7.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small ResNet on a subsample, 10 strategies, short fine-tunes")
    ap.add_argument("--models", default="resnet18,swin,vit", help="benchmark models to use when available")
    ap.add_argument("--sparsity", type=float, default=None, help="global sparsity (default per model)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps per strategy (default 100; 15 quick)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (training split)")
    ap.add_argument("--val", type=int, default=None, help="validation images (default all 5,000; 1,000 quick)")
    ap.add_argument("--test", type=int, default=None, help="test images (default all 10,000; 2,000 quick)")
    ap.add_argument("--out", default="out/cka_proxy.json")
    args = ap.parse_args()
    if args.quick:
        args.models = "resnet18"
        args.steps = args.steps or 15
        args.val = args.val or 1000
        args.test = args.test or 2000
        args.calib = min(args.calib, 256)
    args.steps = args.steps or 100
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("MIXMATCH_THREADS", "2")))
    splits = data.fashion_mnist()
    results = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        r = measure(name, splits, args)
        if r is not None:
            report(r)
            results.append(r)
    atomic_write_json(args.out, {"machine": platform.node(), "threads": torch.get_num_threads(), "args": vars(args),
                                 "results": results})
    print("\nSummary (Spearman with post-fine-tune test accuracy; higher ranks better):")
    for r in results:
        cells = ", ".join(f"{k}: {v['ft_test_accuracy']['spearman']:+.3f}" for k, v in r["proxies"].items())
        print(f"  {r['model']}: {cells}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
