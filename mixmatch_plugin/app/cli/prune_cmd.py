"""``mixmatch prune``: prune a model by one strategy of a plan, with plain PyTorch, NNI or Torch-Pruning."""

from __future__ import annotations

from typing import Any

import click

from mixmatch_plugin.app.cli.common import JsonObject, Shape, data_options, from_plan, load_data, table
from mixmatch_plugin.errors import MixMatchError

NNI_PRUNERS = ("level", "l1", "l2", "fpgm", "taylor")


@click.command("prune")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="A plan written by `mixmatch plan`.")
@click.option("--strategy", "strategy_name", required=True, metavar="NAME",
              help="A strategy of the plan, e.g. magnitude:alpha-0.7, or best: the one whose masked model scores highest on "
                   "the validation split of the --calib dataset (BatchNorm re-estimated on training batches).")
@click.option("--backend", type=click.Choice(["torch", "nni", "tp"]), default="torch", show_default=True,
              help="torch: unstructured masks (plain PyTorch); nni: NNI's pruner; tp: structured, Torch-Pruning.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Where to write the pruned model (atomically).")
@click.option("--model", "model_spec", default=None, metavar="SPEC", help="Model spec; default: the one recorded in the plan.")
@click.option("--model-kwargs", type=JsonObject(), default=None, help="Factory kwargs; default: the plan's.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Trained weights (a state dict).")
@click.option("--input-shape", type=Shape(), default=None, help="Input shape of one sample; default: the plan's.")
@click.option("--nni-pruner", type=click.Choice(NNI_PRUNERS), default="level", show_default=True,
              help="NNI pruner for --backend nni (level is unstructured; the others prune channels per group).")
@click.option("--fold", type=click.Choice(["mean", "min", "max"]), default="mean", show_default=True,
              help="tp/nni channel pruning: how a dependency group's layer targets become one ratio.")
@click.option("--round-to", type=click.IntRange(1), default=None, help="tp: keep channel counts at multiples of this.")
@click.option("--prune-heads", is_flag=True, help="tp: remove whole attention heads (ViT, DeiT, Swin) instead of head dims; with --macs, heads are the attention groups' unit (faster on CPU).")
@click.option("--macs", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="tp: keep this fraction of the MACs, allocated by measured loss curves (the strategy gives its signal).")
@click.option("--latency", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="tp: keep this fraction of the latency, timed here on one calibration batch (--batch-size), "
                   "in the same removal order as --macs.")
@data_options
def command(plan_path: str, strategy_name: str, backend: str, out: str, model_spec: str | None, model_kwargs: dict | None,
            checkpoint: str | None, input_shape: tuple[int, int, int] | None, nni_pruner: str, fold: str, round_to: int | None,
            prune_heads: bool, macs: float | None, latency: float | None, calib: str, data_dir: str | None, calib_samples: int, batch_size: int, seed: int) -> None:
    """Prune the plan's model by one strategy and write it (weights + how to rebuild it).

    \b
    Example:
      mixmatch plan --model timm:resnet18 --model-kwargs '{"in_chans": 1, "num_classes": 10}' \\
                    --input-shape 1,28,28 --calib digits --target 0.5 --extend-ranges --out plan.json
      mixmatch prune --plan plan.json --strategy best --out pruned.pt
      mixmatch prune --plan plan.json --strategy magnitude:midpoint --backend tp --out pruned.pt
      mixmatch prune --plan plan.json --strategy magnitude:midpoint --backend tp --macs 0.5 --out pruned.pt
      mixmatch prune --plan plan.json --strategy magnitude:midpoint --backend tp --latency 0.5 --batch-size 64 --out pruned.pt
    Load it again with:
      from mixmatch_plugin.adapters.artifact import load_pruned; model, meta = load_pruned("pruned.pt")
    """
    import torch

    from mixmatch_plugin.layers import check_untied, inventory
    from mixmatch_plugin.masks import check_strategy
    from mixmatch_plugin.models import build_model
    from mixmatch_plugin.planning import load_plan

    p = load_plan(plan_path)
    spec, kwargs, calib, data_dir, calib_samples, batch_size, seed, shape = from_plan(
        p.meta, plan_path, model_spec, model_kwargs, calib=calib, data_dir=data_dir, calib_samples=calib_samples,
        batch_size=batch_size, seed=seed, input_shape=input_shape)
    model = build_model(spec, model_kwargs=kwargs, checkpoint=checkpoint).eval()
    layers = inventory(model)
    best = strategy_name == "best"
    if best and (backend == "tp" or calib in ("none", "random")):
        raise MixMatchError("--strategy best chooses by masked validation accuracy on the --calib dataset: use it with "
                            "--calib digits|fashion-mnist and --backend torch or nni (for tp, name a strategy or pass --macs)")
    strategy = p.strategies[0] if best else p.strategy(strategy_name)
    check_strategy(strategy, layers, p.layers)  # every backend: the plan must have been made for this model
    if backend != "torch":
        check_untied(layers, f"--backend {backend}")
    if (macs is not None or latency is not None) and backend != "tp":
        raise MixMatchError(f"{'--macs' if macs is not None else '--latency'} is a structured budget: use it with --backend tp")

    loader = None
    if calib != "none":
        data = load_data(calib, data_dir, shape, seed, num_classes=int(kwargs.get("num_classes", 10)))
        loader = data.calibration(calib_samples, batch_size, seed)
        shape = shape or tuple(data.input_shape)
    if shape is None:
        raise MixMatchError("the input shape is unknown: pass --input-shape C,H,W (or a --calib dataset)")
    signals = None
    if best:
        strategy, signals = _choose(p, model, data, loader, batch_size, seed)
    batch = next(iter(loader))[0] if loader is not None else torch.randn(batch_size, *shape)
    example = batch[:2]
    needs_grad = strategy.signal != "magnitude"
    if needs_grad and loader is None:
        raise MixMatchError(f"strategy {strategy.name!r} ranks by {strategy.signal}, which needs calibration data: drop --calib none")

    from mixmatch_plugin.adapters.artifact import save_pruned

    model_meta = {"model": spec, "model_kwargs": kwargs, "input_shape": list(shape)}
    if backend == "torch":
        res = p.apply(model, strategy, calib=loader, signals=signals)
        report: dict[str, Any] = {"global_sparsity": res.global_sparsity, "layer_sparsity": res.layer_sparsity}
        path = save_pruned(out, res.model, backend="torch", model_spec=model_meta, strategy=strategy.to_dict(), report=report)
        _print_layers(res.layer_sparsity, p)
        click.echo(f"\nplain PyTorch: global sparsity {res.global_sparsity:.4f} (planned {strategy.global_sparsity:.4f})")
    elif backend == "nni":
        from mixmatch_plugin.adapters import nni as nni_adapter

        nres = nni_adapter.prune(model, strategy, nni_pruner, example_inputs=example, calib=loader)
        report = {"pruner": nni_pruner, "layer_sparsity": nres.sparsity, "config_list": nres.config}
        path = save_pruned(out, nres.model, backend="nni", model_spec=model_meta, strategy=strategy.to_dict(), report=report)
        _print_layers(nres.sparsity, p)
        total = sum(float((m.weight == 0).sum()) for m in nres.model.modules() if _prunable(m))
        count = sum(m.weight.numel() for m in nres.model.modules() if _prunable(m))
        click.echo(f"\nNNI {nni_pruner}: {len(nres.config)} config entries; zero weights {total / max(count, 1):.4f} of Conv/Linear")
    else:
        from mixmatch_plugin.adapters import torch_pruning as tp_adapter

        budgeted = macs is not None or latency is not None
        tres = tp_adapter.prune(model, strategy, example, calib=loader if needs_grad or budgeted else None, macs=macs,
                                latency=latency, options=tp_adapter.TPOptions(fold=fold, round_to=round_to, prune_heads=prune_heads,
                                                                              latency_inputs=batch))
        path = save_pruned(out, tres.model, backend="tp", model_spec=model_meta, strategy=strategy.to_dict(),
                           report=tres.report.to_dict(), tp_history=tres.history, num_heads=tres.num_heads)
        click.echo(tres.report.summary())
    click.echo(f"wrote {path}")


def _choose(p: Any, model: Any, data: Any, calib: Any, batch_size: int, seed: int) -> tuple[Any, Any]:
    """The plan's strategy chosen on the validation split (:meth:`Plan.choose`) and the signals it was chosen with
    (the plan's, computed again on ``calib``); prints the finalists."""
    from dataclasses import replace

    from mixmatch_plugin.app.data import loader
    from mixmatch_plugin.signals import compute_signals

    signals = compute_signals(model, calib, layers=p.layers, signals=("magnitude", "gradient", "wanda"), progress=True)
    if prog := next((s for s in p.strategies if s.signal == "progressive"), None):
        signals.progressive = p.progressive_signals(model, calib, prog).progressive
    choice = replace(p, signals=signals).choose(model, loader(data.val, max(batch_size, 128)),
                                                bn_loader=loader(data.train, batch_size, shuffle=True, seed=seed), progress=True)
    click.echo(table([(r.strategy, f"{r.accuracy:.4f}", f"{r.loss:.4f}") for r in choice.finals], ("finalist", "val accuracy", "val loss")))
    click.echo(f"chose {choice.strategy.name} on the validation split ({choice.evaluations} evaluations, {choice.seconds:.0f} s)\n")
    return choice.strategy, signals


def _prunable(m: Any) -> bool:
    from torch import nn

    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def _print_layers(sparsity: dict[str, float], p: Any) -> None:
    roles = {layer.name: layer.role for layer in p.layers}
    if rows := [(n, roles.get(n, "?"), f"{s:.4f}") for n, s in sparsity.items() if s > 0]:
        click.echo(table(rows, ("layer", "role", "sparsity")))
