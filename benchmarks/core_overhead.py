"""Cost of Mix-and-Match planning on timm swin_tiny_patch4_window7_224 (28M parameters, random init).

Prints, for 4 calibration batches of 8 images at 224 px:
  * the time of one forward+backward pass over those batches (the reference),
  * the time of signals (magnitude, gradient, product) + the 30 rule strategies (`mm.plan`),
    and their ratio (target <= 1.5),
  * strategy generation alone (target < 2 s), and budget-matched generation,
  * signals + the whole budget-matched pool (30 rule strategies and the score family) at 70 %
    (target <= 1.5),
  * the cost of empirical ranges (global magnitude, SNIP, GraSP at 0.7/0.8/0.9), separately
    (target <= 2.5),
  * peak resident memory of each step, each measured in a fresh process.

    python benchmarks/core_overhead.py [--model timm:NAME] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _setup(model_spec: str, batches: int, batch: int, size: int):
    import torch

    from mixmatch_plugin.models import build_model

    torch.manual_seed(0)
    model = build_model(model_spec, model_kwargs={"num_classes": 100})
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 100, (batch,), generator=g)) for _ in range(batches)]
    return model, calib


def measure(step: str, model_spec: str, batches: int, batch: int, size: int) -> dict:
    import torch

    import mixmatch_plugin as mm

    torch.set_num_threads(2)
    model, calib = _setup(model_spec, batches, batch, size)
    model.eval()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    extra: dict = {}
    if step == "fwd_bwd":
        for x, y in calib:
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
    elif step == "plan":
        p = mm.plan(model, calib)
        extra["strategies"] = len(p.strategies)
    elif step == "strategies":
        p = mm.plan(model, calib)
        space = p.space()
        t = time.perf_counter()
        n = len(space.rule_strategies(mm.DEFAULT_SIGNALS, p.signals))
        extra["strategies"] = n
        t_native = time.perf_counter() - t
        budget = mm.StrategySpace(p.layers, p.ranges, p.bounds, target=0.5, on_unreachable="extend")
        t2 = time.perf_counter()
        budget.rule_strategies(mm.DEFAULT_SIGNALS, p.signals)
        extra["budget_seconds"] = time.perf_counter() - t2
        t = time.perf_counter() - t_native  # report native generation time below
    elif step == "pool":
        p = mm.plan(model, calib, target=0.7, on_unreachable="extend")
        extra["strategies"] = len(p.strategies)
    elif step == "empirical":
        p = mm.plan(model, calib, options=mm.PlanOptions(ranges="empirical"))
        extra["strategies"] = len(p.strategies)
    seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step": step, "seconds": seconds, "peak_rss_mb": rss / 1024, "rss_before_mb": rss0 / 1024, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="timm:swin_tiny_patch4_window7_224")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.step:
        print(json.dumps(measure(a.step, a.model, a.batches, a.batch_size, a.size)))
        return

    def run(step: str) -> list[dict]:
        out = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--step", step, "--model", a.model, "--batches", str(a.batches),
                   "--batch-size", str(a.batch_size), "--size", str(a.size)]
            out.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
        return out

    res = {s: run(s) for s in ("fwd_bwd", "plan", "pool", "strategies", "empirical")}
    med = {s: statistics.median(r["seconds"] for r in rs) for s, rs in res.items()}
    peak = {s: max(r["peak_rss_mb"] for r in rs) for s, rs in res.items()}
    print(f"model {a.model}, {a.batches} calibration batches of {a.batch_size} at {a.size} px, median of {a.repeats} runs, 2 threads")
    print(f"  forward+backward over the calibration data : {med['fwd_bwd']:.2f} s   (peak RSS {peak['fwd_bwd']:.0f} MB)")
    print(f"  signals + 30 strategies (mm.plan)          : {med['plan']:.2f} s   (peak RSS {peak['plan']:.0f} MB)")
    print(f"  overhead ratio                             : {med['plan'] / med['fwd_bwd']:.2f}   (target <= 1.5)")
    print(f"  signals + pool at 70 % ({res['pool'][0]['strategies']} strategies)     : {med['pool']:.2f} s   (peak RSS {peak['pool']:.0f} MB), "
          f"{med['pool'] / med['fwd_bwd']:.2f}x forward+backward (target <= 1.5)")
    print(f"  strategy generation alone, native (30)     : {med['strategies']:.3f} s   (target < 2 s)")
    print(f"  strategy generation, budget-matched (30)   : {statistics.median(r['budget_seconds'] for r in res['strategies']):.3f} s")
    print(f"  plan with empirical ranges (9 runs + GraSP): {med['empirical']:.2f} s   (peak RSS {peak['empirical']:.0f} MB), "
          f"{med['empirical'] / med['fwd_bwd']:.2f}x forward+backward (target <= 2.5)")
    if a.json:
        from mixmatch_plugin.io import atomic_write_json

        atomic_write_json(a.json, {"args": vars(a), "runs": res, "median_seconds": med, "peak_rss_mb": peak})


if __name__ == "__main__":
    main()
