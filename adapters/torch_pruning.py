"""Mix-and-Match for Torch-Pruning 1.6.1: structured pruning by a strategy, one ratio per dependency group.

A Mix-and-Match strategy says how sparse each *layer* should be (unstructured, per weight tensor).
Structured pruning removes whole channels, and Torch-Pruning's ``DependencyGraph`` couples layers
that must lose the same channels (a residual stream, a conv and its BatchNorm, ``qkv`` and ``proj``
of one attention block). This adapter translates the strategy **per dependency group**:

* **Members.** A group removes channels from the *outputs* of its producers (the Conv/Linear
  layers whose output channels it removes) and from the inputs of its consumers. Each layer's outputs
  belong to exactly one group, so the producers partition the strategy's layers.
* **Fold rule** (``fold="mean"``, the default): the group's channel ratio is the parameter-weighted
  mean of its producers' targets, ``r_G = Σ n_l ρ_l / Σ n_l`` (``n_l`` = weights of layer ``l``).
  ``fold="min"`` and ``fold="max"`` take the most protective or the most aggressive producer instead.
  Producers that the strategy does not cover (or that are ignored) count with target 0.
* **Clamp.** The kept channel count is ``round(C·(1 - r_G))``, rounded to the nearest multiple of
  ``round_to``, and never below one channel (or ``round_to`` channels, or one channel per head);
  ``max_ratio`` caps it too. Torch-Pruning would otherwise skip a group that would vanish, silently.
* **Exact hand-over.** The ratio written to the dict is ``(C - keep) / C`` nudged down by one ulp
  where needed, so Torch-Pruning's ``keep = floor(C·(1 - r))`` gives exactly ``keep``.

Public API:

* :func:`pruning_ratio_dict` -- ``{module: ratio}``, one leaf Conv/Linear key per group, for your own
  ``tp.pruner.MetaPruner``; :func:`pruner_kwargs` gives every keyword that dict needs
  (``num_heads``, ``ignored_layers``, ``customized_pruners``, ``unwrapped_parameters`` ...);
  :func:`attention_head_dims` and :func:`fix_attention` repair timm attention after your ``step()``;
  :func:`plan_groups` shows the groups and their planned ratios.
* :func:`prune` -- prunes a copy (or the model, ``inplace=True``) and returns a :class:`TPResult` with the
  pruned model and a :class:`PruneReport` (parameters and MACs before/after, planned and realized
  ratio per group, importance used, consistency error).
* :func:`zeroed_reference` -- the original model with the removed channels zeroed: the pruned model's
  output must equal it (``prune(verify=True)`` checks it on ``example_inputs``).

Architecture handling for timm 1.0.31 (all found on real models; see REFERENCE section 4):

* ViT/DeiT ``Attention`` and Swin ``WindowAttention``: ``num_heads={attn.qkv: attn.num_heads}``; after
  pruning ``num_heads``, ``head_dim``, ``attn_dim`` (and ``dim``) are set from the new ``qkv``.
  timm's fused attention uses ``1/sqrt(head_dim)`` of the *current* tensor, so pruning head_dim
  would silently change the softmax temperature: the query rows of ``qkv`` are rescaled by
  ``sqrt(d'/d)`` and ``scale`` set to ``d'^-0.5``, which keeps the original logits on both paths.
* Whole-head removal (``prune_heads=True``) for ViT/DeiT; for Swin it raises (the relative-position
  bias tables are per head); head_dim pruning works for both.
* Swin ``PatchMerging``: a custom pruner (its input channels repeat 4× into ``norm`` and ``reduction``;
  ``dim``/``out_dim`` are updated); every ``relative_position_bias_table`` is ignored.
* Classifier heads are ignored, tuple heads included (DeiT-distilled ``head`` and ``head_dist``).
* Free parameters (``pos_embed``, ``cls_token``, ``dist_token``, ``reg_token``, layer-scale ``gamma``)
  are passed as ``unwrapped_parameters`` with their channel dimension, as a list of ``(param, dim)``.
* Any other module that holds heads (``num_heads``) is refused with an error naming it, unless you
  ignore it; a model whose pruned output does not match the zeroed reference is refused with an error
  naming the modules Torch-Pruning had to guess about. A silently broken model is never returned.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.batches import LossFn, default_loss, iterate, model_device, to_device
from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.inventory import check_untied, inventory
from mixmatch_plugin.masks import check_strategy
from mixmatch_plugin.strategies import Strategy

logger = logging.getLogger(__name__)

FOLDS = ("mean", "min", "max")
IMPORTANCES = ("auto", "magnitude", "taylor", "gradient")
_TOKEN_PARAMS = ("pos_embed", "cls_token", "dist_token", "reg_token")


# ------------------------------------------------------------------------------------------ timm support
def _timm_classes() -> dict[str, tuple[Any, ...]]:
    """The timm classes this adapter knows; empty tuples when timm (or a class) is missing."""
    out: dict[str, tuple[Any, ...]] = {"attention": (), "window_attention": (), "patch_merging": (), "layernorm2d": ()}
    try:
        from timm.layers import Attention

        out["attention"] = (Attention,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    try:
        from timm.models.swin_transformer import PatchMerging, WindowAttention

        out["window_attention"] = (WindowAttention,)
        out["patch_merging"] = (PatchMerging,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from timm.layers import LayerNorm2d

        out["layernorm2d"] = (LayerNorm2d,)
    except ImportError:  # pragma: no cover
        pass
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

    def get_in_channels(self, layer: Any) -> int:
        return int(layer.dim)


# --------------------------------------------------------------------------------------------- data types
@dataclass
class GroupPlan:
    """One dependency group and the ratio planned for it.

    Attributes:
        key: name of the leaf Conv/Linear module that carries the group's entry in the ratio dict.
        producers: layers whose output channels the group removes.
        consumers: layers whose input channels the group removes.
        channels: channels per channel group (for attention: head_dim; else the group's width).
        channel_groups: 1, the number of heads, or the conv ``groups`` (each loses the same channels).
        targets: the strategy's target per producer.
        target: the folded ratio before clamping.
        keep: channels (per channel group) planned to remain; heads when ``heads`` is set.
        ratio: the ratio handed to Torch-Pruning, ``(channels - keep) / channels``.
        heads: for whole-head removal, the number of heads (``keep`` then counts heads).
        clamped: why the ratio differs from ``target`` beyond rounding (``min-keep``, ``max_ratio``), or "".
    """

    key: str
    producers: list[str]
    consumers: list[str]
    channels: int
    channel_groups: int
    targets: dict[str, float]
    target: float
    keep: int
    ratio: float
    heads: int = 0
    clamped: str = ""
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "producers": self.producers, "consumers": self.consumers, "channels": self.channels,
            "channel_groups": self.channel_groups, "target": self.target, "keep": self.keep, "ratio": self.ratio,
            "heads": self.heads, "clamped": self.clamped,
        }


@dataclass
class GroupResult:
    """Planned against realized pruning of one group (realized = removed / original, per channel group).

    ``unit`` is ``ch`` (channels per channel group; head_dim for attention) or ``heads``.
    """

    key: str
    producers: list[str]
    channels: int
    planned: float
    realized: float
    kept: int
    target: float
    clamped: str = ""
    unit: str = "ch"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PruneReport:
    """What :func:`prune` did: sizes before/after, per-group ratios and the importance criterion."""

    strategy: str
    signal: str
    importance: str
    fold: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: list[GroupResult]
    seconds_groups: float = 0.0
    seconds_prune: float = 0.0
    consistency: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def params_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "groups"}
        d["groups"] = [g.to_dict() for g in self.groups]
        d["params_ratio"], d["macs_ratio"] = self.params_ratio, self.macs_ratio
        return d

    def summary(self) -> str:
        """A short multi-line text: totals, then one line per group that was pruned."""
        lines = [
            f"strategy {self.strategy} (signal {self.signal}), importance {self.importance}, fold {self.fold}",
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.1%}); "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.1%})",
        ]
        if self.consistency is not None:
            lines.append(f"consistency: max relative difference to the channel-zeroed original {self.consistency:.2e}")
        for g in self.groups:
            if g.planned > 0 or g.realized > 0:
                lines.append(
                    f"  {g.key:<40} {g.channels:>5} {g.unit:<5} target {g.target:.3f}  planned {g.planned:.3f}  "
                    f"realized {g.realized:.3f}" + (f"  ({g.clamped})" if g.clamped else "")
                )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class TPResult:
    """The pruned model, its report, and what was removed.

    Attributes:
        model: the pruned model.
        report: sizes, per-group ratios, importance, consistency.
        removed: removed channels in the original numbering (for :func:`zeroed_reference`).
        history: Torch-Pruning's pruning history ``[module name, is_out, indices]`` (for :func:`rebuild`).
        num_heads: head count of every timm attention module after pruning.
    """

    model: nn.Module
    report: PruneReport
    removed: list[RemovedItem]
    history: list[list[Any]] = field(default_factory=list)
    num_heads: dict[str, int] = field(default_factory=dict)


@dataclass
class RemovedItem:
    """Channels one pruning operation removed, in the original model's numbering.

    ``target`` is a module name, or a parameter name when ``is_param``; ``side`` is ``out`` or ``in``;
    ``kind`` names the Torch-Pruning handler (``conv``, ``linear``, ``batchnorm``, ``layernorm``,
    ``parameter``, ``patchmerging`` ...); ``dim`` is the pruned dimension of a parameter.
    """

    target: str
    side: str
    kind: str
    idxs: list[int]
    is_param: bool = False
    dim: int = 0


# --------------------------------------------------------------------------------------- configuration
@dataclass
class _Setup:
    """Everything a MetaPruner needs for this model, built once per model instance."""

    ignored: list[nn.Module]
    ignored_params: list[nn.Parameter]
    num_heads: dict[nn.Module, int]
    attentions: dict[str, nn.Module]
    customized: dict[Any, tp.pruner.BasePruningFunc]
    unwrapped: list[tuple[nn.Parameter, int]]
    guessed: list[str]
    swin: bool


def _classifiers(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_classifier", None)
    heads: list[nn.Module] = []
    if callable(get):
        try:
            c = get()
        except Exception:  # a model's own helper may fail; fall back to the inventory
            c = None
        for m in c if isinstance(c, (tuple, list)) else [c]:
            if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
                heads.append(m)
    if not heads:
        for layer in inventory(model):
            if layer.role == "head":
                heads.append(model.get_submodule(layer.name))
    return heads


def _check_ignored(items: Iterable[Any] | None) -> tuple[list[nn.Module], list[nn.Parameter]]:
    mods: list[nn.Module] = []
    params: list[nn.Parameter] = []
    for it in items or ():
        if isinstance(it, nn.Parameter):
            params.append(it)
        elif isinstance(it, nn.Module):
            mods.append(it)
        elif isinstance(it, type):
            raise MixMatchError(
                f"ignored_layers contains the type {it.__name__}: Torch-Pruning silently drops types; "
                "pass module instances (e.g. [m for m in model.modules() if isinstance(m, T)]) or Parameters"
            )
        else:
            raise MixMatchError(
                f"ignored_layers contains {type(it).__name__}; pass nn.Module instances or nn.Parameters"
            )
    return mods, params


def _setup(model: nn.Module, ignored_layers: Iterable[Any] | None, prune_heads: bool, ignore_heads: bool) -> _Setup:
    known = _timm_classes()
    user_mods, user_params = _check_ignored(ignored_layers)
    ignored = list(user_mods) + (_classifiers(model) if ignore_heads else [])
    ignored_ids = {id(s) for m in ignored for s in m.modules()}
    ignored_params = list(user_params)

    num_heads: dict[nn.Module, int] = {}
    attentions: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    swin = False
    m: Any
    for name, m in model.named_modules():
        if isinstance(m, known["attention"] + known["window_attention"]):
            if isinstance(m, known["attention"]) and not isinstance(getattr(m, "q_norm", nn.Identity()), nn.Identity):
                if id(m.qkv) not in ignored_ids:
                    unsupported.append(f"{name} ({type(m).__name__} with qk_norm)")
                continue
            if getattr(m, "gate", None) is not None and id(m.qkv) not in ignored_ids:
                unsupported.append(f"{name} ({type(m).__name__} with a gate)")
                continue
            num_heads[m.qkv] = int(m.num_heads)
            attentions[name] = m
            if isinstance(m, known["window_attention"]):
                swin = True
                ignored_params.append(m.relative_position_bias_table)
        elif isinstance(getattr(m, "num_heads", None), int) and id(m) not in ignored_ids:
            lin = [c for c in m.modules() if isinstance(c, (nn.Linear, nn.Conv2d, nn.Conv1d)) and id(c) not in ignored_ids]
            if lin:
                unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise MixMatchError(
            f"unsupported layer {unsupported[0]}"
            + (f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else "")
            + ": its head attributes would not be updated after pruning; pass the module in ignored_layers "
            "to keep it intact, or use the plain PyTorch backend (mm.apply)"
        )
    if prune_heads and swin:
        raise MixMatchError(
            "whole-head removal is not supported for Swin (each relative_position_bias_table has one column per "
            "head and Torch-Pruning cannot keep it in step); use prune_heads=False, which prunes head_dim"
        )

    customized: dict[Any, tp.pruner.BasePruningFunc] = {}
    if known["patch_merging"] and any(isinstance(m, known["patch_merging"]) for m in model.modules()):
        customized[known["patch_merging"][0]] = PatchMergingPruner()

    # Free parameters: every parameter not owned by a module type Torch-Pruning prunes itself.
    registered = tuple(
        tp.ops.type2class(t) for t in tp.pruner.function.PrunerBox if tp.ops.type2class(t) is not None
    )
    cust_types = tuple(t for t in customized if isinstance(t, type))
    ignored_param_ids = {id(p) for p in ignored_params}
    unwrapped: list[tuple[nn.Parameter, int]] = []
    guessed: list[str] = []
    for mname, m in model.named_modules():
        if isinstance(m, registered) and tp.ops.module2type(m) != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        if isinstance(m, cust_types):
            continue
        if any(isinstance(a, cust_types) for a in _ancestors(model, mname)):
            continue
        for pname, p in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in ignored_param_ids:
                continue
            if pname in _TOKEN_PARAMS and p.dim() >= 2:
                unwrapped.append((p, p.dim() - 1))
            elif p.dim() == 1:
                unwrapped.append((p, 0))  # layer-scale gamma and other per-channel vectors
            else:
                dims = [i for i, s in enumerate(p.shape) if s > 1]
                if dims:
                    unwrapped.append((p, dims[-1]))
                    guessed.append(f"{full} ({type(m).__name__}, shape {tuple(p.shape)})")
    if guessed:
        logger.info("free parameters whose channel dimension is guessed (last non-singleton): %s", ", ".join(guessed))
    return _Setup(ignored, ignored_params, num_heads, attentions, customized, unwrapped, guessed, swin)


def _attn_items(setup: _Setup) -> list[tuple[str, Any]]:
    return list(setup.attentions.items())


def _head_dims(setup: _Setup) -> dict[str, int]:
    out: dict[str, int] = {}
    for n, a in setup.attentions.items():
        attn: Any = a
        out[n] = int(attn.qkv.out_features) // (3 * int(attn.num_heads))
    return out


def _width(module: nn.Module) -> int:
    """Output width of a Conv or Linear."""
    m: Any = module
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def _translate(model: nn.Module, copy_: nn.Module, items: Sequence[Any]) -> list[Any]:
    """The modules and Parameters of ``copy_`` that correspond (by name) to ``items`` of ``model``."""
    mods = {id(m): n for n, m in model.named_modules()}
    params = {id(p): n for n, p in model.named_parameters()}
    out: list[Any] = []
    for it in items:
        if isinstance(it, nn.Parameter) and id(it) in params:
            out.append(copy_.get_parameter(params[id(it)]))
        elif isinstance(it, nn.Module) and id(it) in mods:
            out.append(copy_.get_submodule(mods[id(it)]))
        elif isinstance(it, (nn.Module, nn.Parameter)):
            raise MixMatchError(f"ignored_layers contains a {type(it).__name__} that is not part of the model")
        else:
            out.append(it)  # refused with a message by _check_ignored
    return out


def _ancestors(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _build_pruner(
    model: nn.Module,
    example_inputs: Any,
    setup: _Setup,
    importance: Any,
    ratio_dict: Mapping[nn.Module, float] | None,
    head_dict: Mapping[nn.Module, float] | None,
    prune_heads: bool,
    forward_fn: Callable[..., Any] | None,
) -> tp.pruner.MetaPruner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        return tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=importance,
            pruning_ratio=0.0,  # every group has an entry; anything else must stay intact
            pruning_ratio_dict=dict(ratio_dict) if ratio_dict else None,
            max_pruning_ratio=1.0,  # it would not cap dict ratios anyway (TP issue 448): clamped here instead
            ignored_layers=list(setup.ignored) + list(setup.ignored_params),
            round_to=None,  # rounding is planned here, to the nearest multiple, not TP's floor
            in_channel_groups={},  # fresh dicts: TP's defaults are shared mutable objects
            out_channel_groups={},
            num_heads=dict(setup.num_heads),
            prune_num_heads=prune_heads,
            prune_head_dims=not prune_heads,
            head_pruning_ratio_dict=dict(head_dict) if head_dict else None,
            customized_pruners=dict(setup.customized),
            unwrapped_parameters=list(setup.unwrapped),
            forward_fn=forward_fn,
        )


# ----------------------------------------------------------------------------------------- planning
def fold_ratio(targets: Mapping[str, float], weights: Mapping[str, int], fold: str = "mean") -> float:
    """Fold the targets of a group's producers into one channel ratio.

    ``mean``: parameter-weighted mean ``Σ n_l ρ_l / Σ n_l``; ``min``/``max``: the smallest/largest target.
    An empty group folds to 0.
    """
    if fold not in FOLDS:
        raise MixMatchError(f"fold must be one of {', '.join(FOLDS)}, got {fold!r}")
    if not targets:
        return 0.0
    if fold == "min":
        return min(targets.values())
    if fold == "max":
        return max(targets.values())
    total = sum(weights[n] for n in targets)
    if total <= 0:
        return 0.0
    return sum(targets[n] * weights[n] for n in targets) / total


def _tp_ratio(channels: int, keep: int) -> float:
    """The ratio r for which Torch-Pruning keeps exactly ``keep`` of ``channels`` (``floor(C·(1-r))``)."""
    if keep >= channels:
        return 0.0
    r = (channels - keep) / channels
    while int(channels * (1 - r)) < keep:
        r = math.nextafter(r, 0.0)
    return r


def _plan_keep(channels: int, target: float, min_keep: int, round_to: int | None, max_ratio: float) -> tuple[int, str]:
    """Channels to keep: the nearest count (or multiple of ``round_to``), at least ``min_keep`` and the ``max_ratio`` floor."""
    keep = round(channels * (1.0 - target))
    cap = math.ceil(channels * (1.0 - max_ratio) - 1e-9)
    if round_to and round_to > 1:
        keep = round_to * round(keep / round_to)
        cap = round_to * math.ceil(cap / round_to)
    lowest = max(min_keep, cap)
    why = ""
    if keep < lowest:
        keep, why = lowest, ("min-keep" if min_keep >= cap else "max_ratio")
    return min(keep, channels), why


def _analyse(
    pruner: tp.pruner.MetaPruner,
    model: nn.Module,
    strategy: Strategy,
    setup: _Setup,
    *,
    fold: str,
    round_to: int | None,
    max_ratio: float,
    prune_heads: bool,
) -> list[GroupPlan]:
    names = {m: n for n, m in model.named_modules()}
    params = {n: int(m.weight.numel()) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    DG = pruner.DG
    plans: list[GroupPlan] = []
    for group in DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        producers: list[str] = []
        consumers: list[str] = []
        key_mod: Any = None
        qkv: Any = None
        for dep, _ in group:
            mod = dep.target.module
            if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            n = names.get(mod)
            if n is None:
                continue
            if DG.is_out_channel_pruning_fn(dep.handler):
                if n not in producers:
                    producers.append(n)
                if key_mod is None:
                    key_mod = mod
                if mod in setup.num_heads:
                    qkv = mod
            elif n not in consumers:
                consumers.append(n)
        if key_mod is None:
            continue
        key = names[key_mod]
        ch_groups = int(pruner._get_channel_groups(group))
        width = int(DG.get_out_channels(key_mod))
        channels = width // max(ch_groups, 1)
        if qkv is not None:  # TP ranks head dims: proj's inputs, num_heads groups of head_dim
            ch_groups = int(setup.num_heads[qkv])
            channels = int(qkv.out_features) // (3 * ch_groups)
            key_mod = qkv
        targets = {p: float(strategy.ratios.get(p, 0.0)) for p in producers if p not in _ignored_names(model, pruner)}
        target = fold_ratio(targets, params, fold)
        if qkv is not None and prune_heads:
            heads = int(setup.num_heads[qkv])
            keep, why = _plan_keep(heads, target, 1, None, max_ratio)
            ratio = (heads - keep) / heads
            plans.append(GroupPlan(key, producers, consumers, channels, ch_groups, targets, target, keep, ratio,
                                   heads=heads, clamped=why, module=key_mod))
            continue
        min_keep = max(1, round_to or 1)
        keep, why = _plan_keep(channels, target, min_keep, round_to, max_ratio)
        plans.append(GroupPlan(key, producers, consumers, channels, ch_groups, targets, target, keep,
                               _tp_ratio(channels, keep), clamped=why, module=key_mod))
    return plans


def _ignored_names(model: nn.Module, pruner: tp.pruner.MetaPruner) -> set[str]:
    cached = getattr(pruner, "_mixmatch_ignored_names", None)
    if cached is None:
        ids = {id(m) for m in pruner.ignored_layers}
        cached = {n for n, m in model.named_modules() if id(m) in ids}
        pruner._mixmatch_ignored_names = cached
    return cached


def _check_strategy(model: nn.Module, strategy: Strategy) -> None:
    if not isinstance(strategy, Strategy):
        raise MixMatchError(f"strategy must be a mixmatch_plugin Strategy (plan.strategy(name)), got {type(strategy).__name__}")
    layers = inventory(model)
    check_untied(layers, "Torch-Pruning")
    check_strategy(strategy, layers, complete=False)


def _check_opts(fold: str, round_to: int | None, max_ratio: float) -> None:
    if fold not in FOLDS:
        raise MixMatchError(f"fold must be one of {', '.join(FOLDS)}, got {fold!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise MixMatchError(f"round_to must be a positive integer or None, got {round_to!r}")
    if not (0.0 <= max_ratio < 1.0):
        raise MixMatchError(f"max_ratio must lie in [0, 1), got {max_ratio!r}")


def plan_groups(
    model: nn.Module,
    strategy: Strategy,
    example_inputs: Any,
    *,
    fold: str = "mean",
    round_to: int | None = None,
    max_ratio: float = 0.95,
    prune_heads: bool = False,
    ignored_layers: Sequence[Any] | None = None,
    ignore_classifier: bool = True,
    forward_fn: Callable[..., Any] | None = None,
) -> list[GroupPlan]:
    """The dependency groups of ``model`` and the ratio planned for each (see the module docstring).

    The model is traced once (in eval mode, restored afterwards) and not otherwise changed.
    """
    _check_strategy(model, strategy)
    _check_opts(fold, round_to, max_ratio)
    was_training = model.training
    try:
        setup = _setup(model, ignored_layers, prune_heads, ignore_classifier)
        pruner = _build_pruner(model, example_inputs, setup, tp.importance.GroupMagnitudeImportance(p=1), None, None,
                               prune_heads, forward_fn)
        return _analyse(pruner, model, strategy, setup, fold=fold, round_to=round_to, max_ratio=max_ratio,
                        prune_heads=prune_heads)
    finally:
        model.train(was_training)


def pruner_kwargs(
    model: nn.Module,
    strategy: Strategy,
    example_inputs: Any,
    *,
    fold: str = "mean",
    round_to: int | None = None,
    max_ratio: float = 0.95,
    prune_heads: bool = False,
    ignored_layers: Sequence[Any] | None = None,
    ignore_classifier: bool = True,
    forward_fn: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``tp.pruner.MetaPruner(model, example_inputs, importance=..., **kwargs)``.

    They carry the Mix-and-Match ratios (``pruning_ratio_dict``, and ``head_pruning_ratio_dict`` with
    ``prune_heads``), ``pruning_ratio=0.0`` so that no group falls back to a default ratio, the heads
    of every attention layer, the ignored classifier(s) and relative-position tables, the Swin
    ``PatchMerging`` pruner, the free parameters as a list of ``(param, dim)``, and fresh channel-group
    dicts. After ``pruner.step()`` call :func:`fix_attention` (timm attention attributes) yourself.

    Example::

        from mixmatch_plugin.adapters import torch_pruning as mm_tp
        kw = mm_tp.pruner_kwargs(model, strategy, x)
        dims = mm_tp.attention_head_dims(model)          # before pruning
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), **kw)
        pruner.step()
        mm_tp.fix_attention(model, dims)
    """
    _check_strategy(model, strategy)
    _check_opts(fold, round_to, max_ratio)
    was_training = model.training
    try:
        setup = _setup(model, ignored_layers, prune_heads, ignore_classifier)
        pruner = _build_pruner(model, example_inputs, setup, tp.importance.GroupMagnitudeImportance(p=1), None, None,
                               prune_heads, forward_fn)
        plans = _analyse(pruner, model, strategy, setup, fold=fold, round_to=round_to, max_ratio=max_ratio,
                         prune_heads=prune_heads)
    finally:
        model.train(was_training)
    return _kwargs_from(setup, plans, prune_heads, forward_fn)


def _kwargs_from(setup: _Setup, plans: Sequence[GroupPlan], prune_heads: bool, forward_fn: Any) -> dict[str, Any]:
    ratio_dict: dict[nn.Module, float] = {}
    head_dict: dict[nn.Module, float] = {}
    for p in plans:
        assert p.module is not None
        if p.heads:
            removed = p.heads - p.keep
            # TP removes ceil(r·H) heads, and only when the group's width ratio is > 0.
            head_dict[p.module] = (removed - 0.5) / p.heads if removed else 0.0
            ratio_dict[p.module] = 0.5 if removed else 0.0
        else:
            ratio_dict[p.module] = p.ratio
    return {
        "pruning_ratio": 0.0,
        "pruning_ratio_dict": ratio_dict,
        "max_pruning_ratio": 1.0,
        "ignored_layers": list(setup.ignored) + list(setup.ignored_params),
        "in_channel_groups": {},
        "out_channel_groups": {},
        "num_heads": dict(setup.num_heads),
        "prune_num_heads": prune_heads,
        "prune_head_dims": not prune_heads,
        "head_pruning_ratio_dict": head_dict or None,
        "customized_pruners": dict(setup.customized),
        "unwrapped_parameters": list(setup.unwrapped),
        "forward_fn": forward_fn,
    }


def pruning_ratio_dict(
    model: nn.Module,
    strategy: Strategy,
    example_inputs: Any,
    *,
    fold: str = "mean",
    round_to: int | None = None,
    max_ratio: float = 0.95,
    prune_heads: bool = False,
    ignored_layers: Sequence[Any] | None = None,
    ignore_classifier: bool = True,
    forward_fn: Callable[..., Any] | None = None,
) -> dict[nn.Module, float]:
    """``{module: ratio}`` for ``tp.pruner.MetaPruner(pruning_ratio_dict=...)``: one entry per dependency group.

    Keys are leaf Conv/Linear modules of ``model`` (never strings, never containers, which would
    spread the ratio to every submodule). Every prunable group has an entry (0.0 for groups left
    intact); pass ``pruning_ratio=0.0`` and the same ``ignored_layers``/``num_heads`` as
    :func:`pruner_kwargs` returns, or simply use :func:`pruner_kwargs`. Ratios are fractions of the
    original width, clamped so that at least one channel (``round_to`` channels, one head_dim per
    head) remains, and exact under Torch-Pruning's ``floor``.
    """
    if prune_heads:
        raise MixMatchError(
            "whole-head removal needs head_pruning_ratio_dict and prune_num_heads as well: use pruner_kwargs(...), "
            "which returns all of them"
        )
    kw = pruner_kwargs(
        model, strategy, example_inputs, fold=fold, round_to=round_to, max_ratio=max_ratio,
        ignored_layers=ignored_layers, ignore_classifier=ignore_classifier, forward_fn=forward_fn,
    )
    return dict(kw["pruning_ratio_dict"])


# --------------------------------------------------------------------------------------- importance
class GroupGradientImportance(tp.importance.GroupMagnitudeImportance):
    """Group importance from mean absolute gradients ``|dL/dw|`` (the plugin's ``gradient`` signal).

    Same contract as Torch-Pruning's importances: ``__call__(group)`` returns one score per channel of
    the group, the mean over its Conv/Linear/BatchNorm/LayerNorm members. ``scores`` maps a parameter
    to a tensor of its shape (filled by :func:`prune` from the calibration batches).
    """

    def __init__(self, scores: Mapping[nn.Parameter, torch.Tensor], normalizer: str | None = "mean") -> None:
        super().__init__(p=1, group_reduction="mean", normalizer=normalizer)
        self.scores = {id(p): s for p, s in scores.items()}

    def _score(self, p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else self.scores.get(id(p))

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        F = tp.pruner.function
        imps: list[torch.Tensor] = []
        idx_lists: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer: Any = dep.target.module
            fn, root_idxs = dep.handler, group[i].root_idxs
            if not isinstance(layer, tuple(self.target_types)):
                continue
            s = self._score(getattr(layer, "weight", None))
            if s is None:
                continue
            if fn in (F.prune_conv_out_channels, F.prune_linear_out_channels):
                t = s.transpose(0, 1) if getattr(layer, "transposed", False) else s
                imps.append(t[idxs].flatten(1).sum(1))
            elif fn in (F.prune_conv_in_channels, F.prune_linear_in_channels):
                t = s.flatten(1) if getattr(layer, "transposed", False) else s.transpose(0, 1).flatten(1)
                local = t.sum(1)
                groups = int(getattr(layer, "groups", 1))
                if fn == F.prune_conv_in_channels and groups not in (1, int(getattr(layer, "in_channels", 1))):
                    local = local.repeat(groups)
                imps.append(local[idxs])
            elif fn in (F.prune_batchnorm_out_channels, F.prune_layernorm_out_channels) and s.dim() == 1:
                imps.append(s[idxs])
            else:
                continue
            idx_lists.append(root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, idx_lists), self.normalizer)


def _calibrate(model: nn.Module, calib: Iterable[Any], loss_fn: LossFn | None, max_batches: int | None) -> dict[nn.Parameter, torch.Tensor]:
    """Fill ``.grad`` with the gradient of the mean loss and return the mean |grad| per parameter."""
    loss_fn = loss_fn or default_loss
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [to_device(b, device) for b in iterate(calib, max_batches)]
    abs_acc = [torch.zeros_like(p) for p in params]
    sum_acc = [torch.zeros_like(p) for p in params]
    for b in batches:
        loss = loss_fn(model, b)
        if not torch.isfinite(loss):
            raise MixMatchError(f"the calibration loss is {float(loss)}; check the data and the model before pruning")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, s, g in zip(abs_acc, sum_acc, grads, strict=True):
            if g is not None:
                a.add_(g.abs())
                s.add_(g)
    for p, s in zip(params, sum_acc, strict=True):
        p.grad = s / len(batches)
    return {p: a / len(batches) for p, a in zip(params, abs_acc, strict=True)}


def _importance(choice: Any, signal: str) -> tuple[Any, str, bool]:
    """(importance object or None for gradient, its name, whether it needs a backward pass)."""
    if not isinstance(choice, str):
        if not callable(choice):
            raise MixMatchError("importance must be 'auto', 'magnitude', 'taylor', 'gradient' or a tp.importance object")
        return choice, type(choice).__name__, bool(getattr(choice, "needs_grad", isinstance(choice, tp.importance.GroupTaylorImportance)))
    if choice not in IMPORTANCES:
        raise MixMatchError(f"importance must be one of {', '.join(IMPORTANCES)} or a tp.importance object, got {choice!r}")
    if choice == "auto":
        choice = {"magnitude": "magnitude", "gradient": "gradient", "product": "taylor"}.get(signal, "magnitude")
    if choice == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=1), "GroupMagnitudeImportance(p=1)", False
    if choice == "taylor":
        return tp.importance.GroupTaylorImportance(), "GroupTaylorImportance", True
    return None, "GroupGradientImportance", True


# ------------------------------------------------------------------------------------------ pruning
def attention_head_dims(model: nn.Module) -> dict[str, int]:
    """``{name: head_dim}`` of every timm ``Attention``/``WindowAttention`` (call it before pruning)."""
    known = _timm_classes()
    out: dict[str, int] = {}
    m: Any
    for name, m in model.named_modules():
        if isinstance(m, known["attention"] + known["window_attention"]):
            out[name] = int(m.qkv.out_features) // (3 * int(m.num_heads))
    return out


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
        if hasattr(attn, "head_dim"):
            attn.head_dim = d
        if hasattr(attn, "attn_dim"):
            attn.attn_dim = heads * d
        if hasattr(attn, "dim"):
            attn.dim = attn.qkv.in_features
        if d != d0:
            factor = math.sqrt(d / d0)
            with torch.no_grad():
                attn.qkv.weight[: heads * d].mul_(factor)
                if attn.qkv.bias is not None:
                    attn.qkv.bias[: heads * d].mul_(factor)
        attn.scale = d ** -0.5


def _fix_dims(model: nn.Module) -> None:
    """Keep informational ``dim`` attributes of Swin blocks/stages in step with their layers."""
    m: Any
    for m in model.modules():
        norm1 = getattr(m, "norm1", None)
        if hasattr(m, "dim") and isinstance(norm1, nn.LayerNorm) and isinstance(m.dim, int):
            m.dim = int(norm1.normalized_shape[-1])


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(MACs, params)`` of ``model`` on ``example_inputs`` by Torch-Pruning's counter (no gradients)."""
    was = model.training
    try:
        with torch.no_grad():
            macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(was)
    return int(macs), int(params)


def _record(group: Any, DG: Any, names: Mapping[int, str], pnames: Mapping[int, str]) -> list[RemovedItem]:
    out: list[RemovedItem] = []
    for dep, idxs in group:
        mod = dep.target.module
        fn = dep.handler
        side = "out" if DG.is_out_channel_pruning_fn(fn) else "in"
        owner = getattr(fn, "__self__", None)
        kind = type(owner).__name__.replace("Pruner", "").lower() if owner is not None else getattr(fn, "__name__", "?")
        if isinstance(mod, nn.Parameter):
            n = pnames.get(id(mod))
            if n is None:
                continue
            out.append(RemovedItem(n, side, "parameter", sorted(int(i) for i in idxs), True, int(dep.target.pruning_dim)))
        elif isinstance(mod, nn.Module) and id(mod) in names:
            if DG.is_out_channel_pruning_fn(fn) and DG.is_in_channel_pruning_fn(fn):
                side = "out"  # one function for both sides (norms, depthwise convs)
            if isinstance(owner, PatchMergingPruner):
                side = "out" if fn == owner.prune_out_channels else "in"
            out.append(RemovedItem(names[id(mod)], side, kind, sorted(int(i) for i in idxs)))
    return out


def coupled_channels(
    model: nn.Module, removed_out: Mapping[str, Sequence[int]], example_inputs: Any,
    *, forward_fn: Callable[..., Any] | None = None,
) -> list[RemovedItem]:
    """Everything that goes with removing output channels ``{conv_or_linear_name: [channel, ...]}``.

    Builds Torch-Pruning's dependency graph of ``model`` (traced once, eval mode, restored) and
    returns the removal records of each affected group: the coupled producers, BatchNorms, free
    parameters and consumers. Used by the NNI adapter to make channel masks match removal.
    """
    was = model.training
    try:
        setup = _setup(model, None, False, False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn, unwrapped_parameters=list(setup.unwrapped),
                customized_pruners=dict(setup.customized), ignored_params=list(setup.ignored_params), verbose=False,
            )
    finally:
        model.train(was)
    names = {id(m): n for n, m in model.named_modules()}
    pnames = {id(p): n for n, p in model.named_parameters()}
    out: list[RemovedItem] = []
    for name, idxs in removed_out.items():
        if not idxs:
            continue
        module = model.get_submodule(name)
        pruner = DG.get_pruner_of_module(module)
        group = DG.get_pruning_group(module, pruner.prune_out_channels, [int(i) for i in idxs])
        out.extend(_record(group, DG, names, pnames))
    return out


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def _run(model: nn.Module, example_inputs: Any, forward_fn: Callable[..., Any] | None) -> Any:
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def relative_difference(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` over all output tensors (``inf`` when the structures differ)."""
    ta, tb = _flat(a), _flat(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return math.inf
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        scale = float(y.detach().abs().max()) if y.numel() else 0.0
        diff = float((x.detach().float() - y.detach().float()).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-12))
    return worst


class _MaskedLayerNorm(nn.Module):
    """LayerNorm over the kept channels only; removed channels output 0 (the reference for removal)."""

    keep: torch.Tensor

    def __init__(self, ln: nn.Module, keep: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.ln: Any = ln
        self.channel_dim = channel_dim
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(self.channel_dim, -1)
        xs = x.index_select(-1, self.keep)
        w = self.ln.weight.index_select(0, self.keep) if self.ln.weight is not None else None
        b = self.ln.bias.index_select(0, self.keep) if self.ln.bias is not None else None
        y = nn.functional.layer_norm(xs, (xs.shape[-1],), w, b, self.ln.eps)
        out = torch.zeros_like(x)
        out.index_copy_(-1, self.keep, y)
        return out.movedim(-1, self.channel_dim)


def zeroed_reference(model: nn.Module, removed: Sequence[RemovedItem]) -> nn.Module:
    """A copy of the *original* model with every removed channel zeroed instead of removed.

    Producers lose their output rows (weights and biases), BatchNorm its scale and shift, free
    parameters their slices. A LayerNorm cannot be zeroed into removal (its statistics would still
    count the zeros), so it is replaced by one that normalizes over the kept channels: the only
    definition under which removal and zeroing can agree. Raises :class:`MixMatchError` for a module
    kind whose removal has no zeroed equivalent here.
    """
    ref = copy.deepcopy(model)
    ln2d = _timm_classes()["layernorm2d"]
    ln_removed: dict[str, set[int]] = {}
    with torch.no_grad():
        for item in removed:
            if item.is_param:
                p = ref.get_parameter(item.target)
                idx = torch.tensor(item.idxs, dtype=torch.long)
                p.index_fill_(item.dim, idx, 0.0)
                continue
            m: Any = ref.get_submodule(item.target)
            idx = torch.tensor(item.idxs, dtype=torch.long)
            if isinstance(m, nn.LayerNorm):
                ln_removed.setdefault(item.target, set()).update(item.idxs)
            elif item.kind == "patchmerging":
                if item.side == "out":
                    m.reduction.weight.index_fill_(0, idx, 0.0)
                else:
                    C = m.dim
                    ln_removed.setdefault(f"{item.target}.norm", set()).update(k * C + i for k in range(4) for i in item.idxs)
            elif item.side == "in":
                continue  # inputs are zero already: removing them changes nothing
            elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU,
                                nn.modules.instancenorm._InstanceNorm)):
                _zero_out(m, idx)
            elif isinstance(m, nn.Embedding):
                m.weight.index_fill_(1, idx, 0.0)
            else:
                raise MixMatchError(
                    f"unsupported layer {item.target} ({type(m).__name__}): removing its channels has no zeroed "
                    "equivalent, so the pruning cannot be verified; ignore it (ignored_layers) or use mm.apply"
                )
    for name, idxs in ln_removed.items():
        ln: Any = ref.get_submodule(name)
        n = int(ln.normalized_shape[-1])
        keep = torch.tensor(sorted(set(range(n)) - idxs), dtype=torch.long)
        dim = 1 if isinstance(ln, ln2d) else -1
        parent_name, _, child = name.rpartition(".")
        parent = ref.get_submodule(parent_name) if parent_name else ref
        setattr(parent, child, _MaskedLayerNorm(ln, keep, dim))
    return ref


def _zero_out(m: nn.Module, idx: torch.Tensor) -> None:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor):
        dim = 1 if getattr(m, "transposed", False) else 0
        w.index_fill_(dim, idx, 0.0)
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor):
        b.index_fill_(0, idx, 0.0)


def prune(
    model: nn.Module,
    strategy: Strategy,
    example_inputs: Any,
    *,
    calib: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = 8,
    importance: Any = "auto",
    fold: str = "mean",
    round_to: int | None = None,
    max_ratio: float = 0.95,
    prune_heads: bool = False,
    ignored_layers: Sequence[Any] | None = None,
    ignore_classifier: bool = True,
    forward_fn: Callable[..., Any] | None = None,
    inplace: bool = False,
    verify: bool = True,
    tolerance: float = 1e-4,
) -> TPResult:
    """Structurally prune ``model`` by ``strategy`` with Torch-Pruning; return the model and a report.

    Args:
        model: the model; a deep copy is pruned unless ``inplace=True``.
        strategy: a plan's strategy (per-layer targets, folded per dependency group; see the module doc).
        example_inputs: inputs for tracing (a tensor, a tuple of positional inputs, or a dict).
        calib: calibration batches ``(inputs, labels)``; needed for Taylor and gradient importance.
        loss_fn: ``loss_fn(model, batch)`` for those batches (default: cross-entropy).
        max_batches: calibration batches to use.
        importance: ``auto`` (magnitude → L1 group magnitude; product → Taylor; gradient → mean |grad|),
            ``magnitude``, ``taylor``, ``gradient``, or any Torch-Pruning importance object.
        fold: how a group's producer targets become one ratio (``mean``, ``min``, ``max``).
        round_to: keep channel counts at multiples of this (nearest multiple, at least one multiple).
        max_ratio: no group loses more than this fraction of its channels.
        prune_heads: remove whole attention heads instead of head dimensions (ViT/DeiT only).
        ignored_layers: modules or Parameters to keep intact (instances; types are refused).
        ignore_classifier: keep the classifier head(s) (``get_classifier()``, tuples included) intact.
        forward_fn: ``forward_fn(model, example_inputs)`` for models with unusual call signatures.
        inplace: prune ``model`` itself.
        verify: compare the pruned model with :func:`zeroed_reference` on ``example_inputs`` and raise
            if they differ by more than ``tolerance`` (relative); also runs a backward pass.

    Raises:
        MixMatchError: an unsupported layer (named), a strategy that does not fit the model, missing
            calibration data, or a pruned model that fails verification.
    """
    _check_strategy(model, strategy)
    _check_opts(fold, round_to, max_ratio)
    imp, imp_name, needs_grad = _importance(importance, strategy.signal)
    if needs_grad and calib is None:
        raise MixMatchError(
            f"importance {imp_name} needs calibration data for a backward pass: pass calib=<DataLoader> "
            "(or importance='magnitude')"
        )
    original_training = model.training
    work = model if inplace else copy.deepcopy(model)
    original = copy.deepcopy(model) if verify else None

    if not inplace and ignored_layers:
        ignored_layers = _translate(model, work, ignored_layers)
    t0 = time.perf_counter()
    try:
        macs0, params0 = count_macs(work, example_inputs)
    except Exception as exc:
        raise MixMatchError(
            f"the model does not run on example_inputs ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}); "
            "pass inputs of the shape the model expects"
        ) from None
    setup = _setup(work, ignored_layers, prune_heads, ignore_classifier)
    probe = _build_pruner(work, example_inputs, setup, tp.importance.GroupMagnitudeImportance(p=1), None, None,
                          prune_heads, forward_fn)
    plans = _analyse(probe, work, strategy, setup, fold=fold, round_to=round_to, max_ratio=max_ratio, prune_heads=prune_heads)
    kw = _kwargs_from(setup, plans, prune_heads, forward_fn)
    t_groups = time.perf_counter() - t0

    t1 = time.perf_counter()
    grad_scores: dict[nn.Parameter, torch.Tensor] = {}
    if needs_grad:
        assert calib is not None
        work.eval()
        grad_scores = _calibrate(work, calib, loss_fn, max_batches)
    if imp is None:
        imp = GroupGradientImportance(grad_scores)
    names = {id(m): n for n, m in work.named_modules()}
    pnames = {id(p): n for n, p in work.named_parameters()}
    head_dims = _head_dims(setup)
    out_before = {p.key: _width(work.get_submodule(p.key)) for p in plans}
    removed: list[RemovedItem] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        pruner = tp.pruner.MetaPruner(work, example_inputs, importance=imp, **kw)
    try:
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                removed.extend(_record(group, pruner.DG, names, pnames))
                group.prune()
    except Exception as exc:
        if inplace:
            raise MixMatchError(
                f"Torch-Pruning failed while pruning ({type(exc).__name__}: {str(exc)[:160]}); the model was pruned in "
                "place and may be partly pruned: reload it, and build a new pruner (a failed step() is used up)"
            ) from exc
        raise MixMatchError(
            f"Torch-Pruning failed while pruning ({type(exc).__name__}: {str(exc)[:160]}); your model is unchanged"
        ) from exc
    new_heads = {n: int(pruner.num_heads.get(a.qkv, a.num_heads)) for n, a in _attn_items(setup)}
    fix_attention(work, head_dims, new_heads)
    _fix_dims(work)
    for param in work.parameters():
        param.grad = None
    t_prune = time.perf_counter() - t1

    qkv_mods = {a.qkv for _, a in _attn_items(setup)}
    groups: list[GroupResult] = []
    for p in plans:
        now = _width(work.get_submodule(p.key))
        if p.heads:
            kept_heads = p.heads - round((out_before[p.key] - now) / max(out_before[p.key] / p.heads, 1))
            groups.append(GroupResult(p.key, p.producers, p.heads, (p.heads - p.keep) / p.heads,
                                      (p.heads - kept_heads) / p.heads, kept_heads, p.target, p.clamped, "heads"))
            continue
        kept = now // max(p.channel_groups, 1) // (3 if p.module in qkv_mods else 1)
        groups.append(GroupResult(p.key, p.producers, p.channels, (p.channels - p.keep) / p.channels,
                                  (p.channels - kept) / p.channels, kept, p.target, p.clamped))
    _check_runs(work, example_inputs, forward_fn, setup)
    macs1, params1 = count_macs(work, example_inputs)
    report = PruneReport(strategy.name, strategy.signal, imp_name, fold, params0, params1, macs0, macs1, groups,
                         t_groups, t_prune)
    if imp_name == "GroupTaylorImportance":
        report.notes.append("Torch-Pruning 1.6.1's Taylor importance skips BatchNorm members (it tests for GroupNorm)")
    mismatched = [g.key for g in groups if abs(g.kept - next(p.keep for p in plans if p.key == g.key)) > 0]
    if mismatched:
        raise MixMatchError(
            f"Torch-Pruning did not prune group {mismatched[0]} as planned (and {len(mismatched) - 1} more); "
            "this model is not supported by the adapter: use mm.apply (unstructured) instead"
        )

    work.train(original_training)
    if verify:
        assert original is not None
        report.consistency = _verify(original, work, removed, example_inputs, forward_fn, setup, tolerance)
    logger.info("pruned %s: params %.1f%%, MACs %.1f%%", strategy.name, 100 * report.params_ratio, 100 * report.macs_ratio)
    history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in pruner.pruning_history()]
    return TPResult(work, report, removed, history, new_heads)


def rebuild(
    model: nn.Module,
    history: Sequence[Sequence[Any]],
    example_inputs: Any,
    num_heads: Mapping[str, int] | None = None,
    *,
    ignored_layers: Sequence[Any] | None = None,
    ignore_classifier: bool = True,
    forward_fn: Callable[..., Any] | None = None,
) -> nn.Module:
    """Re-apply a pruning history (:attr:`TPResult.history`) to a freshly built original model, in place.

    The result has the pruned architecture (attention attributes included) and is ready for
    ``load_state_dict`` of the pruned weights; its own weights are meaningless until then.
    """
    was = model.training
    setup = _setup(model, ignored_layers, False, ignore_classifier)
    head_dims = _head_dims(setup)
    pruner = _build_pruner(model, example_inputs, setup, tp.importance.GroupMagnitudeImportance(p=1), None, None,
                           False, forward_fn)
    try:
        with torch.no_grad():
            pruner.DG.load_pruning_history([list(h) for h in history])
    except Exception as exc:
        raise MixMatchError(
            f"cannot re-apply the pruning history to this model ({type(exc).__name__}: {str(exc)[:120]}); "
            "was it built with the same model spec and kwargs?"
        ) from None
    fix_attention(model, head_dims, num_heads)
    _fix_dims(model)
    model.train(was)
    return model


def _hint(setup: _Setup) -> str:
    if not setup.guessed:
        return ""
    return f" Torch-Pruning guessed the channel dimension of: {', '.join(setup.guessed[:4])}."


def _check_runs(model: nn.Module, example_inputs: Any, forward_fn: Callable[..., Any] | None, setup: _Setup) -> None:
    """Run the pruned model once; a failure names the innermost module that was running."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run(model, example_inputs, forward_fn)
    except Exception as exc:
        where = _failing_module(model, example_inputs, forward_fn)
        raise MixMatchError(
            f"the pruned model fails to run in unsupported layer {where} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:120]});{_hint(setup)} keep it intact (ignored_layers) or use mm.apply"
        ) from None
    finally:
        model.train(was)


def _verify(original: nn.Module, pruned: nn.Module, removed: Sequence[RemovedItem], example_inputs: Any,
            forward_fn: Callable[..., Any] | None, setup: _Setup, tolerance: float) -> float:
    """Compare the pruned model with the zeroed reference, then run a backward pass; return the difference."""
    ref = zeroed_reference(original, removed)
    was = pruned.training
    pruned.eval()
    ref.eval()
    try:
        with torch.no_grad():
            want = _run(ref, example_inputs, forward_fn)
            got = _run(pruned, example_inputs, forward_fn)
        err = relative_difference(got, want)
        if not err <= tolerance:
            where = first_divergence(pruned, ref, example_inputs, forward_fn)
            raise MixMatchError(
                f"the pruned model differs from the original with the same channels zeroed by {err:.2e} "
                f"(tolerance {tolerance:g}); the first layer that differs is {where}, an unsupported layer.{_hint(setup)} "
                "Keep it intact (ignored_layers) or use mm.apply"
            )
        pruned.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = _run(pruned, example_inputs, forward_fn)
            loss = sum(t.float().pow(2).mean() for t in _flat(out) if t.is_floating_point())
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
        pruned.zero_grad(set_to_none=True)
    finally:
        pruned.train(was)
    return err


def first_divergence(pruned: nn.Module, reference: nn.Module, example_inputs: Any,
                     forward_fn: Callable[..., Any] | None = None, tolerance: float = 1e-4) -> str:
    """The first module with parameters (in execution order) whose output differs between the two models.

    Removing channels that are zero in the reference leaves the sum and the sum of squares of every
    output unchanged; the first module where they change is where the pruning went wrong.
    """
    def collect(model: nn.Module) -> list[tuple[str, str, float, float]]:
        rows: list[tuple[str, str, float, float]] = []
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, _MaskedLayerNorm):
                m = m.ln
            if not any(True for _ in m.parameters(recurse=False)):
                continue

            def hook(mod: nn.Module, _i: Any, out: Any, name: str = name) -> None:
                ts = [t for t in _flat(out) if t.is_floating_point()]
                if ts:
                    rows.append((name, type(mod).__name__, sum(float(t.double().sum()) for t in ts),
                                 sum(float(t.double().pow(2).sum()) for t in ts)))
            hooks.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                _run(model, example_inputs, forward_fn)
        finally:
            for h in hooks:
                h.remove()
        return rows

    got, want = collect(pruned), collect(reference)
    for (n, t, s1, q1), (_n2, _t2, s2, q2) in zip(got, want, strict=False):
        if abs(q1 - q2) > tolerance * max(abs(q2), 1e-12) or abs(s1 - s2) > tolerance * max(q2 ** 0.5, 1e-12) * 10:
            return f"{n} ({t})"
    return "(not found: check custom modules)"


def _failing_module(model: nn.Module, example_inputs: Any, forward_fn: Callable[..., Any] | None) -> str:
    """The innermost module that was running when the forward pass failed."""
    stack: list[str] = []
    failed: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}

    def pre(m: nn.Module, _inp: Any) -> None:
        stack.append(names.get(id(m), "?"))

    def post(m: nn.Module, _inp: Any, _out: Any) -> None:
        if stack:
            stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:
        with torch.no_grad():
            _run(model, example_inputs, forward_fn)
    except Exception:  # only the location matters here
        failed = list(stack)
    finally:
        for h in hooks:
            h.remove()
    if not failed or not failed[-1]:
        return "(the model's own forward)"
    return f"{failed[-1]} ({type(model.get_submodule(failed[-1])).__name__})"
