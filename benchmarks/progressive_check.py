"""The pool with progressive SNIP added, at each model's two highest sparsities, one-shot (3 seeds).

``PlanOptions(progressive=10)`` adds ``product:progressive`` to a plan: SNIP rescored on the pruned model over
10 rounds (Iter-SNIP, de Jorge et al. 2021). This check adds that member to the pool of the committed run
(``benchmarks/results/full.json``) without rerunning the pool: for each (model, seed, sparsity) it builds the
member on the same calibration draw, evaluates it masked with BatchNorm re-estimated on the same held batches,
on the same validation split as the recorded choice's finals, and the new choice is whichever of the two has
the higher validation accuracy (the recorded winner on a tie). The test split is read for the report only.
(The pool's screening step is skipped for the one new member: it goes straight to the finals.)

    OMP_NUM_THREADS=1 python -m benchmarks.progressive_check --models resnet18    # resumable, per cell
    python -m benchmarks.progressive_check --table                                  # the markdown table
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.configs import FULL, OUTSIDE
from benchmarks.run import (
    BASELINES,
    BenchConfig,
    MaskedEvaluator,
    eval_loaders,
    has_batchnorm,
    variant_preset,
)
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import train_cached
from mixmatch_plugin.evaluation import evaluate
from mixmatch_plugin.io import atomic_write_json
from mixmatch_plugin.planning import PlanOptions, plan

logger = logging.getLogger("benchmarks.progressive_check")


def cells(recorded: dict[str, Any]) -> dict[str, list[float]]:
    """Each recorded model's two highest sparsities."""
    return {m: sorted({r["sparsity"] for r in v["runs"]})[-2:] for m, v in recorded.items()}


def finetune_done(row: dict[str, Any]) -> bool:
    """Whether a cell needs no fine-tuning pass: the member was not chosen, or it was fine-tuned already."""
    return row["chosen"] != "progressive" or "progressive_finetuned_test" in row


def run(models: list[str], seeds: list[int], out: Path, rounds: int, cache_dir: str, finetune: bool, source: Path) -> None:
    recorded = json.loads(source.read_text())["models"]
    doc: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"rounds": rounds, "rows": []}
    done = {(r["model"], r["seed"], r["sparsity"]) for r in doc["rows"] if finetune_done(r) or not finetune}
    cfg = BenchConfig.full()
    splits = data.fashion_mnist(None, seed=0)
    val, test = eval_loaders(cfg, splits)
    for name in models:
        model, _ = train_cached({**FULL, **OUTSIDE}[name], splits, cache_dir=cache_dir, progress=False)
        targets = cells(recorded)[name]
        for seed in seeds:
            calib = splits.calibration(cfg.calib_samples, 128, seed)
            bn = splits.held_batches(cfg.bn_batches, seed=seed)
            for target in targets:
                if (name, seed, target) in done:
                    continue
                doc["rows"] = [r for r in doc["rows"] if (r["model"], r["seed"], r["sparsity"]) != (name, seed, target)]
                t0 = time.perf_counter()
                p = plan(model, calib, preset=variant_preset("rules", model), target=target, on_unreachable="extend",
                         options=PlanOptions(progressive=rounds, score_family=False, shapes=("all-max",)))
                assert p.signals is not None
                ev = MaskedEvaluator(model, p.signals, p.layers, bn, cfg.bn_batches if has_batchnorm(model) else 0)
                member = ev.masked(p.strategy("product:progressive"))
                choice = next(c for c in recorded[name]["choices"] if (c["seed"], c["sparsity"]) == (seed, target))
                row = {"model": name, "seed": seed, "sparsity": target, "seconds": round(time.perf_counter() - t0, 1),
                       "progressive_val": evaluate(member, val).accuracy, "progressive_test": evaluate(member, test).accuracy,
                       "recorded_winner": choice["winner"], "recorded_val": choice["finals"][0]["accuracy"]}
                row["chosen"] = "progressive" if row["progressive_val"] > row["recorded_val"] else "recorded"
                if finetune and row["chosen"] == "progressive":  # fine-tuned as the run fine-tunes its choice: same steps, same batches
                    order = data.loader(splits.train, 128, shuffle=True, seed=seed)
                    work, _ = ev.fine_tuned(p.strategy("product:progressive"), order, cfg.finetune_steps, cfg.finetune_lr)
                    row["progressive_finetuned_test"] = evaluate(work, test).accuracy
                doc["rows"].append(row)
                atomic_write_json(out, doc)
                logger.info("%s", row)


def table(out: Path, source: Path) -> str:
    """Test-accuracy drops (points) per cell, mean ± std over seeds, against the committed run's rivals: one-shot,
    and fine-tuned where every seed was fine-tuned (the new choice's fine-tuned figure is the member's where it
    was chosen, the committed M&M's elsewhere). A difference counts beyond the larger seed std, the reseed spread
    (fine-tuned) and 0.1 point, as in the README's table."""
    recorded = json.loads(source.read_text())["models"]
    rows = json.loads(out.read_text())["rows"]
    lines = ["| model @ sparsity | regime | M&M, committed pool | progressive SNIP alone | M&M, pool + progressive "
             "(chosen in) | best rival | verdict | drop cut |", "|---|---|---|---|---|---|---|---|"]

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    def sd(v: list[float]) -> float:
        return statistics.stdev(v) if len(v) > 1 else 0.0

    for name, targets in cells(recorded).items():
        dense = recorded[name]["dense"]["test_accuracy"]
        for t in targets:
            cell = sorted((r for r in rows if (r["model"], r["sparsity"]) == (name, t)), key=lambda r: r["seed"])
            for regime, key in (("one-shot", "progressive_test"), ("fine-tuned", "progressive_finetuned_test")):
                if not cell or (regime == "fine-tuned" and any(r["chosen"] == "progressive" and key not in r for r in cell)):
                    continue
                test = {(r["method"], r["seed"]): r["test_accuracy"] for r in recorded[name]["runs"]
                        if r["sparsity"] == t and r["regime"] == regime}
                old = [100 * (dense - test[("mm", r["seed"])]) for r in cell]
                prog = [100 * (dense - r[key]) for r in cell if key in r]
                new = [100 * (dense - r[key]) if r["chosen"] == "progressive" else o for r, o in zip(cell, old, strict=True)]
                rivals = {b: [100 * (dense - test[(b, r["seed"])]) for r in cell] for b in BASELINES if all((b, r["seed"]) in test for r in cell)}
                best = min(rivals, key=lambda b: statistics.mean(rivals[b]))
                reseed = max([abs(test[(m, r["seed"])] - test[(m.replace("_reseeded", ""), r["seed"])]) * 100
                              for m, _ in test if m.endswith("_reseeded") for r in cell
                              if (m, r["seed"]) in test and (m.replace("_reseeded", ""), r["seed"]) in test] + [0.0])
                diff = statistics.mean(rivals[best]) - statistics.mean(new)
                spread = max(sd(new), sd(rivals[best]), reseed, 0.1)
                word = "**win**" if diff > spread else "loss" if diff < -spread else "tie"
                cut = f"{diff / statistics.mean(rivals[best]):+.0%}" if statistics.mean(rivals[best]) > 0 else "-"
                lines.append(f"| {name} @ {t} | {regime} | {ms(old)} | {ms(prog) if prog else '-'} | {ms(new)} "
                             f"({sum(r['chosen'] == 'progressive' for r in cell)} of {len(cell)}) | {best} {ms(rivals[best])} | "
                             f"{word} | {cut} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,swin,vit")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/progressive_check.json")
    ap.add_argument("--recorded", default="benchmarks/results/full.json", help="the committed run whose pool is extended "
                    "(benchmarks/results/outside/one-shot.json for the models outside the three)")
    ap.add_argument("--cache-dir", default="benchmarks/checkpoints")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune the member where validation chose it")
    ap.add_argument("--table", action="store_true", help="only print the markdown table from --out")
    a = ap.parse_args()
    if a.table:
        print(table(Path(a.out), Path(a.recorded)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    run(a.models.split(","), [int(s) for s in a.seeds.split(",")], Path(a.out), a.rounds, a.cache_dir, a.finetune, Path(a.recorded))


if __name__ == "__main__":
    main()
