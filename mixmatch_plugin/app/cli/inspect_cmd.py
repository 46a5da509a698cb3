"""``mixmatch inspect``: the layer inventory as a table (or JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import click

from mixmatch_plugin.app.cli.common import fmt_range, load_model, model_options, table


@click.command("inspect")
@model_options
@click.option("--preset", default="auto", show_default=True, help="Rules preset or file for the range column.")
@click.option("--role", "role_overrides", multiple=True, metavar="REGEX=ROLE", help="Override roles by name pattern.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(model_spec: str, model_kwargs: dict, checkpoint: str | None, input_shape: tuple[int, int, int] | None, preset: str,
            role_overrides: tuple[str, ...], as_json: bool) -> None:
    """Show every prunable weight tensor: name, role, stage, parameters and range.

    \b
    Example:
      mixmatch inspect --model timm:swin_tiny_patch4_window7_224
      mixmatch inspect --model timm:resnet18 --role 'layer4\\..*conv2$=other' --json
    """
    from mixmatch_plugin.layers import check_prunable, inventory
    from mixmatch_plugin.ranges import bounds, clamp_ranges, rule_ranges
    from mixmatch_plugin.rules import load_rules, preset_for

    model = load_model(model_spec, model_kwargs, checkpoint)
    layers = inventory(model, roles=parse_roles(role_overrides))
    check_prunable(layers)
    rules = load_rules(preset_for(model) if preset == "auto" else preset)
    hard = bounds(layers, rules)
    ranges = clamp_ranges(rule_ranges(layers, rules), hard) if rules.source == "rules" else {}
    if as_json:
        out = [{**layer.to_dict(), "range": list(ranges.get(layer.name, hard[layer.name])), "bounds": list(hard[layer.name])} for layer in layers]
        click.echo(json.dumps({"model": type(model).__name__, "preset": rules.name, "layers": out}, indent=2))
        return
    rows = [(layer.name, layer.role, layer.stage, f"{layer.params:,}", fmt_range(ranges.get(layer.name, hard[layer.name]))) for layer in layers]
    click.echo(table(rows, ("name", "role", "stage", "params", "range")))
    total = sum(layer.params for layer in layers)
    click.echo(f"\n{type(model).__name__}: {len(layers)} weight tensors, {total:,} weights; preset {rules.name}"
               + ("" if ranges else " (empirical: ranges need calibration data, see `mixmatch plan`)"))


def parse_roles(items: Iterable[str]) -> dict[str, str]:
    from mixmatch_plugin.errors import MixMatchError

    out = {}
    for item in items:
        pattern, sep, role = item.rpartition("=")
        if not sep or not pattern:
            raise MixMatchError(f"--role {item!r} must be REGEX=ROLE, e.g. 'head$=other'")
        out[pattern] = role
    return out
