"""A MACs, parameter or latency budget: measured loss curves per dependency group, greedy allocation, the budget met.

Each group's curve is the KL divergence to the dense outputs (on the calibration inputs) with 10 %, 20 %, ...
90 % of its channels zeroed alone, in Torch-Pruning's own importance order (zeroed equals removed: see
:func:`.verify.zeroed_reference`). :func:`mixmatch_plugin.budget.removal_path` removes channels where loss per
MAC saved is lowest; of that path, the prefix whose size by Torch-Pruning's counter is closest to the budget wins.
The curves measure each group alone, so the path is built under several per-group caps (``TPOptions.caps``), one
global threshold on the groups' importance gives others (raw and LAMP-normalised, ``TPOptions.thresholds``: the
allocations of Torch-Pruning's own global pruning), and the one whose whole allocation, zeroed together, stays
closest to the dense outputs is kept (:func:`choose_allocation`).
A latency budget follows the path under ``max_ratio`` and cuts it where the measured latency of the pruned model is closest.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils.op_counter import is_supported_instance

from mixmatch_plugin.batches import iterate
from mixmatch_plugin.budget import closest_prefix, convex_curve, module_costs, removal_path, skip_overshoot
from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.evaluation import reestimate_bn
from mixmatch_plugin.prefix import PrefixCache
from mixmatch_plugin.progress import progress_bar

from .timm_layers import LEAF_PRUNERS, run_model
from .verify import flat_outputs, record_removed, zeroed_reference

logger = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """A group as ``MetaPruner`` ranks it: its ratio-dict key, its units (channels per channel group, or whole
    heads), its root, its units from least to most important, its member modules, and the root indices per unit
    (a head's ``head_dim``; 1 for a channel)."""

    key: str
    channels: int
    channel_groups: int
    root: Any
    fn: Any
    order: list[int]
    members: set[nn.Module]
    unit: int = 1
    scores: tuple[float, ...] = ()  # the units' importance, in ``order``

    def indices(self, n: int) -> list[int]:
        """The root's indices of the ``n`` least important units (repeated in every channel group)."""
        width = self.channels * self.unit
        return sorted(j + u * self.unit + h * width for h in range(self.channel_groups) for u in self.order[:n] for j in range(self.unit))


def channel_groups(pruner: tp.pruner.MetaPruner, model: nn.Module, heads: bool = False) -> list[ChannelGroup]:
    """The groups ``pruner.step()`` would prune, ranked on the dense model (as ``MetaPruner._prune`` does); with
    ``heads``, an attention group's units are its heads, ranked by their mean importance (as Torch-Pruning ranks them)."""
    names, DG = {m: n for n, m in model.named_modules()}, pruner.DG
    out: list[ChannelGroup] = []
    for group in DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        key = next((names[d.target.module] for d, _ in group if isinstance(d.target.module, (nn.modules.conv._ConvNd, nn.Linear))
                    and d.target.module in names and DG.is_out_channel_pruning_fn(d.handler)), None)
        if key is None or not pruner._check_pruning_ratio(group):
            continue
        attention = bool(pruner._is_atten_group(group)[0])
        if attention:
            group = pruner._downstream_node_as_root_if_attention(group)
        try:
            imp = None if group is None else pruner.estimate_importance(group)
        except Exception as exc:  # Torch-Pruning's index maps break on some graphs (timm's Res2Net)
            raise MixMatchError(f"Torch-Pruning cannot rank the channels of the group of {key} ({type(exc).__name__}: "
                                f"{first_line(exc)}); keep it intact (ignored_layers), or prune unstructured with mm.apply") from exc
        if imp is None:
            continue
        chg = int(pruner._get_channel_groups(group))
        members = {d.target.module for d, _ in group if isinstance(d.target.module, nn.Module)}
        for d, _ in group:  # the adapter's own pruners own whole modules: their inner layers scale with the group
            if isinstance(owner := getattr(d.handler, "__self__", None), LEAF_PRUNERS):
                members.update(owner.scaled(d.target.module, "out" if d.handler == owner.prune_out_channels else "in"))
        root, fn = group[0].dep.target.module, group[0].dep.handler
        if attention and heads:
            qkv = next(m for m in members if m in pruner.num_heads)
            h = int(pruner.num_heads[qkv])
            head_imp = imp.view(h, -1).mean(1).cpu()
            order = torch.argsort(head_imp, stable=True).tolist()
            out.append(ChannelGroup(key, h, 1, root, fn, order, members, len(imp) // h, tuple(head_imp[order].tolist())))
        else:
            imp = (imp.view(chg, -1).mean(0) if chg > 1 else imp).cpu()
            order = torch.argsort(imp, stable=True).tolist()
            out.append(ChannelGroup(key, len(imp), chg, root, fn, order, members, scores=tuple(imp[order].tolist())))
    return out


def log_probs(out: Any) -> torch.Tensor:
    """The log-softmax of a model's first output, flattened per sample."""
    return torch.log_softmax(flat_outputs(out)[0].float().flatten(1), -1)


def mean_kl(outs: Iterable[Any], dense: list[torch.Tensor]) -> float:
    """The mean over batches of the KL divergence of ``outs`` (model outputs) to ``dense`` (log-probabilities)."""
    return sum(float(nn.functional.kl_div(log_probs(o), d, log_target=True, reduction="batchmean"))
               for o, d in zip(outs, dense, strict=True)) / len(dense)


@torch.no_grad()
def loss_curves(model: nn.Module, pruner: tp.pruner.MetaPruner, groups: list[ChannelGroup], inputs: list[Any],
                forward_fn: Callable[..., Any] | None) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Per group: the convex loss-increase curve over 0..C removed channels (KL to the dense outputs), and the dense
    log-probabilities per input. Each zeroed model reruns only what follows the group's first module
    (:class:`~mixmatch_plugin.prefix.PrefixCache`)."""
    names, pnames = {id(m): k for k, m in model.named_modules()}, {id(p): k for k, p in model.named_parameters()}
    was = model.training
    model.eval()
    counts = [sorted({round(r * g.channels / 10) for r in range(1, 10)} - {0, g.channels}) for g in groups]
    removed = [[record_removed(pruner.DG.get_pruning_group(g.root, g.fn, g.indices(n)), pruner.DG, names, pnames) for n in cs]
               for g, cs in zip(groups, counts, strict=True)]
    changed = [{(i.target.rpartition(".")[0] if i.is_param else i.target) for r in rs for i in r} for rs in removed]
    cache = PrefixCache(model, inputs, lambda m, x: run_model(m, x, forward_fn), changed)
    dense, curves = [log_probs(o) for o in cache.outputs], []
    for g, cs, rs, ch in progress_bar(zip(groups, counts, removed, changed, strict=True), "group curves", total=len(groups)):
        kl = []
        for r in rs:
            z = zeroed_reference(model, r).eval()
            kl.append(mean_kl((cache.run(z, i, ch) for i in range(len(dense))), dense))
        curves.append(convex_curve(g.channels, cs, kl))
    model.train(was)
    return curves, dense


def layer_costs(model: nn.Module, example_inputs: Any, groups: list[ChannelGroup], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per module Torch-Pruning's counter counts (a layer, or a whole timm attention): its MACs or parameters, and
    which groups' widths it scales with (those of it or its children)."""
    with torch.no_grad():  # on a deep copy, in eval mode
        _, _, flops, params = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    per, units, stack = flops if kind == "macs" else params, [], [model]
    while stack:
        m = stack.pop()
        units += [m] if is_supported_instance(m) and per.get(m) else []
        stack += [] if is_supported_instance(m) else list(m.children())
    uses = np.array([[any(c in g.members for c in m.modules()) for g in groups] for m in units], float)
    return np.array([float(per[m]) for m in units]), uses.reshape(len(units), len(groups))


def modelled_keeps(path: Sequence[tuple[int, int]], channels: np.ndarray, cost: np.ndarray, uses: np.ndarray,
                   target: float) -> tuple[np.ndarray, float]:
    """The keep counts of the prefix of ``path`` whose size by the cost model of
    :func:`~mixmatch_plugin.budget.removal_path` is closest to ``target`` (a fraction), and that size."""
    def size(keep: np.ndarray) -> float:
        return float(module_costs(keep, channels, cost, uses).sum() / cost.sum())

    keep = channels.astype(float)
    best = (keep.copy(), size(keep))
    for g, s in path:
        keep[g] -= s
        f = size(keep)
        if abs(f - target) < abs(best[1] - target):
            best = (keep.copy(), f)
        if f < target:
            break
    return best


@torch.no_grad()
def joint_kl(model: nn.Module, pruner: tp.pruner.MetaPruner, groups: list[ChannelGroup], keep: np.ndarray,
             inputs: list[Any], dense: list[torch.Tensor], forward_fn: Callable[..., Any] | None) -> float:
    """KL of the model with every group cut to ``keep`` at once (zeroed on a copy, BatchNorm re-estimated on
    ``inputs``) to the dense log-probabilities ``dense``, averaged over ``inputs``."""
    names, pnames = {id(m): k for k, m in model.named_modules()}, {id(p): k for k, p in model.named_parameters()}
    removed = [item for g, k in zip(groups, keep, strict=True) if k < g.channels
               for item in record_removed(pruner.DG.get_pruning_group(g.root, g.fn, g.indices(g.channels - int(k))), pruner.DG, names, pnames)]
    z = zeroed_reference(model, removed).eval()
    reestimate_bn(z, inputs, len(inputs), run=lambda m, x: run_model(m, x, forward_fn))
    return mean_kl((run_model(z, x, forward_fn) for x in inputs), dense)


def threshold_path(groups: Sequence[ChannelGroup], lamp: bool, lo: Sequence[int], step: Sequence[int]) -> list[tuple[int, int]]:
    """The removal order of one global threshold rising over the groups' unit importances, ``[(group, units), ...]``
    down to ``lo``: raw (Torch-Pruning's ``global_pruning``), or LAMP-normalised within each group (a unit's squared
    score over the sum of the squares of those not below it; Lee et al., ICLR 2021). A move removes one ``step``
    of a group, ranked by the largest score it removes."""
    moves: list[tuple[float, int, int, int]] = []
    for gi, (g, low, s) in enumerate(zip(groups, lo, step, strict=True)):
        v = np.asarray(g.scores, float)
        if len(v) != g.channels:
            continue
        if lamp:
            sq = v ** 2
            v = sq / np.maximum(np.cumsum(sq[::-1])[::-1], 1e-300)
        removed = 0
        while g.channels - removed - s >= low:
            removed += s
            moves.append((float(v[removed - 1]), gi, s, removed))
    return [(gi, s) for _, gi, s, _ in sorted(moves)]


def choose_allocation(model: nn.Module, pruner: tp.pruner.MetaPruner, groups: list[ChannelGroup],
                      paths: Mapping[str, Callable[[], list[tuple[int, int]]]], cost: tuple[np.ndarray, np.ndarray],
                      inputs: list[Any], dense: list[torch.Tensor], target: float, forward_fn: Callable[..., Any] | None) -> str:
    """The name of the removal path whose allocation at ``target`` (by the cost model ``(cost, uses)``), zeroed whole,
    has the least KL to the dense log-probabilities ``dense`` on ``inputs``; the first on a tie. ``paths`` builds each
    path on demand; paths that cannot reach ``target`` are skipped (all of them: the first)."""
    channels = np.array([g.channels for g in groups], float)
    scores: dict[str, float] = {}
    by_keep: dict[tuple[float, ...], float] = {}  # paths that give the same allocation are measured once
    for name, path in paths.items():
        keep, got = modelled_keeps(path(), channels, *cost, target)
        if got > 1.01 * target:
            continue
        if (key := tuple(keep)) not in by_keep:
            by_keep[key] = joint_kl(model, pruner, groups, keep, inputs, dense, forward_fn)
        scores[name] = by_keep[key]
    if not scores:
        return next(iter(paths))
    best = min(scores, key=scores.__getitem__)
    logger.info("allocation %s (KL to the dense outputs: %s)", best, ", ".join(f"{n}: {v:.4f}" for n, v in scores.items()))
    return best


def allocate(model: nn.Module, example_inputs: Any, pruner: tp.pruner.MetaPruner, calib: Iterable[Any] | None,
             budget: Mapping[str, float], real_size: Callable[[dict[str, int]], float], opts: Any) -> tuple[dict[str, int], float, float, str]:
    """Channels to keep per group key so that ``real_size(keeps)`` (a fraction of the dense size) meets ``budget``
    (``{"macs": f}``, ``{"params": f}`` or ``{"latency": f}``), that fraction, the per-group cap used and the
    allocation chosen (``cap 0.8``, ``lamp threshold``, ...); ``opts`` is a ``TPOptions`` (``max_ratio``, ``caps``,
    ``thresholds``, ``round_to``, ``max_batches``)."""
    (kind, target), = budget.items()
    if not 0.0 < target < 1.0:
        raise MixMatchError(f"{kind}={target!r}: pass the fraction of {kind} to keep, in (0, 1)")
    if calib is None:
        logger.warning("no calibration data: the %s budget is allocated on example_inputs alone (pass calib=)", kind)
    inputs = [example_inputs] if calib is None else [b[0] if isinstance(b, (tuple, list)) else b for b in iterate(calib, opts.max_batches)]
    groups = channel_groups(pruner, model, opts.prune_heads)
    steps = [1 if g.unit > 1 else opts.round_to or 1 for g in groups]  # whole heads are not rounded

    def floors(cap: float) -> list[int]:
        return [s * max(1, math.ceil(math.ceil(g.channels * (1 - cap) - 1e-9) / s)) for g, s in zip(groups, steps, strict=True)]

    curves, dense = loss_curves(model, pruner, groups, inputs, opts.forward_fn)
    cost = layer_costs(model, example_inputs, groups, "params" if kind == "params" else "macs")

    @functools.cache
    def path_for(cap: float) -> list[tuple[int, int]]:
        return removal_path(curves, *cost, floors(cap), steps)

    caps = [float(opts.max_ratio), *sorted((float(c) for c in opts.caps if c < opts.max_ratio), reverse=True)]
    paths: dict[str, Callable[[], list[tuple[int, int]]]] = {f"cap {c:g}": functools.partial(path_for, c) for c in caps}
    paths.update({f"{t} threshold": functools.partial(threshold_path, groups, t == "lamp", floors(opts.max_ratio), steps)
                  for t in opts.thresholds})
    chosen = next(iter(paths))
    if kind != "latency" and calib is not None and len(paths) > 1:
        chosen = choose_allocation(model, pruner, groups, paths, cost, inputs, dense, target, opts.forward_fn)
    path = paths[chosen]()
    cap = next((c for c in caps if chosen == f"cap {c:g}"), float(opts.max_ratio))

    def keeps(moves: Sequence[tuple[int, int]]) -> dict[str, int]:
        k = {g.key: g.channels for g in groups}
        for gi, s in moves:
            k[groups[gi].key] -= s
        return k

    n, got = closest_prefix(len(path), lambda n: real_size(keeps(path[:n])), target)
    tol = 0.05 if kind == "latency" else 0.01
    if n == len(path) and got > (1 + tol) * target:
        fix = "time a larger batch (latency_inputs): per-layer overheads do not shrink with width; or keep more" \
            if kind == "latency" else "raise max_ratio, ignore fewer layers, or keep more"
        raise MixMatchError(f"the {kind} budget {target:.3f} cannot be met (the groups' bounds allow {got:.4f}): {fix}")
    best, moves = (path[:n], got), path
    for _ in range(3):  # one group's step (a wide group, a large round_to) jumps across the budget: skip it
        at = n if got > target else n - 1  # the move that crosses the budget
        if abs(best[1] - target) <= tol * target or not 0 <= at < len(moves):
            break
        moves = skip_overshoot(moves, at)

        def size(j: int, m: Sequence[tuple[int, int]] = moves, a: int = at) -> float:
            return real_size(keeps(m[:a + j]))

        j, got = closest_prefix(len(moves) - at, size, target)
        n = at + j
        logger.debug("skip at %d: %d moves left, got %.4f", at, len(moves) - at, got)
        if abs(got - target) < abs(best[1] - target):
            best = (moves[:n], got)
    if abs(best[1] - target) > tol * target:
        why = "timing noise, or one channel is a large step" if kind == "latency" else "one channel is a large step in this model"
        logger.warning("the %s budget %.3f is met to %.4f only: %s", kind, target, best[1], why)
    return keeps(best[0]), best[1], cap, chosen
