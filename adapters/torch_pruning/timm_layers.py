"""timm 1.0.31 support: the classes this adapter knows, Swin ``PatchMerging``'s pruner, token mixers pruned as
one layer of the stream (:data:`STREAM_LEAVES`), the repair of attention modules after their ``qkv`` was pruned,
and two fixes: deep copies of models holding cached non-leaf tensors, and Torch-Pruning 1.6.1's LayerNorm pruning (fixed for the whole process on import)."""

from __future__ import annotations

import copy
import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.errors import MixMatchError

T = TypeVar("T")


def timm_classes() -> dict[str, tuple[Any, ...]]:
    """The timm classes this adapter knows; empty tuples when timm (or a class) is missing."""
    out: dict[str, tuple[Any, ...]] = {}
    for key, module, name in (("attention", "timm.layers", "Attention"), ("layernorm2d", "timm.layers", "LayerNorm2d"),
                              ("window_attention", "timm.models.swin_transformer", "WindowAttention"),
                              ("patch_merging", "timm.models.swin_transformer", "PatchMerging")):
        try:
            out[key] = (getattr(importlib.import_module(module), name),)
        except (ImportError, AttributeError):  # pragma: no cover - timm is a dependency
            out[key] = ()
    return out


class PatchMergingPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for timm's Swin ``PatchMerging`` (2×2 neighbours concatenated into 4·C).

    Input channel ``c`` sits at ``k·C + c`` (k = 0..3) of ``norm`` and of ``reduction``'s input, because
    ``forward`` flattens ``(..., 2, 2, C)``; output channels are ``reduction``'s rows.
    """

    TARGET_MODULES = None

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        tp.prune_linear_out_channels(layer.reduction, idxs)
        layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        dim = int(layer.dim)
        expanded = [k * dim + i for k in range(4) for i in idxs]
        tp.prune_layernorm_out_channels(layer.norm, expanded)
        tp.prune_linear_in_channels(layer.reduction, expanded)
        layer.dim = dim - len(idxs)
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return int(layer.reduction.out_features)

    def scaled(self, layer: Any, side: str) -> list[nn.Module]:
        """The inner layers whose size scales with the module's input (``in``) or output (``out``) channels."""
        return [layer.norm, layer.reduction] if side == "in" else [layer.reduction]

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.dim)


def _attrs(*names: str) -> Callable[[Any], list[nn.Module]]:
    """``m -> [m.a, m.b, ...]`` over the dotted attribute paths ``names``."""
    return lambda m: [m.get_submodule(n) for n in names]


@dataclass(frozen=True)
class StreamLeaf:
    """How a module that is pruned as one layer of the residual stream reads and writes it.

    ``reads(m)`` are the layers whose input channels are the module's input channels (a norm applied to the input
    comes first, then the layers that read its output); ``writes(m)`` the layers whose output channels are the
    module's output channels. Everything else inside keeps its size: heads, keys, values, biases, windows.
    """

    reads: Callable[[Any], list[nn.Module]]
    writes: Callable[[Any], list[nn.Module]]


#: timm token mixers (attention, FocalNet's modulation) pruned as one layer of the stream, by ``module:class``
#: (timm 1.0.31). Their heads are not re-indexed: Torch-Pruning prunes the stream around them, and each keeps its
#: inner sizes. Only modules whose forward takes its inner sizes from its own attributes qualify; most of timm's
#: attentions (Beit, Eva, CaiT, PVT, XCiT, ...) reshape by the input's width (``C // num_heads``), which ties their
#: heads to the stream.
STREAM_LEAVES: dict[str, StreamLeaf] = {
    "timm.models.levit:Attention": StreamLeaf(_attrs("qkv.linear"), _attrs("proj.ln.linear", "proj.ln.bn")),
    "timm.models.levit:AttentionDownsample": StreamLeaf(_attrs("kv.linear", "q.ln.linear"), _attrs("proj.ln.linear", "proj.ln.bn")),
    "timm.models.tiny_vit:Attention": StreamLeaf(_attrs("norm", "qkv"), _attrs("proj")),
    "timm.models.efficientformer:Attention": StreamLeaf(_attrs("qkv"), _attrs("proj")),
    "timm.models.visformer:Attention": StreamLeaf(_attrs("qkv"), _attrs("proj")),
    "timm.models.volo:ClassAttention": StreamLeaf(_attrs("kv", "q"), _attrs("proj")),
    "timm.models.focalnet:FocalModulation": StreamLeaf(_attrs("f"), _attrs("proj")),
}


def stream_leaf_classes() -> dict[type, StreamLeaf]:
    """:data:`STREAM_LEAVES` resolved to the classes that import (an entry you add counts from then on)."""
    out: dict[type, StreamLeaf] = {}
    for path, leaf in STREAM_LEAVES.items():
        module, _, name = path.partition(":")
        try:
            out[getattr(importlib.import_module(module), name)] = leaf
        except (ImportError, AttributeError):  # another timm version
            continue
    return out


def stream_leaf(m: Any) -> StreamLeaf | None:
    return stream_leaf_classes().get(type(m))


def _channels(m: Any, side: str) -> int:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return int(m.num_features)
    return int(m.weight.shape[0 if side == "out" else 1])


class StreamLeafPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for an attention module pruned as one layer of the residual stream (:class:`StreamLeaf`).

    Its input channels are the stream its readers read (their columns, and the channels of a norm on the input), its
    output channels the rows its writers write. Heads, keys and values keep their sizes, so the module's head
    attributes stay true and its position biases stay whole; the layers around it (the MLPs, the stream, the stem)
    are Torch-Pruning's as usual.
    """

    TARGET_MODULES = None

    def __init__(self, leaf: StreamLeaf) -> None:
        super().__init__()
        self.leaf = leaf

    def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        for m in self.leaf.writes(layer):
            _prune(m, idxs, "out")
        return layer

    def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
        for m in self.leaf.reads(layer):
            _prune(m, idxs, "in")
        return layer

    def get_out_channels(self, layer: Any) -> int:
        return _channels(self.leaf.writes(layer)[0], "out")

    def get_in_channels(self, layer: Any) -> int:
        return _channels(self.leaf.reads(layer)[0], "in")

    def scaled(self, layer: Any, side: str) -> list[nn.Module]:
        """The inner layers whose size scales with the module's input (``in``) or output (``out``) channels."""
        return self.leaf.reads(layer) if side == "in" else self.leaf.writes(layer)


def _prune(m: nn.Module, idxs: Sequence[int], side: str) -> None:
    if isinstance(m, nn.LayerNorm):
        tp.prune_layernorm_out_channels(m, idxs)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        tp.prune_batchnorm_out_channels(m, idxs)
    elif isinstance(m, nn.Linear):
        (tp.prune_linear_out_channels if side == "out" else tp.prune_linear_in_channels)(m, idxs)
    elif isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1:
        (tp.prune_conv_out_channels if side == "out" else tp.prune_conv_in_channels)(m, idxs)
    else:
        raise MixMatchError(f"cannot prune the {side}put channels of {type(m).__name__} inside a stream leaf; "
                            "keep the module intact (ignored_layers)")


LEAF_PRUNERS = (PatchMergingPruner, StreamLeafPruner)


def _as_one_product(m: Any, leaf: StreamLeaf, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The module's real output plus one product of its input with zeros: what Torch-Pruning's graph should see.

    The output's values are the module's own; its autograd graph links the input channels to the output channels
    and nothing else, so the tracer never walks the head reshapes inside.
    """
    with torch.no_grad():
        y = type(m).forward(m, x, *args, **kwargs)
    out = y[0] if isinstance(y, tuple) else y
    cin, cout = _channels(leaf.reads(m)[0], "in"), _channels(leaf.writes(m)[0], "out")
    nchw = x.dim() == 4 and isinstance(leaf.reads(m)[0], nn.modules.conv._ConvNd)
    c = 1 if nchw else x.dim() - 1
    if (x.dim() != out.dim() or x.shape[c] != cin or out.shape[c] != cout
            or any(a < b for d, (a, b) in enumerate(zip(x.shape, out.shape, strict=True)) if d != c)):
        raise MixMatchError(f"cannot show {type(m).__name__} to Torch-Pruning as one layer (input {tuple(x.shape)}, "
                            f"output {tuple(out.shape)}); keep it intact (ignored_layers) or use mm.apply")
    # Fewer tokens or pixels out than in (downsampling, a class token): the graph sees a slice of the input there.
    if cut := [d for d in range(x.dim()) if d != c and x.shape[d] != out.shape[d]]:
        x = x[tuple(slice(0, out.shape[d] if d in cut else None) for d in range(x.dim()))]
    link = nn.functional.conv2d(x, x.new_zeros(cout, cin, 1, 1)) if nchw else x @ x.new_zeros(cin, cout)
    linked = out + link
    return (linked, *y[1:]) if isinstance(y, tuple) else linked


def run_model(model: nn.Module, example_inputs: Any, forward_fn: Callable[..., Any] | None) -> Any:
    """Run ``model`` on ``example_inputs`` as Torch-Pruning does: ``forward_fn``, else keywords, a tuple or one input."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


class TraceAsLeaves:
    """``forward_fn`` for Torch-Pruning's tracing that shows each attention of :data:`STREAM_LEAVES` as one layer.

    Torch-Pruning traces the autograd graph inside a module even when a customized pruner owns it, and head
    reshapes and bias expansions there (LeViT's) make its group search run forever. While tracing, each such module
    adds to its output a single product of its input with zeros, and computes the rest without gradients, so the
    graph links its input channels to its output channels and nothing else. The model runs normally elsewhere.
    """

    def __init__(self, forward_fn: Any = None) -> None:
        self.forward_fn = forward_fn

    def __call__(self, model: nn.Module, example_inputs: Any) -> Any:
        mods: list[Any] = []
        leaves = stream_leaf_classes()
        for m in model.modules():
            if (leaf := leaves.get(type(m))) is not None:
                m.forward = functools.partial(_as_one_product, m, leaf)
                mods.append(m)
        try:
            return run_model(model, example_inputs, self.forward_fn)
        finally:
            for m in mods:
                del m.forward


def tracing_forward(customized: Mapping[Any, Any], forward_fn: Any) -> Any:
    """The ``forward_fn`` to trace a model whose customized pruners are ``customized``."""
    needs = any(isinstance(p, StreamLeafPruner) for p in customized.values())
    return TraceAsLeaves(forward_fn) if needs and not isinstance(forward_fn, TraceAsLeaves) else forward_fn


def customized_pruners(model: nn.Module) -> dict[Any, tp.pruner.BasePruningFunc]:
    """The adapter's own Torch-Pruning pruners for the timm module types present in ``model``."""
    merging = timm_classes()["patch_merging"]
    out: dict[Any, tp.pruner.BasePruningFunc] = {}
    leaves = stream_leaf_classes()
    for m in model.modules():
        if merging and isinstance(m, merging):
            out[merging[0]] = PatchMergingPruner()
        elif (leaf := leaves.get(type(m))) is not None and type(m) not in out:
            out[type(m)] = StreamLeafPruner(leaf)
    return out


def attention_head_dims(model: nn.Module) -> dict[str, int]:
    """``{name: head_dim}`` of every timm ``Attention``/``WindowAttention`` (call it before pruning)."""
    known, modules = timm_classes(), dict[str, Any](model.named_modules())
    return {name: int(m.qkv.out_features) // (3 * int(m.num_heads)) for name, m in modules.items()
            if isinstance(m, known["attention"] + known["window_attention"])}


def fix_attention(model: nn.Module, head_dims: Mapping[str, int], num_heads: Mapping[str, int] | None = None) -> None:
    """After pruning, make timm attention modules agree with their pruned ``qkv``.

    Args:
        model: the pruned model.
        head_dims: the original head_dim of every attention module, by module name.
        num_heads: the new head count by module name (default: unchanged).

    Sets ``num_heads``, ``head_dim``, ``attn_dim`` and ``dim``; when head_dim shrank from ``d`` to
    ``d'``, scales the query rows of ``qkv`` by ``sqrt(d'/d)`` and sets ``scale = d'^-0.5``, so the
    attention logits stay those of the original model with the pruned dims zeroed.
    """
    for name, d0 in head_dims.items():
        attn: Any = model.get_submodule(name)
        heads = int((num_heads or {}).get(name, attn.num_heads))
        out = attn.qkv.out_features
        if out % (3 * heads):
            raise MixMatchError(f"{name}: qkv has {out} outputs, not a multiple of 3 x {heads} heads; the pruning is inconsistent")
        d = out // (3 * heads)
        attn.num_heads = heads
        for attr, value in (("head_dim", d), ("attn_dim", heads * d), ("dim", attn.qkv.in_features)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if d != d0:
            factor = math.sqrt(d / d0)
            with torch.no_grad():
                attn.qkv.weight[: heads * d].mul_(factor)
                if attn.qkv.bias is not None:
                    attn.qkv.bias[: heads * d].mul_(factor)
        attn.scale = d ** -0.5


def slice_bias_tables(model: nn.Module, history: Sequence[Sequence[Any]], head_dims: Mapping[str, int],
                      old_heads: Mapping[str, int]) -> None:
    """After whole-head removal, keep the relative-position-bias columns (one per head, Swin) of the heads kept.

    ``history`` is Torch-Pruning's pruning history ``[module name, is_out, indices]`` (it records each group's
    root: for an attention group, the input channels of ``proj``, head-major; or the output rows of ``qkv``); a head
    went with its channels. ``head_dims`` and ``old_heads`` are the attention modules' values before pruning.
    """
    for name, d in head_dims.items():
        attn: Any = model.get_submodule(name)
        table = getattr(attn, "relative_position_bias_table", None)
        if not isinstance(table, torch.Tensor) or table.shape[-1] == attn.num_heads:
            continue
        h0 = int(old_heads[name])
        gone = {int(i) // d % h0 for n, out, idxs in history if (n, bool(out)) in ((f"{name}.proj", False), (f"{name}.qkv", True))
                for i in idxs}
        keep = [h for h in range(h0) if h not in gone]
        if len(keep) != attn.num_heads:
            raise MixMatchError(f"{name}: {len(keep)} heads kept by the history but {attn.num_heads} in the module; "
                                "the pruning is inconsistent")
        attn.relative_position_bias_table = nn.Parameter(table.detach()[..., keep].clone(), requires_grad=table.requires_grad)


def fix_dims(model: nn.Module) -> None:
    """Keep informational ``dim`` attributes of Swin blocks/stages in step with their layers."""
    m: Any
    for m in model.modules():
        norm1 = getattr(m, "norm1", None)
        if hasattr(m, "dim") and isinstance(norm1, nn.LayerNorm) and isinstance(m.dim, int):
            m.dim = int(norm1.normalized_shape[-1])


def safe_deepcopy(obj: T, model: nn.Module | None = None) -> T:
    """``copy.deepcopy(obj)`` (``obj`` is ``model`` or holds it) that also works after an eval-mode forward with gradients on.

    timm's LeViT, EfficientFormer and TinyViT then cache ``attention_biases[:, idxs]``, a non-leaf tensor
    that ``deepcopy`` refuses; the copy gets detached clones of such tensors and ``model`` is not changed.
    """
    memo: dict[int, Any] = {}
    root: Any = model if model is not None else obj
    for m in root.modules():
        for v in m.__dict__.values():
            for t in v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(t, torch.Tensor) and not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(obj, memo)


def clear_caches(model: nn.Module) -> None:
    """Empty timm's attention-bias caches (stale once a model is pruned, and non-leaf after a traced forward)."""
    m: Any
    for m in model.modules():
        if isinstance(getattr(m, "attention_bias_cache", None), dict):
            m.attention_bias_cache = {}


def _sorted_layernorm_prune(self: Any, layer: Any, idxs: Sequence[int]) -> Any:
    # Torch-Pruning 1.6.1 calls ``keep_idxs.sort()`` (not in place): the kept weights come out in set order.
    dim = self.pruning_dim
    if len(layer.normalized_shape) < -dim:
        return layer
    keep_idxs = torch.tensor(sorted(set(range(layer.normalized_shape[dim])) - {int(i) for i in idxs}), dtype=torch.long)
    if layer.elementwise_affine:
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep_idxs, dim)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep_idxs, dim)
    shape = list(layer.normalized_shape)
    shape[dim] = len(keep_idxs)
    layer.normalized_shape = tuple(shape)
    return layer


if tp.__version__.startswith("1.6."):  # the same function object: importances that compare handlers still match
    tp.pruner.function.LayernormPruner.prune_out_channels.__code__ = _sorted_layernorm_prune.__code__
