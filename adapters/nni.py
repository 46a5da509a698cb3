"""Mix-and-Match for NNI 3.0 users: per-layer ``config_list``, a drop-in for uniform configs, pruning, speed-up.

NNI is imported lazily and quietly. Level entries are one per layer, channel entries one per Torch-Pruning
dependency group (``dependency_group_id``); :func:`speedup` runs ``ModelSpeedup`` inside :func:`speedup_compat`.
NNI 3.0's rules and traps: ``docs/adapters.md``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import math
import re
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from mixmatch_plugin.batches import LossFn, default_loss, iterate, model_device, to_device
from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.layers import Layer, check_untied, inventory
from mixmatch_plugin.planning import PlanOptions, plan
from mixmatch_plugin.rules import load_rules, preset_for
from mixmatch_plugin.signals import DEFAULT_SIGNALS, SignalName
from mixmatch_plugin.strategies import Strategy

from .nni_compat import FIXES, is_active, mask_updaters, plain_timm_layers, speedup_compat

if TYPE_CHECKING:
    from .torch_pruning.options import Fold

logger = logging.getLogger(__name__)

__all__ = [
    "FIXES", "PRUNERS", "SELECTABLE", "NNIResult", "config_list", "coverage", "from_uniform", "is_active",
    "mask_updaters", "nni_mode", "plain_timm_layers", "prune", "speedup", "speedup_compat",
]

PrunerName = Literal["level", "l1", "l2", "fpgm", "taylor"]
Mode = Literal["level", "channel"]
Selector = Literal["op_names", "op_names_re"]
PRUNERS: tuple[PrunerName, ...] = get_args(PrunerName)
#: Module class names NNI 3.0's ``PruningSetting`` registry accepts.
SELECTABLE = (
    "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
)
_SELECTOR_KEYS = ("op_types", "op_names", "op_names_re", "exclude_op_types", "exclude_op_names", "exclude_op_names_re")
_ROLES_NO_SPEEDUP = ("attn_qkv", "attn_proj", "mlp_fc2")


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence NNI's import warnings, its prints and its INFO logging."""
    nni_logger = logging.getLogger("nni")
    level = nni_logger.level
    nni_logger.setLevel(logging.WARNING)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            nni_logger.setLevel(level)


def _anchored(name: str) -> str:
    return "^" + re.escape(name) + "$"


def _entry(names: Sequence[str], ratio: float, selector: Selector) -> dict[str, Any]:
    key = "op_names_re" if selector == "op_names_re" else "op_names"
    values = [_anchored(n) for n in names] if selector == "op_names_re" else list(names)
    return {key: values, "sparse_ratio": float(ratio)}


def _nni_ratio(channels: int, keep: int) -> float:
    """The ratio for which NNI prunes exactly ``channels - keep`` (it prunes ``int(C·r)``)."""
    if keep >= channels:
        return 0.0
    r = (channels - keep) / channels
    while int(channels * r) < channels - keep:
        r = math.nextafter(r, 1.0)
    return float(r)


def config_list(
    strategy: Strategy,
    model: nn.Module | None = None,
    *,
    mode: Mode = "level",
    layers: Sequence[Layer] | None = None,
    example_inputs: Any = None,
    selector: Selector = "op_names",
    include_zero: bool = True,
    only: Iterable[str] | None = None,
    fold: Fold = "mean",
    max_ratio: float = 0.95,
) -> list[dict[str, Any]]:
    """The NNI 3.0 ``config_list`` of a Mix-and-Match strategy.

    Args:
        strategy: a plan's strategy.
        model: the model (for layer types; for ``mode="channel"`` also for its dependency groups).
        mode: ``level`` (one entry per layer, for ``LevelPruner``) or ``channel`` (one entry per
            dependency group with a ``dependency_group_id``, for L1/L2/FPGM/Taylor).
        layers: the plan's layers, instead of ``model``, for ``mode="level"``.
        example_inputs: model inputs for tracing the dependency groups (``mode="channel"``).
        selector: ``op_names`` (exact names) or ``op_names_re`` (patterns anchored with ``^...$``).
        include_zero: list layers (groups) the strategy leaves dense, with ``sparse_ratio`` 0.0.
        only: roles (``mlp_fc1``, ``conv`` ...) to restrict the entries to; a channel group is kept
            only if all its producers have one of these roles (``only=["mlp_fc1"]`` gives a ViT
            config that NNI's speed-up can handle).
        fold, max_ratio: how a group's ratio is folded and capped (see the Torch-Pruning adapter).

    Returns:
        A list of dicts that NNI's own schema accepts.
    """
    if mode not in ("level", "channel"):
        raise MixMatchError(f"mode must be 'level' or 'channel', got {mode!r}")
    if selector not in ("op_names", "op_names_re"):
        raise MixMatchError(f"selector must be 'op_names' or 'op_names_re', got {selector!r}")
    roles = set(only) if only is not None else None
    if mode == "level":
        out: list[dict[str, Any]] = []
        if layers is None and model is None:
            raise MixMatchError("config_list needs the model (or the plan's layers, plan.layers) to know each layer's type")
        level_layers = list(layers) if layers is not None else inventory(model)  # type: ignore[arg-type]
        check_untied(level_layers, "NNI")
        for layer in level_layers:
            if layer.kind == "norm" or layer.type not in SELECTABLE or (roles is not None and layer.role not in roles):
                continue
            r = float(strategy.ratios.get(layer.name, 0.0))
            if not (math.isfinite(r) and 0.0 <= r < 1.0):
                raise MixMatchError(f"strategy {strategy.name!r}: sparsity {r!r} of layer {layer.name!r} must lie in [0, 1)")
            if r == 0.0 and not include_zero:
                continue
            out.append(_entry([layer.name], r, selector))
        return out

    if model is None or example_inputs is None:
        raise MixMatchError("mode='channel' needs the model and example_inputs (to trace its dependency groups)")
    try:
        from . import torch_pruning as tpa
    except ImportError as exc:
        raise MixMatchError(
            f"channel-mode config lists take their dependency groups from Torch-Pruning, which is not installed ({exc}); "
            "pip install 'mixmatch-plugin[tp]'"
        ) from None
    inv = {layer.name: layer for layer in inventory(model)}
    check_untied(list(inv.values()), "NNI")
    groups = tpa.plan_groups(model, strategy, example_inputs, options=tpa.TPOptions(fold=fold, max_ratio=max_ratio))
    out = []
    gid = 0
    for g in groups:
        members = [p for p in g.producers if p in inv]
        if bad := [p for p in members if inv[p].type not in SELECTABLE]:
            logger.warning("group %s left dense: NNI cannot select %s (%s)", g.key, bad[0], inv[bad[0]].type)
            continue
        if g.heads or (roles is not None and not all(inv[p].role in roles for p in members)):
            continue  # whole-head plans are a Torch-Pruning feature
        if (ratio := _nni_ratio(g.channels, g.keep)) == 0.0 and not include_zero:
            continue
        # NNI cannot fuse the metrics of weights of different rank (a Conv2d patch embedding and the
        # Linear layers of a ViT's residual stream): such members are ranked in sub-groups, same ratio.
        by_rank: dict[int, list[str]] = {}
        for p in members:
            by_rank.setdefault(len(inv[p].shape), []).append(p)
        if len(by_rank) > 1:
            logger.info("group %s mixes weight ranks; NNI ranks its %d kinds of layers separately", g.key, len(by_rank))
        for part in by_rank.values():
            entry = _entry(part, ratio, selector)
            if len(part) > 1:
                entry["dependency_group_id"] = gid
                gid += 1
            if g.channel_groups > 1:
                qkv = any(inv[p].role == "attn_qkv" for p in part)
                entry["internal_metric_block"] = int(g.channel_groups * (3 if qkv else 1))
            out.append(entry)
    return out


# ------------------------------------------------------------------------------------------ uniform
def _check_entry(i: int, entry: Mapping[str, Any]) -> None:
    if "total_sparsity" in entry:
        raise MixMatchError(
            f"config entry {i}: the legacy key 'total_sparsity' is broken in NNI 3.0; use 'sparse_ratio' (per layer) instead"
        )
    for key in _SELECTOR_KEYS:
        if key in entry and not (isinstance(entry[key], list) and all(isinstance(v, str) for v in entry[key])):
            raise MixMatchError(f"config entry {i}: {key!r} must be a list of strings, got {entry[key]!r}")
    if not any(k in entry for k in ("op_types", "op_names", "op_names_re")):
        raise MixMatchError(f"config entry {i} selects nothing: give op_types, op_names or op_names_re (lists)")


def _ratio_of(i: int, entry: Mapping[str, Any]) -> float | None:
    for key in ("sparse_ratio", "sparsity", "sparsity_per_layer"):
        if key in entry:
            v = entry[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) < 1.0):
                raise MixMatchError(f"config entry {i}: {key} must be a number in [0, 1), got {v!r}")
            return float(v)
    if entry.get("exclude"):
        return None
    raise MixMatchError(f"config entry {i} has no sparse_ratio; a uniform config gives every entry one")


def coverage(config: Sequence[Mapping[str, Any]], model: nn.Module) -> dict[str, float]:
    """Which layers a user's ``config_list`` prunes, and at what ratio, by NNI's own selection rules.

    Selection is NNI's ``select_modules_by_config`` (``op_names_re`` is a prefix ``re.match``); the
    first entry that selects a layer wins, as in NNI. Legacy ``exclude: True`` entries remove layers.
    """
    with _quiet():
        from nni.compression.base.config import select_modules_by_config
    out: dict[str, float] = {}
    excluded: set[str] = set()
    for i, entry in enumerate(config):
        if not isinstance(entry, Mapping):
            raise MixMatchError(f"config entry {i} must be a dict, got {type(entry).__name__}")
        _check_entry(i, entry)
        ratio = _ratio_of(i, entry)
        selector = {k: entry[k] for k in _SELECTOR_KEYS if k in entry}
        try:
            selected, _, _ = select_modules_by_config(model, selector)
        except re.error as exc:
            raise MixMatchError(f"config entry {i}: bad regular expression ({exc})") from None
        for name, module in selected.items():
            if type(module).__name__ not in SELECTABLE:
                continue
            if ratio is None:
                excluded.add(name)
            elif name not in out:
                out[name] = ratio
    return {n: r for n, r in out.items() if n not in excluded}


def from_uniform(
    config: Sequence[Mapping[str, Any]],
    model: nn.Module,
    *,
    calib: Iterable[Any] | None = None,
    strategy: str = "magnitude:midpoint",
    mode: Mode | Any = "level",
    example_inputs: Any = None,
    selector: Selector = "op_names",
    signals: Sequence[SignalName] | None = None,
    preset: str = "auto",
    options: PlanOptions | None = None,
) -> list[dict[str, Any]]:
    """Turn a user's uniform ``config_list`` into the Mix-and-Match one: same layers, same overall sparsity.

    Args:
        config: the existing list (``op_types``, ``op_names``, ``op_names_re``, ``exclude_op_*``,
            ``sparse_ratio``); the layers it selects (by NNI's rules) are the ones pruned.
        model: the model the config is for.
        calib: calibration batches (needed for gradient/product strategies).
        strategy: which of the plan's strategies to use (``"<signal>:<shape>"``).
        mode: ``level`` or ``channel`` (see :func:`config_list`), or the NNI pruner the list is for (class,
            instance or class name, e.g. ``L1NormPruner``): its mode is NNI's own default granularity.
        example_inputs: for ``mode="channel"``.
        selector: ``op_names`` or ``op_names_re`` (anchored).
        signals: the plan's signals (default: all three with ``calib``, else magnitude).
        preset, options: passed to :func:`mixmatch_plugin.plan`. The preset's structural constraints
            other than ``norm`` are switched off unless you pass ``options``: your config already says
            which layers to prune.

    The overall sparsity is the parameter-weighted mean of the uniform ratios over the covered
    layers, and the plan is budget-matched to it with every uncovered layer kept dense; with
    ``mode="channel"`` the parameter-weighted mean of the group ratios over the covered producers
    equals it up to channel rounding, and a group with an uncovered producer stays dense.
    """

    mode = mode if mode in ("level", "channel") else nni_mode(mode)
    if not (covered := coverage(config, model)):
        raise MixMatchError("the config_list selects no layer NNI can prune in this model; check op_types/op_names")
    layers = inventory(model)
    by_name = {layer.name: layer for layer in layers}
    cov = {n: r for n, r in covered.items() if n in by_name and by_name[n].kind != "norm"}
    n_cov = sum(by_name[n].params for n in cov)
    if n_cov == 0:
        raise MixMatchError("the config_list covers only normalization layers; Mix-and-Match prunes Conv/Linear weights")
    pruned = sum(by_name[n].params * r for n, r in cov.items())
    overall = pruned / n_cov
    target = pruned / sum(layer.params for layer in layers)
    protect = [_anchored(layer.name) for layer in layers if layer.name not in cov and layer.kind != "norm"]
    if options is None:  # the user's config already decides which layers are pruned: only "norms stay dense" remains
        rules = load_rules(preset_for(model) if preset == "auto" else preset)
        options = PlanOptions(disable_constraints=tuple(c.id for c in rules.constraints if c.id != "norm"))
    options = dataclasses.replace(options, protect=(*options.protect, *protect))
    p = plan(model, calib, signals=signals or (DEFAULT_SIGNALS if calib is not None else ("magnitude",)), target=target,
             on_unreachable="extend", preset=preset, options=options)
    s = p.strategy(strategy)
    logger.info("from_uniform: %d layers at overall sparsity %.4f -> %s", len(cov), overall, s.name)
    if mode == "level":
        return [e for e in config_list(s, model, mode="level", selector=selector) if _names(e)[0] in cov]
    entries = config_list(s, model, mode="channel", example_inputs=example_inputs, selector=selector)
    return [e for e in entries if all(n in cov for n in _names(e))]


def nni_mode(pruner: Any) -> Mode:
    """``channel`` for a pruner whose default granularity is output channels (``L1NormPruner`` ...), else ``level``.

    ``pruner`` is an NNI 3.0 pruner class, instance or class name; NNI itself is asked (its default granularity
    of a weight). A scheduled pruner (``LinearPruner``, ``AGPPruner``) takes the mode of the pruner it wraps.
    """
    with _quiet():
        from nni.compression import pruning
        from nni.compression.base.target_space import TargetType
    cls = getattr(pruning, pruner, None) if isinstance(pruner, str) else pruner if isinstance(pruner, type) else type(pruner)
    if not isinstance(cls, type) or not hasattr(cls, "_set_default_sparse_granularity"):
        raise MixMatchError(f"mode must be 'level', 'channel' or an NNI pruner (e.g. L1NormPruner), got {pruner!r}")
    if getattr(pruner, "bound_pruner", None) is not None:
        return nni_mode(pruner.bound_pruner)
    if cls.__name__ in ("LinearPruner", "AGPPruner"):
        raise MixMatchError(f"{cls.__name__} wraps another pruner: pass the wrapped one as mode (e.g. mode=L1NormPruner)")
    space = types.SimpleNamespace(type=TargetType.PARAMETER)
    return "level" if cls._set_default_sparse_granularity(None, space) is None else "channel"


def _names(entry: Mapping[str, Any]) -> list[str]:
    return list(entry["op_names"]) if "op_names" in entry else [re.sub(r"\\(.)", r"\1", p[1:-1]) for p in entry.get("op_names_re", [])]


# ------------------------------------------------------------------------------------------- pruning
@dataclass
class NNIResult:
    """The pruned model (masks multiplied in), NNI's masks, and the config_list that produced them."""

    model: nn.Module
    masks: dict[str, dict[str, torch.Tensor | None]]
    config: list[dict[str, Any]]
    pruner: str
    sparsity: dict[str, float] = field(default_factory=dict)


def _pruner_class(name: str) -> Any:
    with _quiet():
        from nni.compression import pruning
    return {"level": pruning.LevelPruner, "l1": pruning.L1NormPruner, "l2": pruning.L2NormPruner,
            "fpgm": pruning.FPGMPruner, "taylor": pruning.TaylorPruner}[name]


def _taylor_evaluator(calib: Iterable[Any], loss_fn: LossFn | None, max_batches: int | None, device: torch.device) -> tuple[Any, int]:
    """A ``TorchEvaluator`` whose training only collects gradients: SGD at lr 0, eval mode (BatchNorm frozen)."""
    with _quiet():
        import nni
        from nni.compression import TorchEvaluator
    batches = [to_device(b, device) for b in iterate(calib, max_batches)]
    loss_fn = loss_fn or default_loss

    def training_step(batch: Any, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return loss_fn(model, batch)

    def training_func(model: nn.Module, optimizers: Any, step: Any, lr_schedulers: Any = None,
                      max_steps: int | None = None, max_epochs: int | None = None, *args: Any, **kwargs: Any) -> None:
        opt = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        model.eval()
        for b in itertools.islice(itertools.cycle(batches), max_steps if max_steps is not None else len(batches)):
            opt.zero_grad()
            step(b, model).backward()
            opt.step()

    # NNI re-creates the optimizer for the wrapped model, so it must be traced (nni.trace).
    optimizer = nni.trace(torch.optim.SGD)([nn.Parameter(torch.zeros(1))], lr=0.0)
    return TorchEvaluator(training_func, optimizer, training_step), len(batches)


def prune(
    model: nn.Module,
    strategy: Strategy,
    pruner: PrunerName = "level",
    *,
    example_inputs: Any = None,
    calib: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = 8,
    config: Sequence[Mapping[str, Any]] | None = None,
    only: Iterable[str] | None = None,
    inplace: bool = False,
) -> NNIResult:
    """Run NNI's pruner with the strategy's config_list and make the masks permanent.

    Args:
        model: the model; a deep copy is pruned unless ``inplace=True``.
        strategy: a plan's strategy.
        pruner: ``level`` (unstructured), ``l1``, ``l2``, ``fpgm`` or ``taylor`` (output channels,
            one ratio per dependency group).
        example_inputs: model inputs, needed by the channel pruners (dependency groups).
        calib: calibration batches for ``taylor`` (gradients over ``max_batches`` batches, no update).
        loss_fn: loss for those batches (default: cross-entropy).
        config: your own config_list instead of the strategy's.
        only: roles to restrict the config to (see :func:`config_list`).
        inplace: prune ``model`` itself.

    Returns:
        :class:`NNIResult` with the pruned model (dense modules, zeros multiplied in; NNI's
        ``unwrap_model()`` alone would restore the dense weights) and the masks in NNI's format
        ``{module_name: {"weight": tensor, "bias": tensor | None}}``. For the channel pruners the
        BatchNorms of removed channels are masked too (their shift would otherwise keep the channel
        alive), so the masked model equals the sped-up one.
    """
    if pruner not in PRUNERS:
        raise MixMatchError(f"pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if pruner == "taylor" and calib is None:
        raise MixMatchError("the taylor pruner needs calibration data for its gradients: pass calib=<DataLoader>")
    check_untied(inventory(model), "NNI")  # NNI wraps modules one by one: a shared weight would come back untied
    target = model if inplace else copy.deepcopy(model)
    if config is None:
        mode: Mode = "level" if pruner == "level" else "channel"
        if mode == "channel" and example_inputs is None:
            raise MixMatchError(f"the {pruner} pruner prunes channels per dependency group: pass example_inputs")
        cfg = config_list(strategy, target, mode=mode, example_inputs=example_inputs, include_zero=False, only=only)
    else:
        cfg = [dict(e) for e in config]
    if not cfg:
        logger.warning("strategy %s prunes nothing NNI can select: the model is returned unchanged", strategy.name)
        return NNIResult(target, {}, [], pruner)
    cls = _pruner_class(pruner)
    was_training = target.training
    with _quiet():
        if pruner == "taylor":
            assert calib is not None
            evaluator, steps = _taylor_evaluator(calib, loss_fn, max_batches, model_device(target))
            nni_pruner = cls(target, cfg, evaluator, training_steps=steps)
        else:
            nni_pruner = cls(target, cfg)
        try:
            _, masks = nni_pruner.compress()
        finally:
            nni_pruner.unwrap_model()
    target.train(was_training)
    masks = {n: dict(m) for n, m in masks.items()}
    if pruner != "level" and example_inputs is not None:
        _add_coupled_masks(target, masks, example_inputs)
    _apply_masks(target, masks)
    sparsity = {name: float((w == 0).float().mean()) for name in masks
                if isinstance(w := getattr(target.get_submodule(name), "weight", None), torch.Tensor)}
    return NNIResult(target, dict(masks), cfg, pruner, sparsity)


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: Mapping[str, Mapping[str, torch.Tensor | None]]) -> None:
    for name, m in masks.items():
        for pname, mask in m.items():
            p = getattr(model.get_submodule(name), pname, None)
            if isinstance(p, torch.Tensor) and mask is not None:
                p.mul_(mask.to(p.dtype))


def _add_coupled_masks(model: nn.Module, masks: dict[str, dict[str, Any]], example_inputs: Any) -> None:
    """Mask the BatchNorms (and per-channel parameters) of removed channels too.

    NNI's channel masks cover the Conv/Linear rows only, so a removed channel still carries its
    BatchNorm shift (``beta - mean·gamma/std``) downstream, and the masked model differs from the
    sped-up one. The coupled BatchNorm weight and bias are masked as well (and added to ``masks``),
    so that the masked model *is* the model with those channels removed.
    """
    removed: dict[str, list[int]] = {}
    for name, m in masks.items():
        w = m.get("weight")
        module = model.get_submodule(name)
        if w is None or not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or getattr(module, "transposed", False):
            continue
        if dead := torch.nonzero(w.reshape(w.shape[0], -1).abs().sum(1) == 0).flatten().tolist():
            removed[name] = dead
    if not removed:
        return
    try:
        from .torch_pruning.verify import coupled_channels

        items = coupled_channels(model, removed, example_inputs)
    except Exception as exc:  # the masks stay NNI's own; speedup() verifies what it can
        logger.warning("could not trace the channel groups (%s); BatchNorm shifts of removed channels remain", exc)
        return
    for item in items:
        if item.is_param or item.side != "out":
            continue
        module = model.get_submodule(item.target)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.affine:
            continue
        keep = torch.ones(module.num_features)
        keep[item.idxs] = 0.0
        entry = masks.setdefault(item.target, {})
        for pname in ("weight", "bias"):
            old = entry.get(pname)
            entry[pname] = keep.clone() if old is None else old * keep


# ------------------------------------------------------------------------------------------ speed-up
def _speedup_blockers(model: nn.Module, masks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Transformer layers whose masks NNI's speed-up cannot apply (qkv, attention proj, fc2)."""
    try:
        from .torch_pruning.timm_layers import timm_classes

        known = timm_classes()
        attn_types = known["attention"] + known["window_attention"]
    except ImportError:  # pragma: no cover - torch-pruning missing
        attn_types = ()
    if not attn_types or not any(isinstance(m, attn_types) for m in model.modules()):
        return []
    roles = {layer.name: layer.role for layer in inventory(model)}
    return [name for name, m in masks.items() if (w := m.get("weight")) is not None and not bool(w.all())
            and roles.get(name) in (*_ROLES_NO_SPEEDUP, "stem")]


def speedup(
    model: nn.Module,
    masks: Mapping[str, Mapping[str, torch.Tensor | None]],
    dummy_input: Any,
    *,
    inplace: bool = False,
    tolerance: float = 1e-4,
) -> nn.Module:
    """Physically remove the masked channels with NNI's ``ModelSpeedup``, inside :func:`speedup_compat`.

    Works for CNN channel (filter) pruning and ViT ``mlp.fc1`` pruning. Raises
    :class:`MixMatchError` for masks on ViT ``qkv``, attention ``proj``, ``fc2`` or the patch
    embedding (NNI cannot shrink the residual stream or heads: use
    ``mixmatch_plugin.adapters.torch_pruning.prune``), and when the sped-up model's output differs
    from the masked model's by more than ``tolerance`` (relative). Returns the model in eval mode.
    """
    if blockers := _speedup_blockers(model, masks):
        raise MixMatchError(
            f"NNI's speed-up cannot remove the pruned channels of {blockers[0]}"
            + (f" and {len(blockers) - 1} more" if len(blockers) > 1 else "")
            + " (ViT qkv, attention proj, fc2 and patch embedding): prune only mlp.fc1 for NNI "
            "(config_list(..., only=['mlp_fc1'])), or use mixmatch_plugin.adapters.torch_pruning.prune, which "
            "removes them consistently"
        )
    target = (model if inplace else copy.deepcopy(model)).eval()
    x = dummy_input
    _apply_masks(target, masks)  # the reference is the masked model
    with torch.no_grad():
        want = target(*x) if isinstance(x, tuple) else target(x)
    with _quiet():
        from nni.compression.speedup import ModelSpeedup
    renamed = set(plain_timm_layers(target))  # timm's BatchNormAct2d and Linear, as plain layers (see nni_compat)
    nni_masks = {n + (".0" if n in renamed else ""): {k: v for k, v in m.items() if v is not None} for n, m in masks.items()}
    try:
        with _quiet(), speedup_compat():
            ModelSpeedup(target, x, nni_masks, customized_mask_updaters=mask_updaters()).speedup_model()
    except Exception as exc:
        raise MixMatchError(
            f"NNI's speed-up failed ({type(exc).__name__}: {first_line(exc)}); "
            "use mixmatch_plugin.adapters.torch_pruning.prune for structured pruning of this model"
        ) from None
    target.eval()  # ModelSpeedup hands BatchNorm back in training mode
    with torch.no_grad():
        got = target(*x) if isinstance(x, tuple) else target(x)
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-12)
    if not err <= tolerance:
        raise MixMatchError(
            f"NNI's speed-up changed the model's output by {err:.2e} (relative; tolerance {tolerance:g}); "
            "the model is not returned: use mixmatch_plugin.adapters.torch_pruning.prune"
        )
    return target
