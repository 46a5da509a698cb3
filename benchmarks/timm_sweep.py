"""Which timm families each path of the plugin carries: a sweep over architectures outside the benchmark.

Each model is built with random weights (only whether it runs, meets the budget and keeps the user's model
unchanged is measured) and goes through three paths, each in its own subprocess with a time limit:

- unstructured: ``mm.plan(target=0.8)``, ``mm.choose`` on two random batches, ``plan.apply``;
- Torch-Pruning: ``mm_tp.prune(macs=0.5)`` (verified against the channel-zeroed original);
- NNI: ``from_uniform`` of a uniform ``LevelPruner`` config at 0.7.

    python -m benchmarks.timm_sweep                          # every model below, appended to the JSONL
    python -m benchmarks.timm_sweep --models convnext_atto,deit_tiny_patch16_224
    python -m benchmarks.timm_sweep --table                  # the markdown table of the JSONL

Rows already in the JSONL are skipped, so an interrupted sweep resumes. This prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: name, input size, extra timm kwargs
MODELS: list[tuple[str, int, dict[str, Any]]] = [
    ("convnext_atto", 32, {}), ("efficientnet_b0", 32, {}), ("mobilenetv2_050", 32, {}), ("densenet121", 32, {}),
    ("regnety_002", 32, {}), ("resnext26ts", 32, {}), ("ghostnet_050", 32, {}), ("lcnet_050", 32, {}),
    ("mnasnet_050", 32, {}), ("dla34", 32, {}), ("res2net50_14w_8s", 32, {}), ("nf_resnet26", 32, {}),
    ("poolformer_s12", 32, {}), ("edgenext_xx_small", 64, {}), ("mobilevit_xxs", 64, {}), ("efficientvit_m0", 64, {}),
    ("fastvit_t8", 64, {}), ("repvit_m0_9", 64, {}), ("inception_next_tiny", 64, {}), ("mixer_s16_224", 64, {"img_size": 64}),
    ("resmlp_12_224", 64, {"img_size": 64}), ("gmlp_ti16_224", 64, {"img_size": 64}), ("convit_tiny", 64, {"img_size": 64}),
    ("pit_ti_224", 64, {"img_size": 64}), ("xcit_nano_12_p16_224", 64, {"img_size": 64}),
    ("eva02_tiny_patch14_224", 56, {"img_size": 56}), ("deit_tiny_patch16_224", 64, {"img_size": 64}),
    ("levit_128s", 224, {}), ("tiny_vit_5m_224", 224, {}), ("efficientformer_l1", 224, {}), ("pvt_v2_b0", 64, {}),
    ("davit_tiny", 64, {}), ("focalnet_tiny_srf", 64, {}), ("twins_pcpvt_small", 64, {}), ("visformer_tiny", 224, {}),
    ("volo_d1_224", 64, {"img_size": 64}), ("mvitv2_tiny", 224, {}),
]
PATHS = ("unstructured", "torch_pruning", "nni")


def run_path(name: str, size: int, kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    """One path on one model, in this process (the subprocess's side)."""
    import timm
    import torch

    import mixmatch_plugin as mm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    batches = [(torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if path == "unstructured":
        p = mm.plan(model, batches, target=0.8, on_unreachable="extend")
        chosen = mm.choose(model, p.strategies, batches[:1], batches, signals=p.signals).strategy
        res = p.apply(model, chosen)
        kept = sum(int(m.sum()) for m in res.masks.values()) / sum(m.numel() for m in res.masks.values())
        what = f"{len(p.strategies)} strategies; {chosen.name}; {1 - kept:.1%} of the masked weights pruned"
    elif path == "torch_pruning":
        from mixmatch_plugin.adapters import torch_pruning as mm_tp

        res = mm_tp.prune(model, None, batches[0][0][:4], calib=batches, macs=0.5)
        what = f"{res.report.macs_ratio:.1%} of MACs kept"
    else:
        from mixmatch_plugin.adapters.nni import from_uniform

        what = f"{len(from_uniform([{'op_types': ['Conv2d', 'Linear'], 'sparse_ratio': 0.7}], model, calib=batches))} entries"
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return {"ok": True, "what": what + ("" if unchanged else "; THE MODEL WAS CHANGED")}


def sweep(models: list[tuple[str, int, dict[str, Any]]], out: Path, limit: int) -> None:
    done = {(r["model"], r["path"]) for r in read(out)}
    for i, (name, size, kwargs) in enumerate(models):
        for path in PATHS:
            if (name, path) in done:
                continue
            t = time.perf_counter()
            row: dict[str, Any]
            cmd = [sys.executable, "-m", "benchmarks.timm_sweep", "--one", json.dumps([name, size, kwargs, path])]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
                last = (proc.stdout.strip().splitlines() or ["{}"])[-1]
                row = json.loads(last) if proc.returncode == 0 else {"ok": False, "what": _last_error(proc.stderr)}
            except subprocess.TimeoutExpired:
                row = {"ok": False, "what": f"over {limit} s"}
            row = {"model": name, "path": path, "seconds": round(time.perf_counter() - t, 1), **row}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i + 1}/{len(models)}] {name} {path}: {'ok' if row['ok'] else 'FAIL'} {row['what'][:150]}", flush=True)


def _last_error(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return next((x for x in reversed(lines) if "Error" in x.split(":")[0]), lines[-1] if lines else "no output")


def read(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []


def cell(r: dict[str, Any] | None) -> str:
    if r is None or r["ok"]:
        return "–" if r is None else "ok"
    why = r["what"].removeprefix("mixmatch_plugin.errors.MixMatchError: ").removeprefix("a trial before the budget's allocation failed: ")
    return f"refused in {r['seconds']:.0f} s: {why.split(';')[0][:110].replace('|', '/')}"


def table(rows: list[dict[str, Any]]) -> str:
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["model"], {})[r["path"]] = r
    lines = ["| model | unstructured | Torch-Pruning, 50 % of MACs | NNI `from_uniform` |", "|---|---|---|---|"]
    for name, paths in by.items():
        cells = [cell(paths.get(p)) for p in PATHS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated names from the list (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/timm_sweep.jsonl"))
    ap.add_argument("--limit", type=int, default=600, help="seconds per model and path")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_path(*json.loads(args.one))))
        return
    if args.table:
        print(table(read(args.out)))
        return
    wanted = set(args.models.split(",")) if args.models else None
    sweep([m for m in MODELS if wanted is None or m[0] in wanted], args.out, args.limit)


if __name__ == "__main__":
    main()
