"""CPU latency of structurally pruned timm models (Torch-Pruning adapter), next to the MACs-implied limit.

For each model, the plan's target sparsity is bisected until the pruned model has about
``--macs`` of the dense MACs; then dense and pruned latency are measured (batch 8 at 224 px by
default, median of ``--repeats`` timed runs after warm-up). The speed-up is reported next to the MACs
ratio, which is the physical limit, and the time to build the dependency groups and to prune.

    python benchmarks/tp_latency.py                       # resnet18 and vit_tiny_patch16_224
    python benchmarks/tp_latency.py --threads 2 --repeats 15
    python benchmarks/tp_latency.py --quick               # 64 px, few repeats (smoke run)

This is a benchmark, not a test: it prints figures. Results depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import torch_pruning as mm_tp


def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def prune_to_macs(model: torch.nn.Module, example: torch.Tensor, want: float, strategy: str, round_to: int | None,
                  steps: int = 7) -> tuple[mm_tp.TPResult, float]:
    """Bisect the plan's target sparsity until the pruned MACs are about ``want`` of the dense MACs."""
    lo, hi = 0.05, 0.9
    best: tuple[mm_tp.TPResult, float] | None = None
    for _ in range(steps):
        target = (lo + hi) / 2
        plan = mm.plan(model, signals=("magnitude",), target=target, on_unreachable="extend")
        res = mm_tp.prune(model, plan.strategy(strategy), example, options=mm_tp.TPOptions(round_to=round_to, verify=False))
        ratio = res.report.macs_ratio
        if best is None or abs(ratio - want) < abs(best[0].report.macs_ratio - want):
            best = (res, target)
        if abs(ratio - want) < 0.02:
            break
        lo, hi = (target, hi) if ratio > want else (lo, target)
    assert best is not None
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--macs", type=float, default=0.5, help="MACs of the pruned model, as a fraction of the dense one")
    ap.add_argument("--strategy", default="magnitude:midpoint")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="64 px and 3 repeats, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeats = 64, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import timm

    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch} at {args.size} px, "
          f"median of {args.repeats} runs, strategy {args.strategy}, round_to {args.round_to}")
    rows = []
    for name in args.models.split(","):
        kw = {"img_size": args.size} if "vit" in name or "deit" in name else {}
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kw).eval()
        example = torch.randn(1, 3, args.size, args.size)
        x = torch.randn(args.batch, 3, args.size, args.size)
        t0 = time.perf_counter()
        res, target = prune_to_macs(model, example, args.macs, args.strategy, args.round_to)
        search = time.perf_counter() - t0
        t_groups, t_prune = res.report.seconds_groups, res.report.seconds_prune
        # one more run with verification, to report the consistency of the benchmarked model
        plan = mm.plan(model, signals=("magnitude",), target=target, on_unreachable="extend")
        checked = mm_tp.prune(model, plan.strategy(args.strategy), example, options=mm_tp.TPOptions(round_to=args.round_to))
        dense_ms = latency(model, x, args.repeats)
        pruned_ms = latency(res.model, x, args.repeats)
        r = res.report
        implied = 1.0 / r.macs_ratio
        speedup = dense_ms / pruned_ms
        rows.append((name, r.macs_ratio, r.params_ratio, dense_ms, pruned_ms, speedup, implied, speedup / implied,
                     t_groups, t_prune, search, checked.report.consistency))
        print(f"\n{name}: target sparsity {target:.3f} -> MACs {r.macs_before / 1e9:.3f} G -> {r.macs_after / 1e9:.3f} G "
              f"({r.macs_ratio:.1%}), params {r.params_before / 1e6:.2f} M -> {r.params_after / 1e6:.2f} M")
        print(f"  latency dense {dense_ms:.1f} ms, pruned {pruned_ms:.1f} ms: speed-up {speedup:.2f}x; "
              f"MACs-implied {implied:.2f}x; achieved {speedup / implied:.0%} of the MACs limit")
        print(f"  build groups {t_groups:.2f} s, prune {t_prune:.2f} s (search over targets {search:.1f} s); "
              f"consistency {checked.report.consistency:.1e}")

    print("\nmodel                      MACs   params  dense ms  pruned ms  speed-up  MACs limit  of limit  groups s  prune s")
    for name, mr, pr, d, p, s, lim, eff, tg, tpr, _, _ in rows:
        print(f"{name:<25} {mr:6.1%} {pr:7.1%} {d:9.1f} {p:10.1f} {s:8.2f}x {lim:10.2f}x {eff:8.0%} {tg:9.2f} {tpr:8.2f}")


if __name__ == "__main__":
    main()
