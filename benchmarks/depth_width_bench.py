"""Depth, width (uniform), width (Mix-and-Match) and the CKA-chosen mix on a ResNet, Fashion-MNIST.

Every method runs the same loop (:func:`mixmatch_plugin.adapters.depth_width.prune_depth_width`) with the same
MACs schedule, so their points line up: each iteration removes the MACs of that iteration's depth
candidate (the least damaging block by KL divergence), and

* ``depth``: always removes that block, until each stage is down to ``--min-blocks`` (it may stop
  short of the target);
* ``mix``: builds both candidates (the width one with Mix-and-Match, MACs-matched), fine-tunes both,
  keeps the one with the higher CKA to the parent on the validation split; continues with width
  candidates once no block can go, until the target;
* ``width-uniform``: reaches the mix run's MACs reduction at each of its iterations with channels only,
  one ratio for every layer (Torch-Pruning);
* ``width-mm``: the same with a Mix-and-Match strategy (magnitude:midpoint, budget-matched by bisection).

Fine-tuning budget, the same for every method: ``--steps`` Adam steps after each iteration for the
kept model (``mix`` also fine-tunes the losing candidate: twice the compute, not more training of
the result), then ``--final-steps`` for the final model. The test split is evaluated for the report
only (a curve on ``--curve-test`` images after each iteration, all 10,000 at the end); every choice
uses the validation split. Each run checkpoints per iteration under ``--work`` and resumes.

ResNet-18 on 28×28 inputs has two blocks per stage, so the paper's minimum of 2 blocks per stage
would leave no depth candidate: this benchmark keeps 1 block per stage (``--min-blocks 1``), a
stated deviation.

    python benchmarks/depth_width_bench.py --quick
    python benchmarks/depth_width_bench.py --seeds 0,1,2 --target 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fmnist_resnet import trained_model

import mixmatch_plugin as mm
from mixmatch_plugin.adapters.depth_width import DepthWidthConfig, prune_depth_width
from mixmatch_plugin.app import data
from mixmatch_plugin.io import atomic_write_json, read_json

METHODS: dict[str, dict[str, Any]] = {  # in run order: the width runs follow the mix run's MACs schedule
    "depth": {"mode": "depth"},
    "mix": {"mode": "cka", "allocation": "mm"},
    "width-uniform": {"mode": "width", "allocation": "uniform"},
    "width-mm": {"mode": "width", "allocation": "mm"},
}


def _final_finetune(model: nn.Module, train: Any, steps: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    train.generator.manual_seed(seed)
    mm.finetune(model, {}, train, max_steps=steps, epochs=1 + steps // len(train), lr=lr)
    model.eval()


def run_one(method: str, seed: int, model: nn.Module, splits: data.Splits, args: argparse.Namespace,
            note: str, schedule: tuple[float, ...] = ()) -> dict[str, Any]:
    calib = splits.calibration(args.calib, 64, seed=seed)
    val = data.loader(data.subset(splits.val, args.val, 0) if args.val else splits.val, 250)
    curve_test = data.loader(data.subset(splits.test, args.curve_test, 0), 500)
    test = data.loader(data.subset(splits.test, args.test, 0) if args.test else splits.test, 500)
    train = data.loader(splits.train, args.batch_size, shuffle=True, seed=seed)
    example = next(iter(calib))[0][:2]
    extra: dict[str, Any] = {"schedule": schedule, "max_iterations": len(schedule)} if schedule else {}
    cfg = DepthWidthConfig(target=args.target, min_blocks=args.min_blocks, finetune_steps=args.steps,
                           finetune_lr=args.lr, seed=seed, cka_batches=None, bisect_steps=args.bisect_steps,
                           **METHODS[method], **extra)
    curve: dict[int, float] = {}

    def on_model(m: nn.Module, e: dict[str, Any]) -> None:
        curve[e["iteration"]] = mm.evaluate(m, curve_test).accuracy
        print(f"    {method} seed {seed} it {e['iteration']}: {e['choice']:<5} MACs -{e['macs_reduction']:.1%}  "
              f"val {e['val_accuracy']:.4f}  test[{args.curve_test}] {curve[e['iteration']]:.4f}  "
              f"({e['seconds']:.0f} s)", flush=True)

    t0 = time.time()
    res = prune_depth_width(model, example, calib, val, config=cfg, train_loader=train,
                            state_path=Path(args.work) / f"{method}-s{seed}.pt",
                            meta={"model": note, "val": args.val, "calib": args.calib, "batch": args.batch_size},
                            on_iteration=on_model)
    pruned = copy.deepcopy(res.model)
    before = mm.evaluate(pruned, test).accuracy
    _final_finetune(pruned, train, args.final_steps, args.lr, seed)
    after = mm.evaluate(pruned, test).accuracy
    return {
        "method": method, "seed": seed, "iterations": len(res.log), "stopped": res.stopped,
        "macs_reduction": res.macs_reduction, "macs": res.macs, "params": res.params,
        "params_reduction": 1 - res.params / res.params_original,
        "choices": [e["choice"] for e in res.log],
        "removed_blocks": res.log[-1]["removed_blocks"] if res.log else [],
        "curve": [{"iteration": e["iteration"], "macs_reduction": e["macs_reduction"], "val_accuracy": e["val_accuracy"],
                   "curve_test_accuracy": curve.get(e["iteration"]),
                   "mismatch": (e.get("width") or {}).get("mismatch"),
                   "cka_depth": (e.get("depth") or {}).get("cka"), "cka_width": (e.get("width") or {}).get("cka")}
                  for e in res.log],
        "test_before_final_ft": before, "test_accuracy": after,
        "finetune_steps_total": len(res.log) * args.steps + args.final_steps, "seconds": time.time() - t0,
    }


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(runs: list[dict[str, Any]], dense: dict[str, Any], note: str, args: argparse.Namespace) -> None:
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    print(f"\nModel: {note}")
    print(f"dense: MACs {dense['macs']:,}, params {dense['params']:,}, test {dense['test_accuracy']:.4f}")
    print(f"fine-tuning: {args.steps} steps per iteration, {args.final_steps} final; batch {args.batch_size}, "
          f"Adam lr {args.lr}; min blocks per stage {args.min_blocks}")
    first = min(r["seed"] for r in runs)
    print(f"\nCurve (seed {first}): MACs removed and test accuracy on {args.curve_test} test images after each "
          "iteration (before the final fine-tune)")
    depth_its = max(len(r["curve"]) for r in runs)
    header = f"{'it':>3}  " + "  ".join(f"{m:>22}" for m in methods) + "  best"
    print(header)
    for i in range(depth_its):
        cells, best = [], ("", -1.0)
        for m in methods:
            r = next((x for x in runs if x["method"] == m and x["seed"] == first), None)
            c = r["curve"][i] if r and i < len(r["curve"]) else None
            if r is None or c is None or c["curve_test_accuracy"] is None:
                cells.append(f"{'-':>22}")
                continue
            cells.append(f"{'-' + format(c['macs_reduction'], '.1%'):>9} {c['curve_test_accuracy']:.4f}" +
                         (f" {'D' if r['choices'][i] == 'depth' else 'W'}" if m == "mix" else "  ") + " " * 4)
            if c["curve_test_accuracy"] > best[1]:
                best = (m, c["curve_test_accuracy"])
        print(f"{i + 1:>3}  " + "  ".join(cells) + f"  {best[0]}")
    print("\nFinal (after the final fine-tune), mean ± std over seeds, test accuracy on the full test split:")
    print(f"{'method':<14} {'seeds':>5} {'MACs removed':>13} {'params removed':>15} {'test before FT':>17} "
          f"{'test after FT':>17} {'choices (seed ' + str(first) + ')':>24}")
    finals = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        finals[m] = statistics.mean(r["test_accuracy"] for r in rs)
        r0 = next(r for r in rs if r["seed"] == first)
        print(f"{m:<14} {len(rs):>5} {_ms([r['macs_reduction'] for r in rs]):>13} "
              f"{_ms([r['params_reduction'] for r in rs]):>15} {_ms([r['test_before_final_ft'] for r in rs]):>17} "
              f"{_ms([r['test_accuracy'] for r in rs]):>17} {''.join('D' if c == 'depth' else 'W' for c in r0['choices']):>24}")
    winner = max(finals, key=lambda k: finals[k])
    print(f"\nAt the largest reduction the best mean test accuracy is {winner} ({finals[winner]:.4f}); "
          f"per-iteration winners are in the 'best' column above.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small ResNet on a subsample, short budgets, 1 seed")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of MACs to remove")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--min-blocks", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps per iteration (default 40; 5 quick)")
    ap.add_argument("--final-steps", type=int, default=None, help="final fine-tune steps (default 200; 20 quick)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--calib", type=int, default=512, help="calibration images for block scores (training split)")
    ap.add_argument("--val", type=int, default=2000, help="validation images for CKA and accuracy (0: all 5,000)")
    ap.add_argument("--curve-test", type=int, default=2000, help="test images for the per-iteration curve")
    ap.add_argument("--test", type=int, default=0, help="test images for the final accuracy (0: all 10,000)")
    ap.add_argument("--bisect-steps", type=int, default=12)
    ap.add_argument("--work", default="out/depth_width_bench", help="per-run checkpoints (resumable) and results")
    args = ap.parse_args()
    if args.quick:
        args.seeds = args.seeds if args.seeds != "0,1,2" else "0"
        args.steps = 5 if args.steps is None else args.steps
        args.final_steps = 20 if args.final_steps is None else args.final_steps
        args.val, args.curve_test, args.test, args.calib = 500, 500, 2000, 256
        args.target = min(args.target, 0.4)
        args.work = args.work + "-quick"
    args.steps = 40 if args.steps is None else args.steps
    args.final_steps = 200 if args.final_steps is None else args.final_steps
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("MIXMATCH_THREADS", "2")))
    splits = data.fashion_mnist()
    got = trained_model("resnet18", splits, quick=args.quick)
    assert got is not None
    model, info, note = got
    print(f"Model: {note}", flush=True)
    from mixmatch_plugin.adapters.depth_width import count_macs

    macs, params = count_macs(model, splits.val.tensors[0][:2])
    dense = {"macs": macs, "params": params, "test_accuracy": info["test_accuracy"]}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    done: list[dict[str, Any]] = read_json(results_path)["runs"] if results_path.exists() else []
    key = json.dumps({k: v for k, v in vars(args).items() if k not in ("seeds", "methods", "work")}, sort_keys=True)
    done = [r for r in done if r.get("key") == key]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for seed in seeds:
        for m in methods:
            if any(r["method"] == m and r["seed"] == seed for r in done):
                continue
            ref = next((r for r in done if r["method"] == "mix" and r["seed"] == seed), None)
            schedule = tuple(c["macs_reduction"] for c in ref["curve"]) if ref and m.startswith("width") else ()
            print(f"  running {m}, seed {seed}" + (f" (MACs schedule of mix: {len(schedule)} steps)" if schedule else ""),
                  flush=True)
            r = run_one(m, seed, model, splits, args, note, schedule)
            r["key"] = key
            done.append(r)
            atomic_write_json(results_path, {"machine": platform.node(), "note": note, "dense": dense, "runs": done})
    runs = [r for r in done if r["seed"] in seeds and r["method"] in methods]
    report(runs, dense, note, args)
    print(f"\nresults: {results_path}")


if __name__ == "__main__":
    main()
