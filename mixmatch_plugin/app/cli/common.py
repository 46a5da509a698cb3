"""Options and helpers shared by the subcommands: click types for shapes, JSON and lists, model specs, tables."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from click.core import ParameterSource

from mixmatch_plugin.errors import MixMatchError


class Shape(click.ParamType):
    """``C,H,W`` (or ``CxHxW``) as three positive integers."""

    name = "C,H,W"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int, int]:
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or min(parts) < 1:
            self.fail(f"{value!r} must be C,H,W: three positive integers, e.g. 3,224,224", param, ctx)
        return (parts[0], parts[1], parts[2])


class JsonObject(click.ParamType):
    """A JSON object such as ``'{"num_classes": 10}'`` (a mapping passes through)."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            obj = json.loads(value)
        except json.JSONDecodeError as exc:
            self.fail(f"{value!r} is not valid JSON ({exc.msg}); quote it like '{{\"num_classes\": 10}}'", param, ctx)
        if not isinstance(obj, dict):
            self.fail(f"{value!r} must be a JSON object like '{{\"num_classes\": 10}}'", param, ctx)
        return obj


class CommaList(click.ParamType):
    """Comma-separated names, each one of ``choices``."""

    name = "A,B,..."

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        items = tuple(s.strip() for s in str(value).split(",") if s.strip())
        if not items or any(s not in self.choices for s in items):
            self.fail(f"{value!r}: choose from {', '.join(self.choices)} (comma-separated)", param, ctx)
        return items


SIGNAL_LIST = CommaList(("magnitude", "gradient", "product", "wanda"))
CALIB_CHOICES = ("digits", "fashion-mnist", "random", "none")


def model_options(fn: Callable[..., Any] | None = None, *, required: bool = True) -> Any:
    """--model, --model-kwargs, --checkpoint, --input-shape (``@model_options(required=False)``: the plan's by default)."""
    if fn is None:
        return lambda f: model_options(f, required=required)
    opts = [
        click.option("--model", "model_spec", required=required, metavar="SPEC",
                     help="timm:NAME (random init; also the small models, e.g. timm:swin_fmnist) or pkg.module:factory"
                          + ("." if required else "; default: the plan's.")),
        click.option("--model-kwargs", type=JsonObject(), default="{}" if required else None,
                     help='Keyword arguments for the factory, e.g. \'{"num_classes": 10, "in_chans": 1}\'.'),
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="A state dict to load (read with torch.load(weights_only=True): never runs code)."),
        click.option("--input-shape", type=Shape(), default=None,
                     help="Input shape of one sample; data is resized to it. Default: the dataset's own."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), fn)


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--calib, --data, --calib-samples, --batch-size, --seed."""
    opts = [
        click.option("--calib", type=click.Choice(CALIB_CHOICES), default="digits", show_default=True,
                     help="Calibration data (drawn from the training split only); commands run on a plan default to the plan's."),
        click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)."),
        click.option("--calib-samples", type=click.IntRange(1), default=512, show_default=True,
                     help="Calibration samples (the paper uses 5-10 % of the training data)."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of splits and calibration draw."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), fn)


def from_plan(meta: Mapping[str, Any], source: str, model_spec: str | None, model_kwargs: dict | None, **given: Any) -> tuple[Any, ...]:
    """What a command run on a plan takes from it: the model spec and kwargs (``--model`` wins, else the plan's
    record, which may only name timm or this package's factories: a file may not choose which code runs), then
    each data option in ``given``'s order: set on the command line wins, else the plan's record, else the default."""
    from mixmatch_plugin.models import check_recorded_spec

    ctx, rec = click.get_current_context(), meta.get("model_spec") or {}
    spec = model_spec or check_recorded_spec(rec.get("model"), source, "pass --model (and --model-kwargs) to confirm it")
    kwargs = model_kwargs if model_kwargs is not None else JsonObject()(rec.get("model_kwargs") or "{}")
    recorded = {**(meta.get("calib_spec") or {}), "input_shape": rec.get("input_shape")}
    if recorded.get("calib", "none") not in (*CALIB_CHOICES, None):
        raise MixMatchError(f"the plan records an unknown calibration set {recorded['calib']!r}: pass --calib")
    picked = [v if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None) or recorded.get(k) is None else recorded[k]
              for k, v in given.items()]
    return spec, kwargs, *(tuple(v) if k == "input_shape" and v is not None else v for k, v in zip(given, picked, strict=True))


def load_model(model_spec: str, model_kwargs: dict[str, Any], checkpoint: str | None) -> Any:
    from mixmatch_plugin.models import build_model

    return build_model(model_spec, model_kwargs=model_kwargs, checkpoint=checkpoint)


def load_data(calib: str, data_dir: str | None, input_shape: tuple[int, int, int] | None, seed: int, num_classes: int = 10) -> Any:
    from mixmatch_plugin.app import data

    return data.load(calib, root=data_dir, seed=seed, input_shape=input_shape, num_classes=num_classes)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_range(r: Sequence[float]) -> str:
    return f"[{r[0]:.2f}, {r[1]:.2f}]"
