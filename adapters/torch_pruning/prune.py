"""Structured pruning by a strategy: :func:`prune` and :func:`rebuild` (a pruned model from its record)."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.strategies import Strategy

from .importance import GroupGradientImportance, calibrate, resolve_importance
from .options import TPOptions
from .planning import (
    ModelSetup,
    analyse,
    attention_items,
    build_pruner,
    check_tp_strategy,
    kwargs_from,
    model_setup,
    out_width,
    setup_head_dims,
    translate_ignored,
)
from .report import GroupPlan, GroupResult, PruneReport, RemovedItem, TPResult
from .timm_layers import fix_attention, fix_dims
from .verify import check_runs, count_macs, record_removed, verify_pruned

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    strategy: Strategy,
    example_inputs: Any,
    *,
    calib: Iterable[Any] | None = None,
    options: TPOptions | None = None,
    inplace: bool = False,
) -> TPResult:
    """Structurally prune ``model`` by ``strategy`` with Torch-Pruning; return the model and a report.

    Args:
        model: the model; a deep copy is pruned unless ``inplace=True``.
        strategy: a plan's strategy (per-layer targets, folded per dependency group; see the module doc).
        example_inputs: inputs for tracing (a tensor, a tuple of positional inputs, or a dict).
        calib: calibration batches ``(inputs, labels)``; needed for Taylor and gradient importance.
        options: fold, rounding, heads, ignored layers, importance, verification (see :class:`TPOptions`).
        inplace: prune ``model`` itself.

    Raises:
        MixMatchError: an unsupported layer (named), a strategy that does not fit the model, missing
            calibration data, or a pruned model that fails verification.
    """
    o = options or TPOptions()
    check_tp_strategy(model, strategy)
    o.check()
    imp, imp_name, needs_grad = resolve_importance(o.importance, strategy.signal)
    if needs_grad and calib is None:
        raise MixMatchError(
            f"importance {imp_name} needs calibration data for a backward pass: pass calib=<DataLoader> "
            "(or importance='magnitude')"
        )
    original_training = model.training
    work = model if inplace else copy.deepcopy(model)
    original = copy.deepcopy(model) if o.verify else None
    if not inplace and o.ignored_layers:
        o = replace(o, ignored_layers=translate_ignored(model, work, o.ignored_layers))

    # 1. sizes before, and one ratio per dependency group
    t0 = time.perf_counter()
    macs0, params0 = _sizes(work, example_inputs)
    setup, plans = analyse(work, strategy, example_inputs, o)
    t_groups = time.perf_counter() - t0
    # 2. the importance (a backward pass over the calibration batches for gradient-based ones)
    t1 = time.perf_counter()
    if needs_grad:
        assert calib is not None
        work.eval()
        grad_scores = calibrate(work, calib, o.loss_fn, o.max_batches)
        imp = imp if imp is not None else GroupGradientImportance(grad_scores)
    # 3. pruning, group by group, recording what goes
    out_before = {p.key: out_width(work.get_submodule(p.key)) for p in plans}
    head_dims = setup_head_dims(setup)  # before pruning: fix_attention rescales from these
    pruner, removed = _remove(work, example_inputs, imp, setup, plans, o, inplace)
    new_heads = {n: int(pruner.num_heads.get(a.qkv, a.num_heads)) for n, a in attention_items(setup)}
    fix_attention(work, head_dims, new_heads)
    fix_dims(work)
    for param in work.parameters():
        param.grad = None
    t_prune = time.perf_counter() - t1
    # 4. what was done, checked against the plan, and against the channel-zeroed original
    groups = _results(work, setup, plans, out_before)
    check_runs(work, example_inputs, o.forward_fn, setup)
    mismatched = [g.key for g, p in zip(groups, plans, strict=True) if g.kept != p.keep]
    if mismatched:
        raise MixMatchError(
            f"Torch-Pruning did not prune group {mismatched[0]} as planned (and {len(mismatched) - 1} more); "
            "this model is not supported by the adapter: use mm.apply (unstructured) instead"
        )
    macs1, params1 = count_macs(work, example_inputs)
    report = PruneReport(strategy.name, strategy.signal, imp_name, o.fold, params0, params1, macs0, macs1, groups,
                         t_groups, t_prune)
    if imp_name == "GroupTaylorImportance":
        report.notes.append("Torch-Pruning 1.6.1's Taylor importance skips BatchNorm members (it tests for GroupNorm)")
    work.train(original_training)
    if original is not None:
        report.consistency = verify_pruned(original, work, removed, example_inputs, o.forward_fn, setup, o.tolerance)
    logger.info("pruned %s: params %.1f%%, MACs %.1f%%", strategy.name, 100 * report.params_ratio, 100 * report.macs_ratio)
    history = [[str(n), bool(flag), [int(i) for i in idx]] for n, flag, idx in pruner.pruning_history()]
    return TPResult(work, report, removed, history, new_heads)


def _sizes(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    try:
        return count_macs(model, example_inputs)
    except Exception as exc:
        raise MixMatchError(
            f"the model does not run on example_inputs ({type(exc).__name__}: {first_line(exc)}); "
            "pass inputs of the shape the model expects"
        ) from None


def _remove(work: nn.Module, example_inputs: Any, imp: Any, setup: ModelSetup, plans: list[GroupPlan], o: TPOptions,
            inplace: bool) -> tuple[tp.pruner.MetaPruner, list[RemovedItem]]:
    """Prune every group as planned (``step(interactive=True)``); return the pruner and what was removed."""
    names = {id(m): n for n, m in work.named_modules()}
    pnames = {id(p): n for n, p in work.named_parameters()}
    removed: list[RemovedItem] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        pruner = tp.pruner.MetaPruner(work, example_inputs, importance=imp, **kwargs_from(setup, plans, o.prune_heads, o.forward_fn))
    try:
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                removed.extend(record_removed(group, pruner.DG, names, pnames))
                group.prune()
    except Exception as exc:
        if inplace:
            raise MixMatchError(
                f"Torch-Pruning failed while pruning ({type(exc).__name__}: {first_line(exc)}); the model was pruned in "
                "place and may be partly pruned: reload it, and build a new pruner (a failed step() is used up)"
            ) from exc
        raise MixMatchError(
            f"Torch-Pruning failed while pruning ({type(exc).__name__}: {first_line(exc)}); your model is unchanged"
        ) from exc
    return pruner, removed


def _results(work: nn.Module, setup: ModelSetup, plans: list[GroupPlan], out_before: dict[str, int]) -> list[GroupResult]:
    """Planned against realized pruning per group."""
    qkv_mods = {a.qkv for _, a in attention_items(setup)}
    groups: list[GroupResult] = []
    for p in plans:
        now = out_width(work.get_submodule(p.key))
        if p.heads:
            kept = p.heads - round((out_before[p.key] - now) / max(out_before[p.key] / p.heads, 1))
            groups.append(GroupResult(p.key, p.producers, p.heads, (p.heads - p.keep) / p.heads,
                                      (p.heads - kept) / p.heads, kept, p.target, p.clamped, "heads"))
        else:
            kept = now // max(p.channel_groups, 1) // (3 if p.module in qkv_mods else 1)
            groups.append(GroupResult(p.key, p.producers, p.channels, (p.channels - p.keep) / p.channels,
                                      (p.channels - kept) / p.channels, kept, p.target, p.clamped))
    return groups


def rebuild(
    model: nn.Module,
    history: Sequence[Sequence[Any]],
    example_inputs: Any,
    num_heads: Mapping[str, int] | None = None,
    *,
    options: TPOptions | None = None,
) -> nn.Module:
    """Re-apply a pruning history (:attr:`TPResult.history`) to a freshly built original model, in place.

    The result has the pruned architecture (attention attributes included) and is ready for
    ``load_state_dict`` of the pruned weights; its own weights are meaningless until then.
    """
    o = options or TPOptions()
    was = model.training
    setup = model_setup(model, o.ignored_layers, False, o.ignore_classifier)
    head_dims = setup_head_dims(setup)
    pruner = build_pruner(model, example_inputs, setup, False, o.forward_fn)
    try:
        with torch.no_grad():
            pruner.DG.load_pruning_history([list(h) for h in history])
    except Exception as exc:
        raise MixMatchError(
            f"cannot re-apply the pruning history to this model ({type(exc).__name__}: {first_line(exc)}); "
            "was it built with the same model spec and kwargs?"
        ) from None
    fix_attention(model, head_dims, num_heads)
    fix_dims(model)
    model.train(was)
    return model
