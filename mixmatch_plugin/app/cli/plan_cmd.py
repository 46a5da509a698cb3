"""``mixmatch plan``: build the ranges and the strategies of a model and write the plan JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import click

from mixmatch_plugin.app.cli.common import (
    SIGNAL_LIST,
    data_options,
    load_data,
    load_model,
    model_options,
    table,
)
from mixmatch_plugin.app.cli.inspect_cmd import parse_roles

if TYPE_CHECKING:
    from mixmatch_plugin.ranges import RangeSource
    from mixmatch_plugin.signals import SignalName


@click.command("plan")
@model_options
@data_options
@click.option("--signals", type=SIGNAL_LIST, default="magnitude,gradient,product", show_default=True,
              help="Signals to build rule strategies for (comma-separated; also wanda).")
@click.option("--measure", type=click.Choice(["magnitude", "gradient", "product", "wanda"]), default=None,
              help="With --target: also measure each layer's damage curve under this signal's masks (about 10 forward "
                   "passes of 2 calibration batches per layer) and add the allocations that minimise it (SIGNAL:measured-CLIP).")
@click.option("--progressive", type=click.IntRange(min=0), default=0, show_default=True, metavar="ROUNDS",
              help="With --target: also add product:progressive, SNIP rescored on the pruned model over ROUNDS rounds "
                   "(one forward+backward pass each; 10 is a good start). Its allocation and masks come from the rounds; "
                   "prune recomputes them from the plan's calibration data.")
@click.option("--target", type=float, default=None,
              help="Global sparsity to match exactly (budget-matched mode). Omit for the ranges' native sparsity.")
@click.option("--extend-ranges", is_flag=True,
              help="When --target is outside what the ranges reach, shift the ranges (reported per strategy).")
@click.option("--preset", default="auto", show_default=True,
              help="swin, resnet, levit, vgg, generic, paper, or a .yaml/.toml rules file. auto: by model class.")
@click.option("--ranges", "range_source", type=click.Choice(["auto", "rules", "empirical", "union", "intersection"]),
              default="auto", show_default=True, help="Range source: rules, the paper's empirical runs, or both.")
@click.option("--no-constraint", "disabled", multiple=True, metavar="ID",
              help="Switch off a structural constraint (norm, small_layers, patch_embed).")
@click.option("--protect", multiple=True, metavar="REGEX", help="Keep matching layers dense.")
@click.option("--role", "role_overrides", multiple=True, metavar="REGEX=ROLE", help="Override roles by name pattern.")
@click.option("--out", type=click.Path(dir_okay=False), default="plan.json", show_default=True,
              help="Where to write the plan (atomically).")
def command(model_spec: str, model_kwargs: dict, checkpoint: str | None, input_shape: tuple[int, int, int] | None,
            calib: str, data_dir: str | None, calib_samples: int, batch_size: int, seed: int, signals: tuple[SignalName, ...],
            measure: SignalName | None, progressive: int, target: float | None,
            extend_ranges: bool, preset: str, range_source: RangeSource | Literal["auto"], disabled: tuple[str, ...], protect: tuple[str, ...],
            role_overrides: tuple[str, ...], out: str) -> None:
    """Build per-layer ranges and ten rule strategies per signal, and write them as plan JSON.

    With --target, the plan also holds the score family (SIGNAL:score-NORM-CLIP: one threshold on the
    signal's scores, each layer clipped into its range, hard bounds or free limits), with --measure the
    measured allocations, and with --progressive progressive SNIP. Choose among them on validation data (mm.choose).

    \b
    Example:
      mixmatch plan --model timm:resnet18 --model-kwargs '{"in_chans": 1, "num_classes": 10}' \\
                    --input-shape 1,28,28 --calib digits --target 0.8 --extend-ranges --out plan.json
    Then: mixmatch prune --plan plan.json --strategy product:alpha-0.7 --out pruned.pt, or mixmatch report plan.json
    (the plan records the model, its input shape and the calibration data: prune and search reuse them)
    """
    from mixmatch_plugin.planning import PlanOptions
    from mixmatch_plugin.planning import plan as make_plan

    shape = input_shape
    model = load_model(model_spec, model_kwargs, checkpoint)
    loader = None
    if calib != "none":
        data = load_data(calib, data_dir, shape, seed)
        loader, shape = data.calibration(calib_samples, batch_size, seed), data.input_shape
    options = PlanOptions(ranges=range_source, disable_constraints=disabled, roles=parse_roles(role_overrides), protect=protect,
                          measure=measure, progressive=progressive)
    p = make_plan(model, loader, signals=signals, preset=preset, target=target,
                  on_unreachable="extend" if extend_ranges else "error", options=options, progress=True)
    p.meta["model_spec"] = {"model": model_spec, "model_kwargs": model_kwargs, "input_shape": list(shape) if shape else None}
    p.meta["calib_spec"] = {"calib": calib, "data_dir": data_dir, "calib_samples": calib_samples, "batch_size": batch_size, "seed": seed}
    path = p.save(out)
    rows = [(s.name, f"{s.global_sparsity:.4f}", len(s.meta.get("out_of_range", []))) for s in p.strategies]
    click.echo(table(rows, ("strategy", "global sparsity", "layers outside range")))
    lo, hi = p.meta["reachable"]
    click.echo(f"\n{p.summary()}; ranges reach [{lo:.3f}, {hi:.3f}]")
    click.echo(f"wrote {path}")
