"""Depth pruning: replace whole residual blocks by identity, scored by KL divergence or CKA.

Blocks (timm ResNet, ConvNeXt, ViT and Swin blocks whose output has the shape of their input), stages,
``min_blocks`` and the two block scores (``kl``, the paper's, and ``cka``) are described in
``docs/depth-width.md``. A removed block becomes an :class:`IdentityBlock`.
"""

from __future__ import annotations

import collections
import copy
import importlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from .batches import forward, iterate, model_device, split_batch, to_device
from .errors import MixMatchError

logger = logging.getLogger(__name__)

KINDS = ("resnet", "convnext", "vit", "swin")
DEFAULT_MIN_BLOCKS = {"resnet": 2, "convnext": 1, "vit": 1, "swin": 1}
BlockScore = Literal["kl", "cka"]
SCORES: tuple[BlockScore, ...] = get_args(BlockScore)
_BLOCK_CLASS_NAMES = {
    "resnet": ("timm.models.resnet", ("BasicBlock", "Bottleneck")),
    "convnext": ("timm.models.convnext", ("ConvNeXtBlock",)),
    "vit": ("timm.models.vision_transformer", ("Block", "ResPostBlock")),
    "swin": ("timm.models.swin_transformer", ("SwinTransformerBlock",)),
}
SUPPORTED_TEXT = (
    "timm ResNet BasicBlock/Bottleneck without downsample, ConvNeXtBlock, ViT Block/ResPostBlock, "
    "SwinTransformerBlock"
)


class IdentityBlock(nn.Module):
    """Stand-in for a removed block: returns its input; accepts the block's extra arguments.

    ``kind`` and ``replaced`` (the original class name) are informational. Works inside
    ``nn.Sequential`` stages of timm ResNets, ConvNeXts, ViTs ((B, N, C) tokens) and Swins
    ((B, H, W, C) maps), and answers ``set_input_size`` like a Swin block.
    """

    def __init__(self, kind: str = "", replaced: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.replaced = replaced

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to resize (Swin stages call this on every block)."""

    def extra_repr(self) -> str:
        return f"removed {self.replaced}" if self.replaced else ""


@dataclass(frozen=True)
class BlockInfo:
    """One block of a supported type.

    Attributes:
        name: module name (e.g. ``layer2.1``).
        stage: the name of the container that holds it.
        index: its position in the stage.
        kind: ``resnet``, ``convnext``, ``vit`` or ``swin``.
        cls: the block's class name (``IdentityBlock`` once removed).
        removed: whether it has already been replaced by identity.
        shape_safe: whether its output has the shape of its input (so it may be removed).
        reason: why it is not shape-safe, or "".
    """

    name: str
    stage: str
    index: int
    kind: str
    cls: str
    removed: bool = False
    shape_safe: bool = True
    reason: str = ""


def _block_classes() -> dict[str, tuple[type, ...]]:
    out: dict[str, tuple[type, ...]] = {}
    for kind, (module, names) in _BLOCK_CLASS_NAMES.items():
        try:
            mod = importlib.import_module(module)
            out[kind] = tuple(getattr(mod, n) for n in names)
        except (ImportError, AttributeError):  # pragma: no cover - timm is a dependency
            out[kind] = ()
    return out


def block_kind(module: nn.Module) -> str | None:
    """The kind of a supported block (``resnet``, ``convnext``, ``vit``, ``swin``), else None."""
    if isinstance(module, IdentityBlock):
        return module.kind or None
    for kind, classes in _block_classes().items():
        if classes and isinstance(module, classes):
            return kind
    return None


def _structural_reason(module: nn.Module, kind: str) -> str:
    """Why a block of a supported type cannot be replaced by identity ("" when it can)."""
    m: Any = module
    if kind == "resnet":
        if m.downsample is not None:
            return "it has a downsample shortcut (stride or channel change)"
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        if any(tuple(c.stride) != (1, 1) for c in convs):
            return "it has a strided convolution"
        if convs and convs[0].in_channels != convs[-1].out_channels:
            return "its output channels differ from its input channels"
    elif kind == "convnext" and not isinstance(m.shortcut, nn.Identity):
        return "its shortcut downsamples (stride or channel change)"
    return ""


def _shapes(model: nn.Module, example_inputs: Any, modules: Mapping[str, nn.Module]) -> dict[str, tuple[Any, Any]]:
    """Input and output shapes of ``modules`` on one forward pass of ``example_inputs``."""
    seen: dict[str, tuple[Any, Any]] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any, name: str = name) -> None:
            a = tuple(inp[0].shape) if inp and isinstance(inp[0], torch.Tensor) else None
            b = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            seen.setdefault(name, (a, b))

        handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return seen


def _run(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def find_blocks(model: nn.Module, example_inputs: Any = None) -> list[BlockInfo]:
    """Every block of a supported type in ``model`` (removed ones included), in module order.

    With ``example_inputs`` the shapes are checked on a real forward pass as well (a block that ran
    with different input and output shapes is marked not shape-safe).
    """
    found = [(name, mod, kind) for name, mod in model.named_modules() if (kind := block_kind(mod)) is not None]
    shapes: dict[str, tuple[Any, Any]] = {}
    if example_inputs is not None and (live := {n: m for n, m, _ in found if not isinstance(m, IdentityBlock)}):
        shapes = _shapes(model, example_inputs, live)
    out = []
    for name, mod, kind in found:
        stage, _, idx = name.rpartition(".")
        removed = isinstance(mod, IdentityBlock)
        reason = "" if removed else _structural_reason(mod, kind)
        if not reason and name in shapes:
            a, b = shapes[name]
            if a is None or a != b:
                reason = f"its output shape {b} differs from its input shape {a}"
        if not removed and example_inputs is not None and name not in shapes and not reason:
            reason = "it did not run on the example inputs"
        out.append(BlockInfo(name, stage, int(idx) if idx.isdigit() else 0, kind, type(mod).__name__,
                             removed, not reason, reason))
    return out


def _min_for(kind: str, min_blocks: int | Mapping[str, int] | None) -> int:
    if min_blocks is None:
        return DEFAULT_MIN_BLOCKS[kind]
    if isinstance(min_blocks, Mapping):
        return int(min_blocks.get(kind, DEFAULT_MIN_BLOCKS[kind]))
    return int(min_blocks)


def _check_min(min_blocks: int | Mapping[str, int] | None) -> None:
    values = list(min_blocks.values()) if isinstance(min_blocks, Mapping) else [min_blocks]
    for v in values:
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise MixMatchError(f"min_blocks must be a non-negative integer per stage, got {v!r}")


def removable_blocks(
    model: nn.Module, example_inputs: Any = None, *, min_blocks: int | Mapping[str, int] | None = None
) -> list[BlockInfo]:
    """The blocks that may be removed now: shape-safe, not removed, and leaving ``min_blocks`` per stage.

    Args:
        min_blocks: blocks every stage keeps (an int, or ``{kind: int}``); default 2 for ResNets (the
            paper's rule) and 1 for ConvNeXt, ViT and Swin.

    Raises:
        MixMatchError: the model has no block of a supported type at all.
    """
    _check_min(min_blocks)
    if not (blocks := find_blocks(model, example_inputs)):
        raise MixMatchError(
            f"{type(model).__name__} has no block that depth pruning supports ({SUPPORTED_TEXT}); "
            "use width pruning only"
        )
    kept = collections.Counter(b.stage for b in blocks if not b.removed)
    return [b for b in blocks if not b.removed and b.shape_safe and kept[b.stage] - 1 >= _min_for(b.kind, min_blocks)]


def remove_blocks(
    model: nn.Module, names: Iterable[str], *, example_inputs: Any = None, inplace: bool = False
) -> nn.Module:
    """Replace the named blocks by :class:`IdentityBlock`; a deep copy unless ``inplace=True``.

    Raises:
        MixMatchError: a name is not a module, not a supported block (its type is named), already
            removed, or not shape-safe (the reason is given). Nothing is changed then.
    """
    names = list(names)
    blocks = {b.name: b for b in find_blocks(model, example_inputs)}
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise MixMatchError(f"{type(model).__name__} has no module {name!r}") from None
        if (info := blocks.get(name)) is None:
            raise MixMatchError(f"{name!r} is a {type(mod).__name__}, which depth pruning does not support ({SUPPORTED_TEXT})")
        if info.removed:
            raise MixMatchError(f"block {name!r} has already been removed")
        if not info.shape_safe:
            raise MixMatchError(f"block {name!r} ({info.cls}) cannot be replaced by identity: {info.reason}")
    work = model if inplace else copy.deepcopy(model)
    for name in names:
        info = blocks[name]
        parent = work.get_submodule(info.stage) if info.stage else work
        setattr(parent, name.rpartition(".")[2], IdentityBlock(info.kind, info.cls))
        logger.debug("replaced block %s (%s) by identity", name, info.cls)
    return work


def removed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks replaced by :class:`IdentityBlock`, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, IdentityBlock)]


# ------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_blocks(
    model: nn.Module,
    calib: Iterable[Any],
    blocks: Sequence[str | BlockInfo],
    *,
    method: BlockScore = "kl",
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Damage score of removing each block alone (lower = removed first); ``model`` is not changed.

    Args:
        calib: labelled batches from the *training* split (the paper uses a few hundred images per class).
        blocks: names (or :class:`BlockInfo`) of blocks to score, each scored with only itself removed.
        method: ``kl`` (mean KL divergence of the softmax outputs, intact ‖ removed) or ``cka``
            (``1 - CKA`` of the penultimate features, debiased minibatch).
    """
    from .cka import MinibatchCKA, penultimate
    from .progress import progress_bar

    if method not in SCORES:
        raise MixMatchError(f"block score must be one of {', '.join(SCORES)}, got {method!r}")
    if not (names := [b.name if isinstance(b, BlockInfo) else b for b in blocks]):
        return {}
    work = copy.deepcopy(model).eval()
    device = model_device(work)
    inputs = [split_batch(to_device(b, device))[0] for b in iterate(calib, max_batches, what="block scoring")]
    ref = [torch.log_softmax(forward(work, x).double(), dim=1) if method == "kl" else penultimate(work, x) for x in inputs]
    scores: dict[str, float] = {}
    for name in progress_bar(names, "score blocks", enable=progress):
        stage, _, attr = name.rpartition(".")
        parent = work.get_submodule(stage) if stage else work
        original = getattr(parent, attr)
        if (kind := block_kind(original)) is None or isinstance(original, IdentityBlock):
            raise MixMatchError(f"{name!r} is not a live block of a supported type ({type(original).__name__})")
        setattr(parent, attr, IdentityBlock(kind, type(original).__name__))
        try:
            if method == "kl":
                total = n = 0.0
                for x, logp in zip(inputs, ref, strict=True):
                    logq = torch.log_softmax(forward(work, x).double(), dim=1)
                    total += float((logp.exp() * (logp - logq)).sum())
                    n += x.shape[0]
                scores[name] = total / n
            else:
                acc = MinibatchCKA(debiased=True)
                for x, f in zip(inputs, ref, strict=True):
                    acc.update(f, penultimate(work, x))
                scores[name] = 1.0 - acc.compute()
        finally:
            setattr(parent, attr, original)
    return scores
