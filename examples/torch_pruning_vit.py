"""Structured Mix-and-Match pruning of a ViT with Torch-Pruning.

Trains a small timm ViT on scikit-learn's digits, builds the plan, prunes it physically by one
strategy (one ratio per dependency group: embedding width, each block's head_dim and MLP width),
checks that the pruned model equals the original with the same channels zeroed, and fine-tunes.

    python examples/torch_pruning_vit.py            # about a minute
    python examples/torch_pruning_vit.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse

import torch

import mixmatch_plugin as mm
from mixmatch_plugin.adapters import torch_pruning as mm_tp
from mixmatch_plugin.app.data import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    ap.add_argument("--strategy", default="product:alpha-0.7")
    ap.add_argument("--target", type=float, default=0.4, help="global sparsity the plan's strategies match")
    args = ap.parse_args()
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    data = digits(seed=0)
    train_loader, val_loader, _ = data.loaders(batch_size=64, seed=0)
    calib = data.calibration(samples=128, batch_size=64, seed=0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=48 if args.quick else 96,
                              depth=2 if args.quick else 4, num_heads=3, init_values=0.1)
    mm.finetune(model, {}, train_loader, epochs=2 if args.quick else 15, lr=1e-3, options=mm.FinetuneOptions(optimizer="adamw"))  # dense: no masks
    model.eval()
    print(f"dense accuracy: {mm.evaluate(model, val_loader).accuracy:.4f}")

    plan = mm.plan(model, calib, target=args.target, on_unreachable="extend", options=mm.PlanOptions(disable_constraints=("small_layers",)))
    strategy = plan.strategy(args.strategy)
    example = next(iter(calib))[0][:4]
    result = mm_tp.prune(model, strategy, example, calib=calib, options=mm_tp.TPOptions(round_to=None))
    print(result.report.summary())

    pruned = result.model
    print(f"pruned accuracy (no fine-tuning): {mm.evaluate(pruned, val_loader).accuracy:.4f}")
    blk = pruned.blocks[0].attn
    print(f"block 0 attention: {blk.num_heads} heads x head_dim {blk.head_dim} (attn_dim {blk.attn_dim})")
    mm.finetune(pruned, {}, train_loader, epochs=1 if args.quick else 5, lr=5e-4, options=mm.FinetuneOptions(optimizer="adamw"))
    print(f"pruned accuracy after fine-tuning: {mm.evaluate(pruned, val_loader).accuracy:.4f}")

    # the same ratios, for your own Torch-Pruning pipeline
    ratios = mm_tp.pruning_ratio_dict(model, strategy, example)
    print(f"pruning_ratio_dict: {len(ratios)} groups, e.g. {next(iter(ratios.values())):.3f}")


if __name__ == "__main__":
    main()
