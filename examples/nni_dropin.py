"""Mix-and-Match as a drop-in for a uniform NNI config_list.

Before: every conv is pruned at the same ratio. After: ``from_uniform`` keeps the same layers and the
same overall sparsity, but spreads it per layer by Mix-and-Match. Both go through NNI 3.0's own
pruners; the channel variant is then sped up with NNI's ``ModelSpeedup`` (through the opt-in
compatibility layer for torch >= 2.2).

    python examples/nni_dropin.py            # a few epochs on scikit-learn's digits
    python examples/nni_dropin.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import torch
from torch import nn

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import nni as mm_nni
from mixmatch_plugin.app.data import digits
from mixmatch_plugin.models import tiny_resnet


def nni_level_prune(model: nn.Module, config_list: list[dict]) -> nn.Module:
    """Plain NNI: LevelPruner, then multiply the masks in (unwrap_model() would restore dense weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression.pruning import LevelPruner
    work = copy.deepcopy(model)
    pruner = LevelPruner(work, config_list)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    with torch.no_grad():
        for name, m in masks.items():
            weight = work.get_submodule(name).weight
            assert isinstance(weight, torch.Tensor)  # Conv/Linear weights (NNI only masks those here)
            weight.mul_(m["weight"])
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--sparsity", type=float, default=0.7)
    args = ap.parse_args()
    logging.getLogger("nni").setLevel(logging.ERROR)
    torch.manual_seed(0)

    data = digits(seed=0)
    train_loader, val_loader, _ = data.loaders(batch_size=64, seed=0)
    calib = data.calibration(samples=128 if args.quick else 256, batch_size=64, seed=0)
    model = tiny_resnet(num_classes=10, in_chans=1, width=8)
    mm.finetune(model, {}, train_loader, epochs=1 if args.quick else 6, lr=3e-3)  # dense training: no masks
    model.eval()
    print(f"dense accuracy: {mm.evaluate(model, val_loader).accuracy:.4f}")

    # ---- before: a uniform config_list
    uniform = [{"op_types": ["Conv2d", "Linear"], "exclude_op_names": ["fc"], "sparse_ratio": args.sparsity}]
    before = nni_level_prune(model, uniform)
    print(f"uniform {args.sparsity:.0%}:        accuracy {mm.evaluate(before, val_loader).accuracy:.4f}")

    # ---- after: one changed line, same layers, same overall sparsity
    config_list = mm_nni.from_uniform(uniform, model, calib=calib, strategy="product:sensitivity")
    after = nni_level_prune(model, config_list)
    print(f"Mix-and-Match {args.sparsity:.0%}:  accuracy {mm.evaluate(after, val_loader).accuracy:.4f}"
          f"  ({len(config_list)} per-layer entries, e.g. {config_list[0]})")

    # ---- channel pruning per dependency group, then NNI's speed-up on torch >= 2.2
    x = next(iter(val_loader))[0][:2]
    p = mm.plan(model, calib, target=0.3, on_unreachable="extend")
    res = mm_nni.prune(model, p.strategy("magnitude:midpoint"), "l1", example_inputs=x)
    small = mm_nni.speedup(res.model, res.masks, x)
    n0 = sum(q.numel() for q in model.parameters())
    n1 = sum(q.numel() for q in small.parameters())
    print(f"L1 channels + speed-up: params {n0:,} -> {n1:,}; accuracy {mm.evaluate(small, val_loader).accuracy:.4f}")


if __name__ == "__main__":
    main()
