"""Options and helpers shared by the subcommands: model specs, data, JSON options, tables."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..errors import MixMatchError


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --model-kwargs, --checkpoint, --input-shape."""
    opts = [
        click.option("--model", "model_spec", required=True, metavar="SPEC",
                     help="timm:NAME (random init) or pkg.module:factory, e.g. mixmatch_plugin.models:swin_fmnist."),
        click.option("--model-kwargs", default="{}", metavar="JSON",
                     help='Keyword arguments for the factory, e.g. \'{"num_classes": 10, "in_chans": 1}\'.'),
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="A state dict to load (read with torch.load(weights_only=True): never runs code)."),
        click.option("--input-shape", default=None, metavar="C,H,W",
                     help="Input shape of one sample; data is resized to it. Default: the dataset's own."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--calib, --data, --calib-samples, --batch-size, --seed."""
    opts = [
        click.option("--calib", type=click.Choice(["digits", "fashion-mnist", "random", "none"]), default="digits",
                     show_default=True, help="Calibration data (drawn from the training split only)."),
        click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
                     help="Folder with Fashion-MNIST IDX files (default: /usr/share/datasets/fashion-mnist)."),
        click.option("--calib-samples", type=click.IntRange(1), default=512, show_default=True,
                     help="Calibration samples (the paper uses 5-10 % of the training data)."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of splits and calibration draw."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def parse_json(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MixMatchError(f"{what} is not valid JSON ({exc.msg}); quote it like '{{\"num_classes\": 10}}'") from None
    if not isinstance(obj, dict):
        raise MixMatchError(f"{what} must be a JSON object like '{{\"num_classes\": 10}}'")
    return obj


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        parts = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise MixMatchError(f"--input-shape {text!r} must be C,H,W, e.g. 3,224,224") from None
    if len(parts) != 3 or min(parts) < 1:
        raise MixMatchError(f"--input-shape {text!r} must be three positive integers C,H,W, e.g. 3,224,224")
    return (parts[0], parts[1], parts[2])


def load_model(model_spec: str, model_kwargs: str, checkpoint: str | None) -> Any:
    from ..models import build_model

    return build_model(model_spec, model_kwargs=parse_json(model_kwargs, "--model-kwargs"), checkpoint=checkpoint)


def load_data(calib: str, data_dir: str | None, input_shape: tuple[int, int, int] | None, seed: int, num_classes: int = 10) -> Any:
    from .. import data

    return data.load(calib, root=data_dir, seed=seed, input_shape=input_shape, num_classes=num_classes)


def split_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise MixMatchError(f"{what} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_range(r: Sequence[float]) -> str:
    return f"[{r[0]:.2f}, {r[1]:.2f}]"
