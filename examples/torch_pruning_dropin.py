"""Mix-and-Match as a drop-in for a Torch-Pruning ``MetaPruner`` call: the same MACs, allocated by measured curves.

Before: your ``MetaPruner`` call (here global magnitude pruning at ratio 0.5). After: the same keyword arguments
go through ``from_metapruner``, which runs your call once on a copy to learn its MACs and returns keywords that
reach the same MACs with a Mix-and-Match allocation. The change is two lines (marked ``# <-``).

    python examples/torch_pruning_dropin.py            # a few epochs on scikit-learn's digits
    python examples/torch_pruning_dropin.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch_pruning as tp

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import torch_pruning as mm_tp
from mixmatch_plugin.app.data import digits
from mixmatch_plugin.evaluation import reestimate_bn
from mixmatch_plugin.models import tiny_resnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = digits(seed=0)
    train_loader, val_loader, _ = data.loaders(batch_size=64, seed=0)
    calib = data.calibration(samples=128 if args.quick else 512, batch_size=64, seed=0)
    model = tiny_resnet(num_classes=10, in_chans=1, width=16)
    mm.finetune(model, {}, train_loader, epochs=1 if args.quick else 6, lr=3e-3)
    model.eval()
    x = next(iter(calib))[0][:2]
    dense = mm_tp.count_macs(model, x)[0]
    print(f"dense accuracy: {mm.evaluate(model, val_loader).accuracy:.4f}")

    for name in ("Torch-Pruning", "Mix-and-Match"):
        m = copy.deepcopy(model)
        imp = tp.importance.GroupMagnitudeImportance(p=2)
        kw = dict(importance=imp, pruning_ratio=0.5, global_pruning=True, ignored_layers=[m.fc])
        if name == "Mix-and-Match":
            kw = mm_tp.from_metapruner(m, x, calib=calib, **kw)  # <- the drop-in
        pruner = tp.pruner.MetaPruner(m, x, **kw)  # <- was: tp.pruner.MetaPruner(m, x, importance=imp, ...)
        pruner.step()
        reestimate_bn(m, train_loader, 10)  # BatchNorm statistics of the pruned model, from training batches
        print(f"{name}: MACs kept {mm_tp.count_macs(m, x)[0] / dense:.3f}, one-shot accuracy (BatchNorm re-estimated) "
              f"{mm.evaluate(m, val_loader).accuracy:.4f}")


if __name__ == "__main__":
    main()
