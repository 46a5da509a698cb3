"""Batch-64 CPU speed-up against the MACs ratio at 30 % of MACs kept (seed 0, one thread), for issue 28.

Methods: Torch-Pruning global pruning, Mix-and-Match (``macs=0.3``), and Mix-and-Match with channel counts
rounded to multiples of 8 (``TPOptions(round_to=8)``). One-shot accuracy on 2,000 test images after
BatchNorm re-estimation. Prints one JSON line per model and method; run it on an idle machine.

    python -m benchmarks.structured_speedup vit,resnet18,swin
"""

from __future__ import annotations

import json
import sys
import time

import torch

from benchmarks.structured_macs import at_macs, latency, load
from mixmatch_plugin.adapters import torch_pruning as tpa
from mixmatch_plugin.app import data
from mixmatch_plugin.evaluation import evaluate, reestimate_bn


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    splits = data.fashion_mnist(seed=0)
    test = data.loader(data.subset(splits.test, 2000, 0), 500)
    x = splits.train.tensors[0][:2].clone()
    shape = tuple(x.shape[1:])
    for name in models:
        model, _ = load(name, splits)
        calib = [tuple(b) for b in splits.calibration(512, 128, 0)]
        bn = splits.held_batches(4, seed=0)
        dense64 = latency(model, 64, shape, 15)
        for method in ("tp_global", "mix-and-match", "mix-and-match r8"):
            t0 = time.perf_counter()
            if method.startswith("mix"):
                res = tpa.prune(model, None, x, calib=calib, macs=0.3, options=tpa.TPOptions(round_to=8) if "r8" in method else None)
                pm, got = res.model, res.report.macs_ratio
            else:
                pm, got = at_macs(model, x, method, 0.3, calib)
            reestimate_bn(pm, bn, 4)
            speedup = dense64 / latency(pm, 64, shape, 15)
            print(json.dumps({"model": name, "method": method, "macs_kept": round(got, 3), "one_shot_2000": evaluate(pm, test).accuracy,
                              "speedup_b64": round(speedup, 2), "of_macs_ratio": round(speedup * got, 2),
                              "dense_b64_ms": round(1000 * dense64, 1), "prune_s": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["vit", "resnet18", "swin"])
