"""Consistency: MACs counting, the zeroed reference a pruned model must match, and where it diverges."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from mixmatch_plugin.errors import MixMatchError, first_line

from .planning import ModelSetup, model_setup
from .report import RemovedItem
from .timm_layers import (
    LEAF_PRUNERS,
    clear_caches,
    run_model,
    safe_deepcopy,
    stream_leaf,
    timm_classes,
    tracing_forward,
)


def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """``(MACs, params)`` of ``model`` on ``example_inputs`` by Torch-Pruning's counter (no gradients)."""
    clear_caches(model)  # Torch-Pruning counts on a deep copy, in eval mode
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def record_removed(group: Any, DG: Any, names: Mapping[int, str], pnames: Mapping[int, str]) -> list[RemovedItem]:
    out: list[RemovedItem] = []
    for dep, idxs in group:
        mod = dep.target.module
        fn = dep.handler
        side = "out" if DG.is_out_channel_pruning_fn(fn) else "in"
        owner = getattr(fn, "__self__", None)
        kind = type(owner).__name__.replace("Pruner", "").lower() if owner is not None else getattr(fn, "__name__", "?")
        if isinstance(mod, nn.Parameter):
            if (n := pnames.get(id(mod))) is None:
                continue
            out.append(RemovedItem(n, side, "parameter", sorted(int(i) for i in idxs), True, int(dep.target.pruning_dim)))
        elif isinstance(mod, nn.Module) and id(mod) in names:
            if DG.is_out_channel_pruning_fn(fn) and DG.is_in_channel_pruning_fn(fn):
                side = "out"  # one function for both sides (norms, depthwise convs)
            if isinstance(owner, LEAF_PRUNERS):
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
        setup = model_setup(model, None, False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
            DG = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=tracing_forward(setup.customized, forward_fn), unwrapped_parameters=list(setup.unwrapped),
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
        out.extend(record_removed(group, DG, names, pnames))
    return out


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def relative_difference(a: Any, b: Any) -> float:
    """``max|a - b| / max|b|`` over all output tensors (``inf`` when the structures differ)."""
    ta, tb = flat_outputs(a), flat_outputs(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb, strict=True)):
        return math.inf
    return max([0.0, *(float((x.detach().float() - y.detach().float()).abs().max()) / max(float(y.detach().abs().max()), 1e-12)
                       for x, y in zip(ta, tb, strict=True) if y.numel())])


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
    ref = safe_deepcopy(model)
    ln2d = timm_classes()["layernorm2d"]
    ln_removed: dict[str, set[int]] = {}
    with torch.no_grad():
        for item in removed:
            idx = torch.tensor(item.idxs, dtype=torch.long)
            if item.is_param:
                ref.get_parameter(item.target).index_fill_(item.dim, idx, 0.0)
                continue
            m: Any = ref.get_submodule(item.target)
            if isinstance(m, nn.LayerNorm):
                ln_removed.setdefault(item.target, set()).update(item.idxs)
            elif item.kind == "patchmerging":
                if item.side == "out":
                    m.reduction.weight.index_fill_(0, idx, 0.0)
                else:
                    ln_removed.setdefault(f"{item.target}.norm", set()).update(k * m.dim + i for k in range(4) for i in item.idxs)
            elif (leaf := stream_leaf(m)) is not None:
                inner = {id(c): n for n, c in m.named_modules()}
                for c in leaf.reads(m) if item.side == "in" else leaf.writes(m):
                    if isinstance(c, nn.LayerNorm) and item.side == "in":  # a norm on the input: over the kept channels
                        ln_removed.setdefault(f"{item.target}.{inner[id(c)]}", set()).update(item.idxs)
                    elif item.side == "out" or isinstance(c, nn.modules.batchnorm._BatchNorm):
                        _zero_out(c, idx)  # rows written, or a norm's scale and shift: 0 exactly
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
        w.index_fill_(1 if getattr(m, "transposed", False) else 0, idx, 0.0)
    b = getattr(m, "bias", None)
    if isinstance(b, torch.Tensor):
        b.index_fill_(0, idx, 0.0)


def _hint(setup: ModelSetup) -> str:
    return f" Torch-Pruning guessed the channel dimension of: {', '.join(setup.guessed[:4])}." if setup.guessed else ""


def check_runs(model: nn.Module, example_inputs: Any, forward_fn: Callable[..., Any] | None, setup: ModelSetup) -> None:
    """Run the pruned model once; a failure names the innermost module that was running."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example_inputs, forward_fn)
    except Exception as exc:
        where = _failing_module(model, example_inputs, forward_fn)
        raise MixMatchError(
            f"the pruned model fails to run in unsupported layer {where} ({type(exc).__name__}: "
            f"{first_line(exc)});{_hint(setup)} keep it intact (ignored_layers) or use mm.apply"
        ) from None
    finally:
        model.train(was)


def verify_pruned(original: nn.Module, pruned: nn.Module, removed: Sequence[RemovedItem], example_inputs: Any,
            forward_fn: Callable[..., Any] | None, setup: ModelSetup, tolerance: float) -> float:
    """Compare the pruned model with the zeroed reference, then run a backward pass; return the difference."""
    ref = zeroed_reference(original, removed)
    was = pruned.training
    pruned.eval()
    ref.eval()
    try:
        with torch.no_grad():
            want = run_model(ref, example_inputs, forward_fn)
            got = run_model(pruned, example_inputs, forward_fn)
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
            out = run_model(pruned, example_inputs, forward_fn)
            loss = sum(t.float().pow(2).mean() for t in flat_outputs(out) if t.is_floating_point())
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
                if ts := [t for t in flat_outputs(out) if t.is_floating_point()]:
                    rows.append((name, type(mod).__name__, sum(float(t.double().sum()) for t in ts),
                                 sum(float(t.double().pow(2).sum()) for t in ts)))
            hooks.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                run_model(model, example_inputs, forward_fn)
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
            run_model(model, example_inputs, forward_fn)
    except Exception:  # only the location matters here
        failed = list(stack)
    finally:
        for h in hooks:
            h.remove()
    return f"{failed[-1]} ({type(model.get_submodule(failed[-1])).__name__})" if failed and failed[-1] else "(the model's own forward)"
