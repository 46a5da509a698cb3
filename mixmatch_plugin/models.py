"""Model factories: ``timm:NAME``, ``pkg.module:factory``, checkpoints, and the small models of the demo and benchmark.

A model spec is one string:

* ``timm:resnet18`` (with ``model_kwargs`` such as ``{"num_classes": 10, "in_chans": 1}``), random init
  (no hub downloads);
* ``pkg.module:factory``, imported only because the user named it, called with ``model_kwargs``;
* either of those plus a checkpoint (a state dict), loaded with ``torch.load(weights_only=True)``.

A spec read from a *file* (a plan's recorded model, a pruned-model file) is data from someone else:
importing and calling the factory it names would let the file choose code to run (``subprocess:run``
with kwargs is a spec too). :func:`check_recorded_spec` therefore accepts only ``timm:NAME`` and this
package's own factories from files; any other factory must be named by the user (``--model``).

The small models sized for 2 CPU cores live here too, registered with timm: ``timm:tiny_resnet``,
``timm:resnet18_fmnist``, ``timm:vit_fmnist``, ``timm:swin_fmnist`` (and, as before, the same names as
``mixmatch_plugin.models:NAME``, which plans and checkpoints on disk record).
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import register_model
from timm.models.levit import Levit
from torch import nn

from .errors import MixMatchError, first_line
from .io import safe_torch_load

logger = logging.getLogger(__name__)


__all__ = ["TRUSTED_FACTORIES", "build_model", "check_recorded_spec", "load_checkpoint"]  # timm adds the models


def _no_weights(pretrained: bool, name: str) -> None:
    if pretrained:
        raise MixMatchError(f"timm:{name} has no pretrained weights: train it (mixmatch demo trains one) or load a --checkpoint")


# The small models sized for 2 CPU cores, registered with timm (as timm's own ``models/resnet.py`` does):
# ``timm.create_model("swin_fmnist")`` and the specs ``timm:swin_fmnist`` and ``mixmatch_plugin.models:swin_fmnist``
# build the same model. timm calls them with ``pretrained`` and its config keywords, which they ignore.
@register_model
def tiny_resnet(pretrained: bool = False, *, num_classes: int = 10, in_chans: int = 1, width: int = 16, **_: Any) -> nn.Module:
    """A timm ResNet (64-channel stem) with one BasicBlock per stage of widths (w, 2w, 4w, 8w): 0.32M parameters at w=16."""
    from timm.models.resnet import BasicBlock, ResNet

    _no_weights(pretrained, "tiny_resnet")
    return ResNet(
        BasicBlock,  # type: ignore[arg-type]  # timm annotates the block class as an instance
        layers=(1, 1, 1, 1), channels=(width, 2 * width, 4 * width, 8 * width), stem_width=width,
        num_classes=num_classes, in_chans=in_chans,
    )


@register_model
def resnet18_fmnist(pretrained: bool = False, *, num_classes: int = 10, in_chans: int = 1, **_: Any) -> nn.Module:
    """timm ``resnet18`` with ``in_chans=1`` (11.2M parameters), the benchmark's ResNet."""
    import timm

    _no_weights(pretrained, "resnet18_fmnist")
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes, in_chans=in_chans)


@register_model
def vit_fmnist(pretrained: bool = False, *, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, **_: Any) -> nn.Module:
    """timm ``VisionTransformer``: patch 4, embed 96, depth 6, 3 heads (0.68M parameters)."""
    from timm.models.vision_transformer import VisionTransformer

    _no_weights(pretrained, "vit_fmnist")
    return VisionTransformer(
        img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, embed_dim=96, depth=6,
        num_heads=3, mlp_ratio=4.0,
    )


@register_model
def swin_fmnist(pretrained: bool = False, *, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, **_: Any) -> nn.Module:
    """timm ``SwinTransformer``: patch 4, window 7, embed 64, depths (2, 2), heads (2, 4) (0.53M parameters)."""
    from timm.models.swin_transformer import SwinTransformer

    _no_weights(pretrained, "swin_fmnist")
    return SwinTransformer(
        img_size=img_size, patch_size=4, in_chans=in_chans, num_classes=num_classes, embed_dim=64, depths=(2, 2),
        num_heads=(2, 4), window_size=7, drop_path_rate=0.0,
    )


class PaddedLevit(Levit):
    """timm ``Levit`` that zero-pads smaller inputs to its 32 × 32 (LeViT's attention biases fix the resolution)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        pad = (32 - x.shape[-1]) // 2
        return super().forward_features(nn.functional.pad(x, (pad, pad, pad, pad)) if pad > 0 else x)


@register_model
def levit_fmnist(pretrained: bool = False, *, num_classes: int = 10, in_chans: int = 1, **_: Any) -> nn.Module:
    """timm ``Levit`` for 28 × 28 inputs padded to 32: stem stride 8, embed (64, 128, 192), key dim 16, heads
    (2, 4, 6), depths (1, 2, 2), attention and MLP ratio 2 (1.3M parameters); outside the benchmark's three."""
    _no_weights(pretrained, "levit_fmnist")
    return PaddedLevit(img_size=32, in_chans=in_chans, num_classes=num_classes, embed_dim=(64, 128, 192), key_dim=16,
                       num_heads=(2, 4, 6), depth=(1, 2, 2), stem_type="s8")


#: The factories a spec read from a file may name besides ``timm:NAME`` (they only build models; the
#: module's other callables, ``build_model`` among them, are not factories and stay off the list).
TRUSTED_FACTORIES = tuple(f"mixmatch_plugin.models:{n}" for n in ("tiny_resnet", "resnet18_fmnist", "vit_fmnist", "swin_fmnist",
                                                                           "levit_fmnist"))


def check_recorded_spec(spec: Any, source: str, fix: str) -> str:
    """Refuse a model spec read from ``source`` (a file) unless it is ``timm:NAME`` or a factory of this package.

    ``fix`` tells the user how to name the factory themselves. Returns the spec.
    """
    if not isinstance(spec, str) or not spec:
        raise MixMatchError(f"{source} records no usable model spec ({spec!r}): {fix}")
    if spec.startswith("timm:") or spec in TRUSTED_FACTORIES:
        return spec
    raise MixMatchError(
        f"{source} names the model factory {spec!r}; a file may not choose which code runs "
        f"(only timm:NAME and mixmatch_plugin.models:NAME are taken from files): {fix}"
    )


def build_model(
    spec: str, *, model_kwargs: Mapping[str, Any] | None = None, checkpoint: str | Path | None = None,
    init_seed: int = 0,
) -> nn.Module:
    """Build a model from ``timm:NAME`` or ``pkg.module:factory``, then load ``checkpoint`` if given.

    The factory runs under ``torch.manual_seed(init_seed)`` in a forked RNG (the caller's random state
    is untouched), so a model built without a checkpoint (pruning at initialisation, a smoke test) has
    the same weights every time: the same command prunes the same model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _build(spec, dict(model_kwargs or {}))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        logger.info("%s: no checkpoint given, so the weights are the factory's initialisation (seed %d)", spec, init_seed)
    return model


def _build(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    if spec.startswith("timm:"):
        import timm

        name = spec[5:]
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            raise MixMatchError(f"timm has no model {name!r}; "
                                + (f"did you mean {', '.join(close)}?" if close else "list them with timm.list_models('*resnet*')"))
        kwargs.setdefault("pretrained", False)
        try:
            model = timm.create_model(name, **kwargs)
        except TypeError as exc:
            raise MixMatchError(f"timm:{name} does not accept these --model-kwargs ({exc})") from None
    elif ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except (ImportError, ValueError) as exc:  # ValueError: an empty or relative module name
            raise MixMatchError(
                f"cannot import module {mod_name!r} from --model {spec!r} ({exc}); check the name, or install the package"
            ) from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise MixMatchError(f"module {mod_name!r} has no callable {attr!r} (from --model {spec!r})")
        try:
            model = factory(**kwargs)
        except TypeError as exc:
            raise MixMatchError(f"{spec} does not accept these --model-kwargs ({exc})") from None
        if not isinstance(model, nn.Module):
            raise MixMatchError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        raise MixMatchError(f"model spec {spec!r} must be 'timm:NAME' or 'pkg.module:factory'")
    return model


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (or ``{"state_dict": ...}``/``{"model": ...}``) into ``model``, strictly and safely."""
    obj = safe_torch_load(path)
    wrapped = (obj[k] for k in ("state_dict", "model", "model_state") if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping))
    state = next(wrapped, obj)
    if not isinstance(state, Mapping):
        raise MixMatchError(f"checkpoint {path} holds {type(state).__name__}, not a state dict")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise MixMatchError(f"checkpoint {path} does not fit the model ({first_line(first)}); check --model and --model-kwargs") from None
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise MixMatchError(
            f"checkpoint {path} does not fit the model: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (first: {first!r}); check --model and --model-kwargs"
        )
