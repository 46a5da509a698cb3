"""Depth-and-width pruning chosen by CKA, with Mix-and-Match channel allocation (Torch-Pruning).

Trains a small ResNet (the resnet18 layout: two BasicBlocks per stage) on scikit-learn's digits, then
prunes it to a MACs target. Each iteration builds a depth candidate (the block whose removal changes
the outputs least, by KL divergence) and a width candidate (a Mix-and-Match strategy, structurally
pruned through Torch-Pruning, removing the same MACs), fine-tunes both briefly, and keeps the one
whose features are closer to the parent's by CKA on the validation split. The loop's checkpoint is
rebuilt at the end; rerunning with the same --out resumes it.

    python examples/depth_width.py            # about a minute
    python examples/depth_width.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import timm
import torch

import mixmatch_plugin as mm
from mixmatch_plugin.adapters.depth_width import DepthWidthConfig, load_depth_width, prune_depth_width
from mixmatch_plugin.app.data import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--target", type=float, default=None, help="fraction of MACs to remove (default 0.5; 0.3 with --quick)")
    ap.add_argument("--out", default=None, help="checkpoint path (default: a temporary folder)")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = digits(seed=0)
    train_loader, val_loader, test_loader = data.loaders(batch_size=64, seed=0)
    calib = data.calibration(samples=256, batch_size=64, seed=0)  # training split only
    width = 8 if args.quick else 16
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, stem_type="deep", stem_width=width // 2,
                              channels=(width, 2 * width, 4 * width, 8 * width))
    mm.finetune(model, {}, train_loader, epochs=2 if args.quick else 6, lr=3e-3)  # dense training: no masks
    model.eval()
    print(f"dense: val {mm.evaluate(model, val_loader).accuracy:.4f}, test {mm.evaluate(model, test_loader).accuracy:.4f}")

    config = DepthWidthConfig(
        target=args.target or (0.3 if args.quick else 0.5),
        min_blocks=1,                      # resnet18 has 2 blocks per stage; the paper's 2 would leave nothing
        finetune_steps=3 if args.quick else 30,
        strategies=("magnitude:midpoint",),
        bisect_steps=8 if args.quick else 14,
        macs_tolerance=0.05 if args.quick else 0.02,
    )
    folder = Path(args.out).parent if args.out else Path(tempfile.mkdtemp(prefix="mixmatch-dw-"))
    state = Path(args.out) if args.out else folder / "depth_width.pt"
    example = next(iter(calib))[0][:4]
    result = prune_depth_width(model, example, calib, val_loader, config=config, train_loader=train_loader,
                               state_path=state, on_iteration=lambda _model, e: print(
                                   f"iteration {e['iteration']}: kept {e['choice']} ({e['reason']}), "
                                   f"MACs removed {e['macs_reduction']:.1%}"))
    print(result.summary())

    pruned = result.model
    snapshot = copy.deepcopy(pruned)  # the loop's result, as checkpointed
    mm.finetune(pruned, {}, train_loader, epochs=1 if args.quick else 3, lr=5e-4)  # the same final fine-tune for any method
    print(f"pruned after fine-tuning: val {mm.evaluate(pruned, val_loader).accuracy:.4f}, "
          f"test {mm.evaluate(pruned, test_loader).accuracy:.4f} (test is reported, never used to choose)")

    rebuilt, saved = load_depth_width(state, model)  # architecture from the ops, weights from the state dict
    same = torch.allclose(rebuilt(example), snapshot(example), atol=1e-5)
    print(f"checkpoint {state}: {len(saved['ops'])} ops ({', '.join(op['kind'] for op in saved['ops'])}), "
          f"rebuilt model has {sum(p.numel() for p in rebuilt.parameters()):,} parameters; rebuilt ok: {same}")


if __name__ == "__main__":
    main()
