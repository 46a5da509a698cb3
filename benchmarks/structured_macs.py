"""Structured pruning at matched MACs: Mix-and-Match's MACs budget against Torch-Pruning's own options (issue 28).

Methods, each at the same fraction of MACs kept (Torch-Pruning's counter; TP ratios bisected to it):

* ``tp_uniform``: ``MetaPruner(pruning_ratio=r)``, ``GroupMagnitudeImportance(p=2)``;
* ``tp_global``: the same with ``global_pruning=True``; ``tp_isomorphic``: ``global_pruning=True, isomorphic=True``;
* ``tp_taylor_global``: ``GroupTaylorImportance`` (gradients of the calibration batches), ``global_pruning=True``;
* ``tp_lamp_global``: ``LAMPImportance(p=2)`` (Torch-Pruning's LAMP-normalised group scores), ``global_pruning=True``;
* ``mix-and-match``: ``prune(model, None, x, calib=..., macs=target)`` with the same importance as tp_uniform
  (rows record the per-group cap the budget chose, ``cap``);
* ``mix-and-match heads``: the same with ``TPOptions(prune_heads=True)``: whole attention heads (timm ViT/DeiT and
  Swin; skipped on models without attention).

TP methods get the adapter's model handling (``pruner_kwargs``: heads, PatchMerging, bias tables, free
parameters; ``fix_attention`` after ``step``). Per seed (calibration draw, BatchNorm batches, fine-tuning order):
one-shot test accuracy after BatchNorm re-estimation, then after the same Adam fine-tune. Latency: median
seconds per forward at batch 1 and 64, one thread, seed 0, channels-last, timed alternately with the dense
model. Rows are written after each one; a rerun skips them.

    OMP_NUM_THREADS=1 python -m benchmarks.structured_macs --models vit,swin,resnet18 --seeds 0,1,2 --targets 0.3,0.5,0.7
    OMP_NUM_THREADS=1 python -m benchmarks.structured_macs --models mobilenetv3 --targets 0.3,0.5 --out benchmarks/results/outside/structured_macs.json
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
import torch_pruning as tp

from benchmarks.configs import FULL, OUTSIDE
from mixmatch_plugin.adapters import torch_pruning as tpa
from mixmatch_plugin.adapters.torch_pruning.timm_layers import clear_caches, safe_deepcopy
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import checkpoint_path, train_cached
from mixmatch_plugin.evaluation import evaluate, latencies, reestimate_bn
from mixmatch_plugin.finetuning import finetune
from mixmatch_plugin.strategies import Strategy

logger = logging.getLogger("structured_macs")
METHODS = ("tp_uniform", "tp_global", "tp_isomorphic", "tp_taylor_global", "tp_lamp_global", "mix-and-match", "mix-and-match heads")
TP_METHODS = tuple(m for m in METHODS if m.startswith("tp_"))


def load(name: str, splits: data.Splits) -> tuple[torch.nn.Module, str]:
    cfg = {**FULL, **OUTSIDE}[name]
    for cache in ("benchmarks/checkpoints", None):
        if checkpoint_path(cfg, cache).exists():
            return train_cached(cfg, splits, cache_dir=cache, progress=False)[0].eval(), "final"
    raise SystemExit(f"no checkpoint for {name}: run `python -m benchmarks --models {name}` first")


def tp_prune(model: torch.nn.Module, x: torch.Tensor, method: str, ratio: float, calib: list[Any]) -> torch.nn.Module:
    """A plain MetaPruner call with the adapter's model handling, on a copy."""
    work = safe_deepcopy(model)
    kw = tpa.pruner_kwargs(work, Strategy("none", "magnitude", {}, 0.0, {}), x)
    kw.pop("pruning_ratio_dict"), kw.pop("head_pruning_ratio_dict")
    imp: Any = tp.importance.LAMPImportance(p=2) if "lamp" in method else tp.importance.GroupMagnitudeImportance(p=2)
    if "taylor" in method:
        imp = tp.importance.GroupTaylorImportance()
        work.eval()
        for xb, yb in calib:
            clear_caches(work)  # LeViT's eval-mode bias cache holds the previous batch's graph
            (torch.nn.functional.cross_entropy(work(xb), yb) / len(calib)).backward()
        clear_caches(work)
    dims = tpa.attention_head_dims(work)
    pruner = tp.pruner.MetaPruner(work, x, importance=imp, **{**kw, "pruning_ratio": ratio},
                                  global_pruning=method != "tp_uniform", isomorphic=method == "tp_isomorphic")
    with torch.no_grad():
        pruner.step()
    tpa.fix_attention(work, dims, {n: int(pruner.num_heads.get(work.get_submodule(n).qkv, work.get_submodule(n).num_heads)) for n in dims})
    work.zero_grad(set_to_none=True)
    return work


def at_macs(model: torch.nn.Module, x: torch.Tensor, method: str, target: float, calib: list[Any]) -> tuple[torch.nn.Module, float]:
    dense = tpa.count_macs(model, x)[0]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = tp_prune(model, x, method, mid, calib)
        f = tpa.count_macs(m, x)[0] / dense
        if best is None or abs(f - target) < abs(best[1] - target):
            best = (m, f)
        if abs(f - target) <= 0.002 * target:
            break
        lo, hi = (mid, hi) if f > target else (lo, mid)
    assert best is not None
    return best


def batch_latencies(models: list[torch.nn.Module], batch: int, shape: tuple[int, ...], reps: int,
                    channels_last: bool = True) -> list[float]:
    """Median seconds per forward of each model, timed in alternation (:func:`mixmatch_plugin.evaluation.latencies`).
    Image inputs run channels-last unless told otherwise: the layout oneDNN's CPU convolutions and pooling are
    fast in (PyTorch's advice for CPU inference). The models are not changed."""
    x = torch.randn(batch, *shape)
    if x.dim() == 4 and channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        models = [safe_deepcopy(m).to(memory_format=torch.channels_last) for m in models]
    return latencies(models, lambda m: m(x), reps)


def markdown(rows: list[dict[str, Any]]) -> str:
    """Mean ± standard deviation over seeds per (model, target, method); speed-ups from seed 0."""
    def ms(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else f"{100 * v[0]:.2f}"

    lines = ["**Structured pruning at matched MACs** (Torch-Pruning 1.6.1's counter; Fashion-MNIST test split, 10,000 "
             "images): mean ± std over seeds (calibration draw, BatchNorm batches, fine-tuning order). One-shot after "
             "BatchNorm re-estimation on 4 training batches; fine-tuned: 100 Adam steps, lr 1e-4, batch 128, the same "
             "for every method. Latency: median seconds per forward, 1 thread, seed 0, on a shared 2-core machine "
             "(load 4-6: batch-1 figures are noise; rows measured before 2026-12-06 ran NCHW, later ones channels-last). Mix-and-Match rows name the allocation each seed's budget chose (a per-group cap, `TPOptions.caps`, or a global threshold, `TPOptions.thresholds`). "
             "`python -m benchmarks.structured_macs --help`.", "",
             "| model | MACs kept (target) | method | seeds | MACs kept | test one-shot % | test fine-tuned % | "
             "speed-up b1 | speed-up b64 | b64 speed-up / MACs ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["target"], r["method"]) for r in rows}, key=lambda k: (k[1], k[0], METHODS.index(k[2])))
    for model, target, method in keys:
        rs = [r for r in rows if (r["model"], r["target"], r["method"]) == (model, target, method)]
        lat = next((r for r in rs if "latency_b64" in r), None)
        sp = [lat[f"dense_latency_b{b}"] / lat[f"latency_b{b}"] for b in (1, 64)] if lat else None
        speed = f"{sp[0]:.2f} | {sp[1]:.2f} | {sp[1] * lat['macs_kept']:.0%}" if sp and lat else "- | - | -"
        caps = [r.get("allocation", f"cap {r['cap']:g}") for r in sorted(rs, key=lambda r: r["seed"]) if "cap" in r]
        label = method + (f" ({' / '.join(caps)})" if caps else "")
        lines.append(f"| {model} ({rs[0]['origin']}) | {target:.0%} | {label} | {len(rs)} | "
                     f"{statistics.mean(r['macs_kept'] for r in rs):.3f} | {ms([r['test_one_shot'] for r in rs])} | "
                     f"{ms([r['test_finetuned'] for r in rs])} | {speed} |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    """Per model and target: Mix-and-Match against the best Torch-Pruning method (highest mean), one-shot and
    fine-tuned, test accuracy % mean ± std; a difference counts when it exceeds the larger std and 0.1 point."""
    def stats(rs: list[dict[str, Any]], key: str) -> tuple[float, float]:
        v = [100 * r[key] for r in rs]
        return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0

    lines = ["| model (dense %) | MACs kept | one-shot: M&M / best TP | verdict | fine-tuned: M&M / best TP | verdict |",
             "|---|---|---|---|---|---|"]
    for model, ours in ((m, o) for m in dict.fromkeys(r["model"] for r in rows) for o in METHODS if o not in TP_METHODS):
        for target in sorted({r["target"] for r in rows if r["model"] == model}):
            by = {m: [r for r in rows if (r["model"], r["target"], r["method"]) == (model, target, m)] for m in METHODS}
            if not by[ours] or not any(by[m] for m in TP_METHODS):
                continue
            cells = []
            for key in ("test_one_shot", "test_finetuned"):
                mm = stats(by[ours], key)
                name, best = max(((m, stats(by[m], key)) for m in TP_METHODS if by[m]), key=lambda t: t[1][0])
                diff, spread = mm[0] - best[0], max(mm[1], best[1], 0.1)
                word = "**win**" if diff > spread else "loss" if diff < -spread else "tie"
                cells += [f"{mm[0]:.2f} ± {mm[1]:.2f} / {best[0]:.2f} ± {best[1]:.2f} ({name})", f"{word} ({diff:+.2f})"]
            d = dense.get(model, {}).get("test")
            label = model + (", whole heads" if ours.endswith("heads") else "")
            lines.append(f"| {label} ({100 * d:.2f}) | {target:.0%} | " if d else f"| {label} | {target:.0%} | ")
            lines[-1] += " | ".join(cells) + " |"
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="vit,swin,resnet18")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--targets", default="0.3,0.5,0.7")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--finetune", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/structured_macs.json")
    ap.add_argument("--table", action="store_true", help="only write the markdown table from --out")
    ap.add_argument("--dense", action="store_true", help="only measure the dense models' test accuracy (OUT_dense.json)")
    a = ap.parse_args()
    if a.dense:
        splits = data.fashion_mnist(seed=0)
        dense = {}
        for n in a.models.split(","):
            m, origin = load(n, splits)
            dense[n] = {"origin": origin, "test": evaluate(m, data.loader(splits.test, 500)).accuracy}
        Path(a.out).with_name(Path(a.out).stem + "_dense.json").write_text(json.dumps(dense, indent=1))
        return
    if a.table:
        dense_path = Path(a.out).with_name(Path(a.out).stem + "_dense.json")
        saved: dict[str, Any] = json.loads(dense_path.read_text()) if dense_path.exists() else {}
        note = "\n\nDense test accuracy: " + ", ".join(f"{k} {100 * v['test']:.2f} % ({v['origin']})" for k, v in saved.items())
        rows = json.loads(Path(a.out).read_text())["rows"]
        Path(a.out).with_suffix(".md").write_text(markdown(rows) + note + "\n\n**Verdicts**\n\n" + verdicts(rows, saved) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"rows": []}
    done = {(r["model"], r["seed"], r["target"], r["method"]) for r in doc["rows"]}
    splits = data.fashion_mnist(seed=0)
    test = data.loader(splits.test, 500)
    x = splits.train.tensors[0][:2].clone()
    models: dict[str, Any] = {}
    for target in [float(t) for t in a.targets.split(",")]:
        for name in a.models.split(","):
            if name not in models:
                models[name] = load(name, splits)
            model, origin = models[name]
            for seed in [int(s) for s in a.seeds.split(",")]:
                calib = [tuple(b) for b in splits.calibration(512, 128, seed)]
                bn = splits.held_batches(4, seed=seed)
                for method in a.methods.split(","):
                    if (name, seed, target, method) in done or (method.endswith("heads") and not tpa.attention_head_dims(model)):
                        continue
                    t0 = time.perf_counter()
                    if method.startswith("mix-and-match"):
                        heads = tpa.TPOptions(prune_heads=method.endswith("heads"))
                        res = tpa.prune(model, None, x, calib=calib, macs=target, options=heads)
                        pm, got, cap, chosen = res.model, res.report.macs_ratio, res.report.cap, res.report.allocation
                    else:
                        (pm, got), cap, chosen = at_macs(model, x, method, target, calib), None, None
                    secs = time.perf_counter() - t0
                    reestimate_bn(pm, bn, 4)
                    one = evaluate(pm, test).accuracy
                    torch.manual_seed(seed)
                    finetune(pm, {}, data.loader(splits.train, 128, shuffle=True, seed=seed), max_steps=a.finetune, lr=1e-4)
                    row = {"model": name, "origin": origin, "seed": seed, "target": target, "method": method,
                           "macs_kept": got, "params": sum(p.numel() for p in pm.parameters()), "seconds_prune": secs,
                           "test_one_shot": one, "test_finetuned": evaluate(pm, test).accuracy, **({"cap": cap} if cap else {}),
                           **({"allocation": chosen} if chosen else {})}
                    if seed == 0:
                        shape = tuple(x.shape[1:])
                        for b, reps in ((1, 50), (64, 9)):
                            row[f"latency_b{b}"], row[f"dense_latency_b{b}"] = batch_latencies([pm, model], b, shape, reps)
                    doc["rows"].append(row)
                    out.write_text(json.dumps(doc, indent=1))
                    logger.info("%s", row)


if __name__ == "__main__":
    main()
