"""``mixmatch prune-dw``: depth-and-width pruning chosen by CKA, checkpointed every iteration (resumable)."""

from __future__ import annotations

from pathlib import Path

import click

from mixmatch_plugin.app.cli.common import load_data, model_options
from mixmatch_plugin.errors import MixMatchError


@click.command("prune-dw")
@model_options
@click.option("--data", "dataset", type=click.Choice(["digits", "fashion-mnist", "random"]), default="digits",
              show_default=True, help="Dataset: calibration from its training split, CKA and accuracy on validation.")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder with Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist).")
@click.option("--target", type=float, required=True, help="Fraction of the original MACs to remove, in (0, 1).")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint written atomically after every iteration; a rerun with the same arguments resumes it.")
@click.option("--restart", is_flag=True, help="Ignore and overwrite an existing --out checkpoint.")
@click.option("--mode", type=click.Choice(["cka", "depth", "width"]), default="cka", show_default=True,
              help="cka: both candidates, the higher CKA to the parent wins; depth/width: one kind only.")
@click.option("--min-blocks", type=click.IntRange(0), default=None,
              help="Blocks kept per stage (default: 2 for ResNets, as in the paper; 1 for ConvNeXt/ViT/Swin).")
@click.option("--block-score", type=click.Choice(["kl", "cka"]), default="kl", show_default=True,
              help="How blocks are scored for removal (KL of the outputs, as in the paper, or 1 - CKA).")
@click.option("--allocation", type=click.Choice(["mm", "uniform"]), default="mm", show_default=True,
              help="Width candidate: a Mix-and-Match strategy, or one uniform ratio (baseline).")
@click.option("--strategy", "strategies", default="magnitude:midpoint", show_default=True, metavar="SIG:SHAPE[,...]",
              help="Mix-and-Match strategies for the width candidate; with several, the highest CKA wins.")
@click.option("--finetune-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Brief fine-tuning of each candidate before the choice (0: none).")
@click.option("--lr", type=float, default=3e-4, show_default=True, help="Fine-tuning learning rate (Adam).")
@click.option("--calib-samples", type=click.IntRange(4), default=512, show_default=True,
              help="Training images for block scores and signals.")
@click.option("--val-samples", type=click.IntRange(4), default=None, help="Validation images for CKA and accuracy (default: all).")
@click.option("--batch-size", type=click.IntRange(4), default=64, show_default=True)
@click.option("--cka-batch-size", type=click.IntRange(4), default=256, show_default=True,
              help="Minibatch size of the (debiased) minibatch CKA on validation.")
@click.option("--macs-tolerance", type=float, default=0.02, show_default=True,
              help="Relative MACs mismatch at which the width bisection stops.")
@click.option("--bisect-steps", type=click.IntRange(1), default=14, show_default=True)
@click.option("--max-iterations", type=click.IntRange(0), default=None, help="Stop after this many iterations in total.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of splits, calibration draw and fine-tuning.")
def command(model_spec: str, model_kwargs: dict, checkpoint: str | None, input_shape: tuple[int, int, int] | None,
            dataset: str, data_dir: str | None, target: float, out: str, restart: bool, mode: str, min_blocks: int | None,
            block_score: str, allocation: str, strategies: str, finetune_steps: int, lr: float, calib_samples: int,
            val_samples: int | None, batch_size: int, cka_batch_size: int, macs_tolerance: float, bisect_steps: int,
            max_iterations: int | None, seed: int) -> None:
    """Prune blocks and channels together: each step keeps the candidate closest to its parent by CKA.

    Each iteration removes the least damaging block (depth candidate) and, separately, the same MACs of
    channels with a Mix-and-Match allocation through Torch-Pruning (width candidate); optionally
    fine-tunes both; keeps the one with the higher CKA to the parent on the validation split; writes
    --out. Rerun the same command after an interruption to continue.

    \b
    Example:
      mixmatch prune-dw --model timm:resnet18 --model-kwargs '{"in_chans": 1, "num_classes": 10}' \\
          --checkpoint dense.pt --data fashion-mnist --target 0.5 --min-blocks 1 --finetune-steps 50 --out dw.pt
    Load the result with:
      from mixmatch_plugin.adapters.depth_width import load_depth_width; model, state = load_depth_width("dw.pt")
    """
    import torch

    from mixmatch_plugin.adapters.depth_width import DepthWidthConfig, parse_strategy, prune_depth_width
    from mixmatch_plugin.app.data import loader, subset
    from mixmatch_plugin.models import build_model

    if not (names := tuple(s.strip() for s in strategies.split(",") if s.strip())):
        raise MixMatchError("--strategy needs at least one signal:shape, e.g. magnitude:midpoint")
    for s in names:
        parse_strategy(s)
    config = DepthWidthConfig(
        target=target, mode=mode, min_blocks=min_blocks, block_score=block_score, allocation=allocation,
        strategies=tuple(names), finetune_steps=finetune_steps, finetune_lr=lr, macs_tolerance=macs_tolerance,
        bisect_steps=bisect_steps, max_iterations=max_iterations, seed=seed,
    )
    config.validate()
    kwargs = model_kwargs
    torch.manual_seed(seed)  # random init (no --checkpoint) must be the same on every rerun, or it cannot resume
    model = build_model(model_spec, model_kwargs=kwargs, checkpoint=checkpoint).eval()
    splits = load_data(dataset, data_dir, input_shape, seed, num_classes=int(kwargs.get("num_classes", 10)))
    calib = splits.calibration(calib_samples, batch_size, seed)
    val = splits.val if val_samples is None else subset(splits.val, val_samples, seed)
    val_loader = loader(val, cka_batch_size)
    train_loader = loader(splits.train, batch_size, shuffle=True, seed=seed)
    example = next(iter(calib))[0][:2]
    ckpt = None if checkpoint is None else {"path": str(Path(checkpoint).resolve()), "bytes": Path(checkpoint).stat().st_size}
    meta = {
        "model": {"model": model_spec, "model_kwargs": kwargs, "checkpoint": ckpt},
        "data": {"dataset": dataset, "input_shape": list(splits.input_shape), "seed": seed, "calib_samples": calib_samples,
                 "val_samples": val_samples, "batch_size": batch_size, "cka_batch_size": cka_batch_size},
    }

    def report(_model: object, e: dict) -> None:
        d, w = e.get("depth") or {}, e.get("width") or {}
        parts = [f"iteration {e['iteration']}: kept {e['choice']}"]
        if d.get("block"):
            parts.append(f"depth {d['block']} (CKA {d['cka']:.4f})" if "cka" in d else f"depth {d['block']}")
        if w:
            parts.append(f"width {w['strategy']} t={w['sparsity']:.3f} mismatch {w['mismatch']:+.1%}"
                         + (f" (CKA {w['cka']:.4f})" if "cka" in w else ""))
        parts.append(f"MACs removed {e['macs_reduction']:.1%}, val acc {e['val_accuracy']:.4f}")
        click.echo("; ".join(parts))

    result = prune_depth_width(model, example, calib, val_loader, config=config, train_loader=train_loader,
                               state_path=out, restart=restart, meta=meta, on_iteration=report)
    if result.resumed_from:
        click.echo(f"resumed {out} after iteration {result.resumed_from}")
    click.echo(result.summary())
    click.echo(f"dense val acc {result.start['val_accuracy']:.4f}; wrote {out}")
