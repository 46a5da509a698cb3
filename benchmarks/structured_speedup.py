"""Batch-64 CPU speed-up against the MACs ratio at 30 % of MACs kept (seed 0, one thread), for issue 28.

Methods: Torch-Pruning global pruning, Mix-and-Match (``macs=0.3``), Mix-and-Match with channel counts
rounded to multiples of 8 (``TPOptions(round_to=8)``), the same with whole attention heads (``prune_heads=True``;
skipped for models without attention), and Mix-and-Match at a latency budget of 45 % timed on a batch of 64 (image
models channels-last, as deployed). One-shot accuracy on 2,000 test images after
BatchNorm re-estimation. Latency: every pruned model timed in alternation with the dense one (21 rounds,
medians), in the default NCHW layout and channels-last. Prints one JSON line per model and method; run it on
an idle machine.

    python -m benchmarks.structured_speedup vit,resnet18,swin
    python -m benchmarks.structured_speedup --round-to swin 0.5 1,8,16   # the same budget at round_to 1, 8, 16
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from benchmarks.structured_macs import at_macs, batch_latencies, load
from mixmatch_plugin.adapters import torch_pruning as tpa
from mixmatch_plugin.adapters.torch_pruning.timm_layers import safe_deepcopy
from mixmatch_plugin.app import data
from mixmatch_plugin.evaluation import evaluate, reestimate_bn

METHODS = ("tp_global", "mix-and-match", "mix-and-match r8", "mix-and-match r8 heads", "mix-and-match latency=0.45")


def setup(name: str) -> tuple[torch.nn.Module, torch.Tensor, list[Any], list[Any], Any]:
    """Seed 0's model, example inputs, calibration batches, BatchNorm batches and 2,000-image test loader."""
    torch.set_num_threads(1)
    splits = data.fashion_mnist(seed=0)
    model, _ = load(name, splits)
    calib = [tuple(b) for b in splits.calibration(512, 128, 0)]
    return (model, splits.train.tensors[0][:2].clone(), calib, splits.held_batches(4, seed=0),
            data.loader(data.subset(splits.test, 2000, 0), 500))


def main(models: list[str]) -> None:
    for name in models:
        model, x, calib, bn, test = setup(name)
        shape = tuple(x.shape[1:])
        rows = []
        for method in METHODS:
            t0 = time.perf_counter()
            if "heads" in method and not any(hasattr(m, "qkv") and hasattr(m, "num_heads") for m in model.modules()):
                continue  # whole heads: models with timm attention only
            if "latency" in method:
                deployed = safe_deepcopy(model).to(memory_format=torch.channels_last)  # the user's model stays as it is
                deploy = torch.randn(64, *shape).contiguous(memory_format=torch.channels_last)
                res = tpa.prune(deployed, None, x, calib=calib, latency=0.45, options=tpa.TPOptions(latency_inputs=deploy))
                pm, got = res.model, res.report.macs_ratio
            elif method.startswith("mix"):
                o = tpa.TPOptions(round_to=8 if "r8" in method else None, prune_heads="heads" in method)
                res = tpa.prune(model, None, x, calib=calib, macs=0.3, options=o)
                pm, got = res.model, res.report.macs_ratio
            else:
                pm, got = at_macs(model, x, method, 0.3, calib)
            reestimate_bn(pm, bn, 4)
            rows.append((method, pm, {"model": name, "method": method, "macs_kept": round(got, 3),
                                      "one_shot_2000": evaluate(pm, test).accuracy, "prune_s": round(time.perf_counter() - t0, 1)}))
        for layout, cl in (("nchw", False), ("channels_last", True)):
            dense, *pruned = batch_latencies([model, *(pm for _, pm, _ in rows)], 64, shape, 21, channels_last=cl)
            for (_, _, row), t in zip(rows, pruned, strict=True):
                row[f"speedup_b64_{layout}"] = round(dense / t, 2)
                row[f"of_macs_ratio_{layout}"] = round(dense / t * row["macs_kept"], 2)
                row[f"dense_b64_ms_{layout}"] = round(1000 * dense, 1)
        for _, _, row in rows:
            print(json.dumps(row), flush=True)


def round_to(name: str, target: float, rounds: list[int]) -> None:
    """Mix-and-Match's MACs budget with channel counts rounded to each of ``rounds``: one JSON line each."""
    model, x, calib, bn, test = setup(name)
    shape = tuple(x.shape[1:])
    rows = []
    for r in rounds:
        t0 = time.perf_counter()
        res = tpa.prune(model, None, x, calib=calib, macs=target, options=tpa.TPOptions(round_to=r) if r > 1 else None)
        reestimate_bn(res.model, bn, 4)
        rows.append((res.model, {"model": name, "target": target, "round_to": r, "macs_kept": round(res.report.macs_ratio, 3),
                                 "one_shot_2000": evaluate(res.model, test).accuracy, "prune_s": round(time.perf_counter() - t0)}))
    for layout, cl in (("nchw", False), ("channels_last", True)):
        dense, *pruned = batch_latencies([model, *(m for m, _ in rows)], 64, shape, 21, channels_last=cl)
        for (_, row), t in zip(rows, pruned, strict=True):
            row[f"of_macs_ratio_{layout}"] = round(dense / t * row["macs_kept"], 3)
    for _, row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--round-to"]:
        round_to(sys.argv[2], float(sys.argv[3]), [int(r) for r in sys.argv[4].split(",")])
    else:
        main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["vit", "resnet18", "swin"])
