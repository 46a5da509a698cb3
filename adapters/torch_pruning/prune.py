"""Structured pruning by a strategy: :func:`prune` and :func:`rebuild` (a pruned model from its record)."""

from __future__ import annotations

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
from mixmatch_plugin.evaluation import latencies
from mixmatch_plugin.layers import inventory
from mixmatch_plugin.strategies import Strategy

from .allocation import allocate
from .importance import GroupGradientImportance, calibrate, resolve_importance
from .options import TPOptions
from .planning import (
    ModelSetup,
    analyse,
    build_pruner,
    check_tp_strategy,
    kwargs_from,
    model_setup,
    out_width,
    setup_head_dims,
    setup_heads,
    translate_ignored,
)
from .report import GroupPlan, GroupResult, PruneReport, RemovedItem, TPResult
from .timm_layers import (
    attention_head_dims,
    clear_caches,
    fix_attention,
    fix_dims,
    run_model,
    safe_deepcopy,
    slice_bias_tables,
)
from .verify import check_runs, count_macs, record_removed, verify_pruned

logger = logging.getLogger(__name__)


def prune(
    model: nn.Module,
    strategy: Strategy | None,
    example_inputs: Any,
    *,
    calib: Iterable[Any] | None = None,
    options: TPOptions | None = None,
    inplace: bool = False,
    macs: float | None = None,
    params: float | None = None,
    latency: float | None = None,
) -> TPResult:
    """Structurally prune ``model`` by ``strategy`` with Torch-Pruning; return the model and a report.

    Args:
        model: the model; a deep copy is pruned unless ``inplace=True``.
        strategy: a plan's strategy (per-layer targets, folded per dependency group; see the module doc);
            with a budget it gives only the signal (the importance), and may be ``None`` (magnitude).
        example_inputs: inputs for tracing (a tensor, a tuple of positional inputs, or a dict).
        calib: calibration batches ``(inputs, labels)``; needed for Taylor and gradient importance, and
            used (inputs only) for the loss curves of a budget.
        options: fold, rounding, heads, ignored layers, importance, verification (see :class:`TPOptions`).
        inplace: prune ``model`` itself.
        macs, params: a budget instead of the strategy's ratios: the fraction of MACs (or parameters) to keep,
            met within 1 % by Torch-Pruning's counter; the groups are allocated by measured loss curves
            (see :mod:`.allocation`).
        latency: a budget as the fraction of the dense model's latency to keep, timed on this machine on
            ``options.latency_inputs`` in the model's memory format (``model.to(memory_format=torch.channels_last)``
            first if you deploy so): the removal order of ``macs``, cut where the measured latency is closest
            (timing noise permitting; the report gives the measured ratio).

    Raises:
        MixMatchError: an unsupported layer (named), a strategy that does not fit the model, missing
            calibration data, a budget that cannot be met, or a pruned model that fails verification.
    """
    o = options or TPOptions()
    budget = {k: v for k, v in (("macs", macs), ("params", params), ("latency", latency)) if v is not None}
    if len(budget) > 1 or (strategy is None and not budget):
        raise MixMatchError("pass a strategy, or one budget (macs=, params= or latency=)")
    strategy = strategy or Strategy(f"{next(iter(budget))}-budget", "magnitude", {}, 0.0, {})
    check_tp_strategy(model, strategy)
    o.check()
    imp, imp_name, needs_grad = resolve_importance(o.importance, strategy.signal)
    if needs_grad and calib is None:
        raise MixMatchError(
            f"importance {imp_name} needs calibration data for a backward pass: pass calib=<DataLoader> "
            "(or importance='magnitude')"
        )
    if budget and o.verify:
        _probe(model, example_inputs, o)
    original_training, layout = model.training, _layout(model)
    work = model if inplace else safe_deepcopy(model)
    original = safe_deepcopy(model) if o.verify else None
    clear_caches(work)
    if not inplace and o.ignored_layers:
        o = replace(o, ignored_layers=translate_ignored(model, work, o.ignored_layers))

    # 1. sizes before; the importance (a backward pass over the calibration batches for gradient-based ones)
    t0 = time.perf_counter()
    macs0, params0 = _sizes(work, example_inputs)
    if needs_grad:
        assert calib is not None
        work.eval()
        grad_scores = calibrate(work, calib, o.loss_fn, o.max_batches)
        imp = imp if imp is not None else GroupGradientImportance(grad_scores)
    # 2. one ratio per dependency group: the strategy's, folded, or a budget's allocation
    keeps, measured, cap, chosen = _allocate(work, example_inputs, calib, imp, o, budget, macs0, params0) if budget else (None, None, None, None)
    setup, plans = analyse(work, strategy, example_inputs, o, keeps)
    t_groups = time.perf_counter() - t0
    # 3. pruning, group by group, recording what goes
    t1 = time.perf_counter()
    out_before = {p.key: out_width(work.get_submodule(p.key)) for p in plans}
    pruner, removed, new_heads = _prune_planned(work, example_inputs, imp, setup, plans, o, inplace)
    work.zero_grad(set_to_none=True)
    t_prune = time.perf_counter() - t1
    # 4. what was done, checked against the plan, and against the channel-zeroed original
    groups = _results(work, setup, plans, out_before)
    check_runs(work, example_inputs, o.forward_fn, setup)
    if mismatched := [g.key for g, p in zip(groups, plans, strict=True) if g.kept != p.keep]:
        raise MixMatchError(
            f"Torch-Pruning did not prune group {mismatched[0]} as planned (and {len(mismatched) - 1} more); "
            "this model is not supported by the adapter: use mm.apply (unstructured) instead"
        )
    macs1, params1 = count_macs(work, example_inputs)
    report = PruneReport(strategy.name, strategy.signal, imp_name, o.fold, params0, params1, macs0, macs1, groups,
                         t_groups, t_prune, latency_ratio=measured if latency is not None else None, cap=cap, allocation=chosen)
    if chosen is not None and chosen.endswith("threshold"):
        report.notes.append(f"the {chosen.split()[0]} threshold's allocation (one threshold on the groups' importance) stayed "
                            "closest to the dense outputs (TPOptions.thresholds)")
    elif cap is not None and cap < o.max_ratio:
        report.notes.append(f"no group lost more than {cap:.0%} of its channels: that cap's allocation stayed closest "
                            f"to the dense outputs (TPOptions.caps; max_ratio {o.max_ratio:.0%})")
    if imp_name == "GroupTaylorImportance":
        report.notes.append("Torch-Pruning 1.6.1's Taylor importance skips BatchNorm members (it tests for GroupNorm)")
    work.train(original_training).to(memory_format=layout)  # Torch-Pruning's new weights are in the default layout
    if original is not None:
        report.consistency = verify_pruned(original, work, removed, example_inputs, o.forward_fn, setup, o.tolerance)
    logger.info("pruned %s: params %.1f%%, MACs %.1f%%", strategy.name, 100 * report.params_ratio, 100 * report.macs_ratio)
    history = [[str(n), bool(flag), [int(i) for i in idx]] for n, flag, idx in pruner.pruning_history()]
    return TPResult(work, report, removed, history, new_heads)


def from_metapruner(model: nn.Module, example_inputs: Any, *, calib: Iterable[Any] | None = None, macs: float | None = None,
                    **metapruner_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of your ``tp.pruner.MetaPruner(model, example_inputs, **kwargs)`` call, reallocated.

    Your call runs once on a copy, exactly as Torch-Pruning runs it (``pruning_ratio``, ``pruning_ratio_dict``,
    ``global_pruning``, ``isomorphic``, ``round_to``, ``max_pruning_ratio``); the MACs it keeps (or ``macs=``)
    become the budget of :func:`prune`'s allocation, in steps of your ``round_to``, ranked by your ``importance``,
    with your ``ignored_layers``, ``num_heads`` and ``forward_fn``; with ``prune_num_heads=True`` it allocates whole
    heads (``prune_heads``), not head dims. The model is not changed. Example::

        kw = mm_tp.from_metapruner(model, x, calib=loader, importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner = tp.pruner.MetaPruner(model, x, **kw)   # was: tp.pruner.MetaPruner(model, x, importance=imp, ...)
    """
    kw = dict(metapruner_kwargs)
    macs0, params0 = _sizes(model, example_inputs)
    if macs is None:
        trial, trial_kw = safe_deepcopy((model, kw), model)
        dims = attention_head_dims(trial)
        try:
            pruner = tp.pruner.MetaPruner(trial, example_inputs, **trial_kw)
            pruner.step()
        except Exception as exc:
            raise MixMatchError(f"your MetaPruner call fails as given ({type(exc).__name__}: {str(exc)[:160]}); fix it, "
                                "or pass macs= to skip it") from exc
        attn = {n: trial.get_submodule(n) for n in dims}
        fix_attention(trial, dims, {n: int(pruner.num_heads.get(a.qkv, a.num_heads)) for n, a in attn.items()})
        macs = count_macs(trial, example_inputs)[0] / macs0
    imp = kw.pop("importance", None) or tp.importance.GroupMagnitudeImportance(p=2)
    o = TPOptions(round_to=kw.get("round_to"), ignored_layers=kw.get("ignored_layers"), importance=imp,
                  forward_fn=kw.get("forward_fn"), verify=False, prune_heads=bool(kw.get("prune_num_heads")))
    keeps = _allocate(model, example_inputs, calib, imp, o, {"macs": macs}, macs0, params0)[0]
    setup, plans = analyse(model, Strategy("budget", "magnitude", {}, 0.0, {}), example_inputs, o, keeps)
    out = kwargs_from(setup, plans, o.prune_heads, o.forward_fn)
    out["num_heads"].update(kw.get("num_heads") or {})
    out["customized_pruners"].update(kw.get("customized_pruners") or {})
    for key in set(kw) - set(out) - {"pruning_ratio", "global_pruning", "isomorphic", "round_to", "iterative_steps",
                                     "iterative_pruning_ratio_scheduler", "head_pruning_ratio"}:
        out[key] = kw[key]  # everything else of your call (output_transform, root_module_types ...)
    return {"importance": imp, **out}


def _probe(model: nn.Module, example_inputs: Any, o: TPOptions) -> None:
    """Prune a copy by a quarter of every group and verify it, before a budget spends minutes measuring: a graph
    Torch-Pruning cannot carry (timm's DenseNet, GhostNet) is refused in seconds, naming its first bad layer."""
    quarter = Strategy("trial: a quarter of every group", "magnitude", {layer.name: 0.25 for layer in inventory(model)}, 0.25, {})
    try:
        prune(model, quarter, example_inputs, options=replace(o, importance="magnitude"))
    except MixMatchError as exc:
        raise MixMatchError(f"a trial before the budget's allocation failed: {exc}") from None


def _allocate(work: nn.Module, example_inputs: Any, calib: Iterable[Any] | None, imp: Any, o: TPOptions,
              budget: dict[str, float], macs0: int, params0: int) -> tuple[dict[str, int], float, float, str]:
    """A budget's keep counts per group key, the size they give, the per-group cap and the allocation chosen; each candidate is
    pruned on a copy and counted (or timed, alternately with ``work``) for real."""
    kind = next(iter(budget))
    zero = Strategy("budget", "magnitude", {}, 0.0, {})
    count_opts = replace(o, importance="magnitude", verify=False)
    timing_inputs = example_inputs if o.latency_inputs is None else o.latency_inputs
    layout = _layout(work)  # timed as deployed: Torch-Pruning returns default-layout weights

    def timing(m: nn.Module) -> Any:
        return run_model(m, timing_inputs, o.forward_fn)

    def real_size(keeps: dict[str, int]) -> float:
        trial, trial_opts = safe_deepcopy((work, count_opts), work)  # ignored_layers follow to the copy
        setup, plans = analyse(trial, zero, example_inputs, trial_opts, keeps)
        _prune_planned(trial, example_inputs, tp.importance.GroupMagnitudeImportance(p=1), setup, plans, trial_opts, False)
        if kind == "latency":
            with torch.no_grad():
                dense, pruned = latencies([work, trial.to(memory_format=layout)], timing)
            return pruned / dense
        m, p = count_macs(trial, example_inputs)
        return m / macs0 if kind == "macs" else p / params0

    was = work.training
    try:
        setup = model_setup(work, o.ignored_layers, o.ignore_classifier)
        pruner = build_pruner(work, example_inputs, setup, o.prune_heads, o.forward_fn, imp)
        return allocate(work, example_inputs, pruner, calib, budget, real_size, o)
    finally:
        clear_caches(work)
        work.train(was)


def _layout(model: nn.Module) -> torch.memory_format:
    """The memory format the model's convolutions are laid out in: channels-last, or the default."""
    w = next((p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1), None)
    cl = w is not None and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _prune_planned(work: nn.Module, example_inputs: Any, imp: Any, setup: ModelSetup, plans: list[GroupPlan],
                   o: TPOptions, inplace: bool) -> tuple[tp.pruner.MetaPruner, list[RemovedItem], dict[str, int]]:
    """Remove the planned channels and repair timm attention; return the pruner, the removed items, the new heads."""
    head_dims = setup_head_dims(setup)  # before pruning: fix_attention rescales from these
    old_heads = setup_heads(setup)
    pruner, removed = _remove(work, example_inputs, imp, setup, plans, o, inplace)
    new_heads = {n: int(pruner.num_heads.get(a.qkv, a.num_heads)) for n, a in setup.attentions.items()}
    fix_attention(work, head_dims, new_heads)
    slice_bias_tables(work, pruner.pruning_history(), head_dims, old_heads)
    fix_dims(work)
    clear_caches(work)
    return pruner, removed, new_heads


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
    where = "ranking its first group"  # step() ranks a group before it yields it
    try:
        with torch.no_grad():
            for group in pruner.step(interactive=True):
                key = names.get(id(group[0].dep.target.module), "?")
                where = f"pruning the group of {key}"
                removed.extend(record_removed(group, pruner.DG, names, pnames))
                group.prune()
                where = f"ranking the group after {key}"
    except Exception as exc:
        state = ("the model was pruned in place and may be partly pruned: reload it, and build a new pruner (a failed "
                 "step() is used up)") if inplace else "your model is unchanged"
        if where.startswith("ranking") and (bad := _unrankable(pruner, names)):
            where = f"ranking the group of {bad}"
        raise MixMatchError(f"Torch-Pruning failed {where} ({type(exc).__name__}: {first_line(exc)}); "
                            f"{state}. Keep the failing layers intact (ignored_layers), or prune unstructured with mm.apply") from exc
    return pruner, removed


def _unrankable(pruner: tp.pruner.MetaPruner, names: Mapping[int, str]) -> str | None:
    """The first group whose importance Torch-Pruning cannot compute (its root's name), to say where it failed."""
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        try:
            pruner.estimate_importance(group)
        except Exception:
            return names.get(id(group[0].dep.target.module), "?")
    return None


def _results(work: nn.Module, setup: ModelSetup, plans: list[GroupPlan], out_before: dict[str, int]) -> list[GroupResult]:
    """Planned against realized pruning per group."""
    qkv_mods = {a.qkv for _, a in setup.attentions.items()}
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
    setup = model_setup(model, o.ignored_layers, o.ignore_classifier)
    head_dims = setup_head_dims(setup)
    old_heads = setup_heads(setup)
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
    slice_bias_tables(model, history, head_dims, old_heads)
    fix_dims(model)
    model.train(was)
    return model
