"""Optuna refinement around the 30 rule strategies, with a SQLite study and the Pareto plot.

Trains a small ResNet briefly (Fashion-MNIST when it is installed, else scikit-learn's digits),
builds the Mix-and-Match plan, then searches around its 30 rule strategies for a better
accuracy/sparsity trade-off: validation accuracy up, global sparsity up (NSGA-II). Scores use the
validation split only, and BatchNorm statistics are re-estimated on training batches after masking.

    python examples/optuna_search.py --quick            # digits, about a minute on 2 CPU cores
    python examples/optuna_search.py --trials 60        # run it again: the study resumes

Writes into --out: search.db (the study: run the script again to continue it, or open it with
`optuna-dashboard sqlite:///<out>/search.db`), plan.json (the plan with the Pareto strategies added),
pareto.png, history.png and importances.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna
import torch

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import optuna as mmo
from mixmatch_plugin.app import data
from mixmatch_plugin.models import tiny_resnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, a tiny model and 36 trials")
    ap.add_argument("--out", default="optuna-example", help="output folder (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=None, help="trials this run (default: 36 quick, 60 otherwise)")
    ap.add_argument("--storage", default=None, help="Optuna storage (default: sqlite:///<out>/search.db)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is too much here
    torch.manual_seed(0)
    out = Path(args.out)
    quick = args.quick or not data.has_fashion_mnist()
    splits = data.digits(seed=0) if quick else data.fashion_mnist(seed=0)
    train_loader, val_loader, _ = splits.loaders(batch_size=64 if quick else 128, seed=0)

    t0 = time.perf_counter()
    ckpt = out / "model.pt"
    model = tiny_resnet(num_classes=10, in_chans=1, width=8 if quick else 16)
    if ckpt.exists():  # the same model on every run, so the study can resume
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
    else:
        mm.finetune(model, {}, train_loader if quick else data.loader(data.subset(splits.train, 12000), 128, shuffle=True),
                    epochs=4 if quick else 2, lr=3e-3)  # dense training: no masks
        model.eval()
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), ckpt)
    print(f"{splits.name}: dense validation accuracy {mm.evaluate(model, val_loader).accuracy:.4f} "
          f"({time.perf_counter() - t0:.1f} s)")

    plan = mm.plan(model, splits.calibration(samples=256 if quick else 1024, batch_size=64))
    print(f"plan: {plan.summary()}")
    evaluator = mmo.ProxyEvaluator(
        model, val_loader if quick else data.loader(data.subset(splits.val, 2000), 256),
        signals=plan.signals, bn_loader=train_loader, bn_batches=4,
    )
    options = mmo.SearchOptions(n_trials=args.trials or (36 if quick else 60), objective="multi", sampler="nsga2")
    storage = args.storage or f"sqlite:///{(out / 'search.db').absolute()}"
    res = mmo.search(plan, evaluator, options, storage=storage, study_name="example", progress=True)
    mmo.export(res, out / "plan.json")
    for fn, name in ((mmo.plot_pareto, "pareto.png"), (mmo.plot_history, "history.png"),
                     (mmo.plot_importances, "importances.png")):
        path = fn(res, out / name)
        if path is not None:
            print(f"wrote {path}")

    print(f"\n{len(res.trials)} completed trials ({res.states()}), {res.wall_per_trial:.2f} s per trial")
    print("Pareto front (validation accuracy against global sparsity):")
    for r in res.best:
        print(f"  {r.strategy.name:42s} sparsity {r.x:.4f}  accuracy {r.accuracy:.4f}  {'rule' if r.seed else 'searched'}")
    if res.best_rule is not None:
        print(f"best rule strategy: {res.best_rule.strategy.name} (sparsity {res.best_rule.x:.4f}, "
              f"accuracy {res.best_rule.accuracy:.4f})")
    print(f"wrote {out / 'plan.json'}; run again to add trials to the same study")


if __name__ == "__main__":
    main()
