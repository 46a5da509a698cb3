"""Planning: one ratio per Torch-Pruning dependency group, and the keywords a ``MetaPruner`` needs for it."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.layers import check_untied, inventory
from mixmatch_plugin.masks import check_strategy
from mixmatch_plugin.strategies import Strategy

from .options import FOLDS, TOKEN_PARAMS, Fold, TPOptions
from .report import GroupPlan
from .timm_layers import clear_caches, customized_pruners, stream_leaf_classes, timm_classes, tracing_forward

logger = logging.getLogger(__name__)


@dataclass
class ModelSetup:
    """Everything a MetaPruner needs for this model, built once per model instance."""

    ignored: list[nn.Module]
    ignored_params: list[nn.Parameter]
    num_heads: dict[nn.Module, int]
    attentions: dict[str, nn.Module]
    customized: dict[Any, tp.pruner.BasePruningFunc]
    unwrapped: list[tuple[nn.Parameter, int]]
    guessed: list[str]


def _classifiers(model: nn.Module) -> list[nn.Module]:
    get = getattr(model, "get_classifier", None)
    try:
        c = get() if callable(get) else None
    except Exception:  # a model's own helper may fail; fall back to the inventory
        c = None
    heads = [m for m in (c if isinstance(c, (tuple, list)) else [c]) if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    return heads or [model.get_submodule(layer.name) for layer in inventory(model) if layer.role == "head"]


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
            raise MixMatchError(f"ignored_layers contains {type(it).__name__}; pass nn.Module instances or nn.Parameters")
    return mods, params


def model_setup(model: nn.Module, ignored_layers: Iterable[Any] | None, ignore_heads: bool) -> ModelSetup:
    known = timm_classes()
    user_mods, user_params = _check_ignored(ignored_layers)
    ignored = list(user_mods) + (_classifiers(model) if ignore_heads else [])
    ignored_ids = {id(s) for m in ignored for s in m.modules()}
    ignored_params = list(user_params)

    leaves = stream_leaf_classes()
    num_heads: dict[nn.Module, int] = {}
    attentions: dict[str, nn.Module] = {}
    unsupported: list[str] = []
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
                ignored_params.append(m.relative_position_bias_table)
        elif isinstance(getattr(m, "num_heads", None), int) and id(m) not in ignored_ids and any(
                isinstance(c, (nn.Linear, nn.Conv2d, nn.Conv1d)) and id(c) not in ignored_ids for c in m.modules()) and not any(
                type(c) in leaves for c in m.modules()):  # a stream leaf (or a block holding one) keeps its heads
            unsupported.append(f"{name} ({type(m).__name__})")
    if unsupported:
        raise MixMatchError(
            f"unsupported layer {unsupported[0]}"
            + (f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else "")
            + ": its head attributes would not be updated after pruning; pass the module in ignored_layers "
            "to keep it intact, or use the plain PyTorch backend (mm.apply). If its forward takes its inner sizes "
            "from its own attributes (not from the input's width), add its class to mm_tp.STREAM_LEAVES "
            "(docs/structured.md) to prune the stream around its heads"
        )

    customized = customized_pruners(model)

    # Free parameters: every parameter not owned by a module type Torch-Pruning prunes itself.
    registered = tuple(tp.ops.type2class(t) for t in tp.pruner.function.PrunerBox if tp.ops.type2class(t) is not None)
    cust_types = tuple(t for t in customized if isinstance(t, type))
    ignored_param_ids = {id(p) for p in ignored_params}
    unwrapped: list[tuple[nn.Parameter, int]] = []
    guessed: list[str] = []
    for mname, m in model.named_modules():
        if ((isinstance(m, registered) and tp.ops.module2type(m) != tp.ops.OPTYPE.ELEMENTWISE) or isinstance(m, cust_types)
                or any(isinstance(a, cust_types) for a in _ancestors(model, mname))):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in ignored_param_ids:
                continue
            if p.dim() == 4 and p.shape[0] == 1 and p.shape[2] == p.shape[3] != p.shape[1]:
                unwrapped.append((p, 1))  # an image-shaped (1, C, H, W) embedding (PiT, Visformer)
            elif pname in TOKEN_PARAMS and p.dim() >= 2:
                unwrapped.append((p, p.dim() - 1))
            elif p.dim() == 1:
                unwrapped.append((p, 0))  # layer-scale gamma and other per-channel vectors
            else:
                if dims := [i for i, s in enumerate(p.shape) if s > 1]:
                    unwrapped.append((p, dims[-1]))
                    guessed.append(f"{f'{mname}.{pname}' if mname else pname} ({type(m).__name__}, shape {tuple(p.shape)})")
    if guessed:
        logger.info("free parameters whose channel dimension is guessed (last non-singleton): %s", ", ".join(guessed))
    return ModelSetup(ignored, ignored_params, num_heads, attentions, customized, unwrapped, guessed)


def setup_head_dims(setup: ModelSetup) -> dict[str, int]:
    attentions: dict[str, Any] = setup.attentions
    return {n: int(a.qkv.out_features) // (3 * int(a.num_heads)) for n, a in attentions.items()}


def setup_heads(setup: ModelSetup) -> dict[str, int]:
    attentions: dict[str, Any] = setup.attentions
    return {n: int(a.num_heads) for n, a in attentions.items()}


def out_width(module: nn.Module) -> int:
    """Output width of a Conv or Linear."""
    m: Any = module
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def translate_ignored(model: nn.Module, copy_: nn.Module, items: Sequence[Any]) -> list[Any]:
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


def build_pruner(model: nn.Module, example_inputs: Any, setup: ModelSetup, prune_heads: bool,
                 forward_fn: Callable[..., Any] | None, importance: Any = None) -> tp.pruner.MetaPruner:
    """A ``MetaPruner`` that only traces: no ratio yet (the groups are planned from it), magnitude importance."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        return tp.pruner.MetaPruner(model, example_inputs, importance=importance or tp.importance.GroupMagnitudeImportance(p=1),
                                    **kwargs_from(setup, [], prune_heads, forward_fn))


def fold_ratio(targets: Mapping[str, float], weights: Mapping[str, int], fold: Fold = "mean") -> float:
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
    return sum(targets[n] * weights[n] for n in targets) / total if total > 0 else 0.0


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


def analyse_groups(
    pruner: tp.pruner.MetaPruner,
    model: nn.Module,
    strategy: Strategy,
    setup: ModelSetup,
    o: TPOptions,
    keeps: Mapping[str, int] | None = None,
) -> list[GroupPlan]:
    names = {m: n for n, m in model.named_modules()}
    ignored = {names[m] for m in pruner.ignored_layers if isinstance(m, nn.Module) and m in names}
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
            if (n := names.get(mod)) is None:
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
        targets = {p: float(strategy.ratios.get(p, 0.0)) for p in producers if p not in ignored}
        target = fold_ratio(targets, params, o.fold)
        if qkv is not None and o.prune_heads:
            heads = int(setup.num_heads[qkv])
            keep, why = (keeps.get(key, heads), "") if keeps is not None else _plan_keep(heads, target, 1, None, o.max_ratio)
            ratio = (heads - keep) / heads
            plans.append(GroupPlan(key, producers, consumers, channels, ch_groups, targets, target, keep, ratio,
                                   heads=heads, clamped=why, module=key_mod))
            continue
        if keeps is not None:  # a budget's allocation, already inside the bounds
            keep, why = keeps.get(key, channels), ""
        else:
            keep, why = _plan_keep(channels, target, max(1, o.round_to or 1), o.round_to, o.max_ratio)
        plans.append(GroupPlan(key, producers, consumers, channels, ch_groups, targets, target, keep,
                               _tp_ratio(channels, keep), clamped=why, module=key_mod))
    return plans


def check_tp_strategy(model: nn.Module, strategy: Strategy) -> None:
    if not isinstance(strategy, Strategy):
        raise MixMatchError(f"strategy must be a mixmatch_plugin Strategy (plan.strategy(name)), got {type(strategy).__name__}")
    layers = inventory(model)
    check_untied(layers, "Torch-Pruning")
    check_strategy(strategy, layers, complete=False)


def analyse(model: nn.Module, strategy: Strategy, example_inputs: Any, o: TPOptions,
            keeps: Mapping[str, int] | None = None) -> tuple[ModelSetup, list[GroupPlan]]:
    """Check the strategy and options, trace ``model`` once (eval mode, restored) and plan every group."""
    check_tp_strategy(model, strategy)
    o.check()
    was_training = model.training
    try:
        setup = model_setup(model, o.ignored_layers, o.ignore_classifier)
        pruner = build_pruner(model, example_inputs, setup, o.prune_heads, o.forward_fn)
        return setup, analyse_groups(pruner, model, strategy, setup, o, keeps)
    finally:
        clear_caches(model)
        model.train(was_training)


def plan_groups(model: nn.Module, strategy: Strategy, example_inputs: Any, *, options: TPOptions | None = None) -> list[GroupPlan]:
    """The dependency groups of ``model`` and the ratio planned for each (see the module docstring).

    The model is traced once (in eval mode, restored afterwards) and not otherwise changed.
    """
    return analyse(model, strategy, example_inputs, options or TPOptions())[1]


def pruner_kwargs(model: nn.Module, strategy: Strategy, example_inputs: Any, *, options: TPOptions | None = None) -> dict[str, Any]:
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
    o = options or TPOptions()
    setup, plans = analyse(model, strategy, example_inputs, o)
    return kwargs_from(setup, plans, o.prune_heads, o.forward_fn)


def kwargs_from(setup: ModelSetup, plans: Sequence[GroupPlan], prune_heads: bool, forward_fn: Any) -> dict[str, Any]:
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
        "pruning_ratio": 0.0,  # every group has an entry; anything else must stay intact
        "pruning_ratio_dict": ratio_dict,
        "max_pruning_ratio": 1.0,  # it would not cap dict ratios anyway (TP issue 448): clamped here instead
        "ignored_layers": list(setup.ignored) + list(setup.ignored_params),
        "in_channel_groups": {},  # fresh dicts: TP's defaults are shared mutable objects
        "out_channel_groups": {},
        "num_heads": dict(setup.num_heads),
        "prune_num_heads": prune_heads,
        "prune_head_dims": not prune_heads,
        "head_pruning_ratio_dict": head_dict or None,
        "customized_pruners": dict(setup.customized),
        "unwrapped_parameters": list(setup.unwrapped),
        "forward_fn": tracing_forward(setup.customized, forward_fn),
    }


def pruning_ratio_dict(
    model: nn.Module, strategy: Strategy, example_inputs: Any, *, options: TPOptions | None = None
) -> dict[nn.Module, float]:
    """``{module: ratio}`` for ``tp.pruner.MetaPruner(pruning_ratio_dict=...)``: one entry per dependency group.

    Keys are leaf Conv/Linear modules of ``model`` (never strings, never containers, which would
    spread the ratio to every submodule). Every prunable group has an entry (0.0 for groups left
    intact); pass ``pruning_ratio=0.0`` and the same ``ignored_layers``/``num_heads`` as
    :func:`pruner_kwargs` returns, or simply use :func:`pruner_kwargs`. Ratios are fractions of the
    original width, clamped so that at least one channel (``round_to`` channels, one head_dim per
    head) remains, and exact under Torch-Pruning's ``floor``.
    """
    if options is not None and options.prune_heads:
        raise MixMatchError(
            "whole-head removal needs head_pruning_ratio_dict and prune_num_heads as well: use pruner_kwargs(...), "
            "which returns all of them"
        )
    return dict(pruner_kwargs(model, strategy, example_inputs, options=options)["pruning_ratio_dict"])
