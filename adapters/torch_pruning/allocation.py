"""Channel groups under a MACs or parameter budget: measured loss curves, greedy allocation, exact budget.

For every dependency group, in Torch-Pruning's own order of channel importance, the loss increase
(KL divergence to the dense outputs) of zeroing 10 %, 20 %, ... 90 % of the group alone is measured on
the calibration inputs (zeroed equals removed: see :func:`.verify.zeroed_reference`). The greedy
:func:`mixmatch_plugin.budget.removal_path` then removes channels where loss per MAC saved is lowest, and
the path prefix whose real size, by Torch-Pruning's counter on the pruned copy, is closest to the budget wins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils.op_counter import is_supported_instance

from mixmatch_plugin.batches import iterate
from mixmatch_plugin.budget import closest_prefix, convex_curve, removal_path
from mixmatch_plugin.errors import MixMatchError

from .verify import flat_outputs, record_removed, run_model, zeroed_reference

logger = logging.getLogger(__name__)
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class ChannelGroup:
    """One group as ``MetaPruner`` ranks it: ``key`` (its ratio-dict module's name), channels per channel group,
    channel groups (heads), the root it is pruned from, and its channels from least to most important."""

    key: str
    channels: int
    channel_groups: int
    root: Any
    fn: Any
    order: list[int]
    members: set[nn.Module]


def channel_groups(pruner: tp.pruner.MetaPruner, model: nn.Module) -> list[ChannelGroup]:
    """The groups ``pruner.step()`` would prune, with the dense model's importance order (as ``MetaPruner._prune``)."""
    names = {m: n for n, m in model.named_modules()}
    out: list[ChannelGroup] = []
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        key = next((names[d.target.module] for d, _ in group if isinstance(d.target.module, (nn.modules.conv._ConvNd, nn.Linear))
                    and d.target.module in names and pruner.DG.is_out_channel_pruning_fn(d.handler)), None)
        if key is None or not pruner._check_pruning_ratio(group):
            continue
        if pruner._is_atten_group(group)[0]:
            group = pruner._downstream_node_as_root_if_attention(group)
        imp = None if group is None else pruner.estimate_importance(group)
        if imp is None:
            continue
        chg = int(pruner._get_channel_groups(group))
        dim_imp = imp.view(chg, -1).mean(0) if chg > 1 else imp
        members = {d.target.module for d, _ in group if isinstance(d.target.module, nn.Module)}
        out.append(ChannelGroup(key, len(dim_imp), chg, group[0].dep.target.module, group[0].dep.handler,
                                [int(i) for i in torch.argsort(dim_imp.cpu(), stable=True)], members))
    return out


def _zeroed(model: nn.Module, pruner: tp.pruner.MetaPruner, g: ChannelGroup, n: int) -> nn.Module:
    idxs = sorted(j + h * g.channels for h in range(g.channel_groups) for j in g.order[:n])
    group = pruner.DG.get_pruning_group(g.root, g.fn, idxs)
    names = {id(m): k for k, m in model.named_modules()}
    pnames = {id(p): k for k, p in model.named_parameters()}
    return zeroed_reference(model, record_removed(group, pruner.DG, names, pnames)).eval()


@torch.no_grad()
def loss_curves(model: nn.Module, pruner: tp.pruner.MetaPruner, groups: list[ChannelGroup], inputs: list[Any],
                forward_fn: Callable[..., Any] | None) -> list[np.ndarray]:
    """Per group: the convex loss-increase curve (KL to the dense outputs) over 0..C removed channels."""
    def logp(m: nn.Module) -> list[torch.Tensor]:
        return [torch.log_softmax(flat_outputs(run_model(m, x, forward_fn))[0].float().flatten(1), -1) for x in inputs]

    was = model.training
    dense = logp(model.eval())
    curves = []
    for g in groups:
        counts = sorted({round(r * g.channels) for r in RATIOS} - {0, g.channels})
        kl = [sum(float(torch.nn.functional.kl_div(z, d, log_target=True, reduction="batchmean"))
                  for z, d in zip(logp(_zeroed(model, pruner, g, n)), dense, strict=True)) / len(inputs) for n in counts]
        curves.append(convex_curve(g.channels, counts, kl))
    model.train(was)
    return curves


def layer_costs(model: nn.Module, example_inputs: Any, groups: list[ChannelGroup], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per counted module (the outermost that Torch-Pruning's counter counts: a layer, or a whole timm attention):
    its MACs (or parameters), and which groups' widths it scales with (those of its own or its children's)."""
    was = model.training
    with torch.no_grad():
        _, _, flops, params = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was)
    per = flops if kind == "macs" else params
    units: list[nn.Module] = []
    stack = [model]
    while stack:
        m = stack.pop()
        if is_supported_instance(m):
            units.append(m) if per.get(m) else None
        else:
            stack.extend(m.children())
    uses = np.array([[any(c in g.members for c in m.modules()) for g in groups] for m in units], float)
    return np.array([float(per[m]) for m in units]), uses.reshape(len(units), len(groups))


def allocate(model: nn.Module, example_inputs: Any, pruner: tp.pruner.MetaPruner, calib: Iterable[Any] | None,
             budget: Mapping[str, float], real_size: Callable[[dict[str, int]], float], opts: Any) -> dict[str, int]:
    """Channels to keep per group key so that ``real_size(keeps)`` (a fraction of the dense size) meets the budget.

    ``budget`` is ``{"macs": fraction}`` or ``{"params": fraction}``; ``opts`` a ``TPOptions`` (``max_ratio``,
    ``round_to``, ``max_batches``, ``forward_fn``).
    """
    (kind, target), = budget.items()
    if not 0.0 < target < 1.0:
        raise MixMatchError(f"{kind}={target!r}: pass the fraction of {kind.upper() if kind == 'macs' else kind} to keep, in (0, 1)")
    if calib is None:
        logger.warning("no calibration data: the %s budget is allocated from example_inputs alone (pass calib= for better)", kind)
    inputs = [example_inputs] if calib is None else [b[0] if isinstance(b, (tuple, list)) else b for b in iterate(calib, opts.max_batches)]
    groups = channel_groups(pruner, model)
    step = opts.round_to or 1
    lo = [step * max(1, math.ceil(math.ceil(g.channels * (1 - opts.max_ratio) - 1e-9) / step)) for g in groups]
    path = removal_path(loss_curves(model, pruner, groups, inputs, opts.forward_fn),
                        *layer_costs(model, example_inputs, groups, kind), lo, step)

    def keeps(n: int) -> dict[str, int]:
        k = {g.key: g.channels for g in groups}
        for gi, s in path[:n]:
            k[groups[gi].key] -= s
        return k

    n, got = closest_prefix(len(path), lambda n: real_size(keeps(n)), target)
    if n == len(path) and got > 1.01 * target:
        raise MixMatchError(
            f"the {kind} budget {target:.3f} cannot be met (the most the groups' bounds allow: {got:.4f}): "
            "raise max_ratio, ignore fewer layers, or keep more"
        )
    if abs(got - target) > 0.01 * target:
        logger.warning("the %s budget %.3f is met to %.4f only: one channel is a large step in this model", kind, target, got)
    logger.info("%s budget %.3f: %.4f of the dense model, %d groups", kind, target, got, len(groups))
    return keeps(n)
