"""Structured pruning by a strategy: :func:`prune` and :func:`rebuild` (a pruned model from its record)."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.batches import LossFn
from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.strategies import Strategy

from ._timm import _fix_dims, fix_attention
from .importance import GroupGradientImportance, _calibrate, _importance
from .planning import (
    _analyse,
    _attn_items,
    _build_pruner,
    _check_opts,
    _check_strategy,
    _head_dims,
    _kwargs_from,
    _setup,
    _translate,
    _width,
)
from .report import GroupResult, PruneReport, RemovedItem, TPResult
from .verify import _check_runs, _record, _verify, count_macs

logger = logging.getLogger(__name__)


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
