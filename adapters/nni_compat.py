"""Make NNI 3.0's ``ModelSpeedup`` work on torch >= 2.2 and Python 3.11, inside a context manager.

:func:`speedup_compat` applies the fixes of :data:`FIXES` while its ``with`` block runs (nothing is patched at
import); :func:`mask_updaters` keeps LayerNorm masks; :func:`plain_timm_layers` turns timm's ``BatchNormAct2d``
and ``Linear`` into plain layers. What each fix does and why: ``docs/adapters.md``. After speed-up call
``model.eval()``: BatchNorm comes back in training mode.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import sys
import textwrap
import types
import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch

from mixmatch_plugin.errors import MixMatchError

_JUMPS_311 = (
    "POP_JUMP_FORWARD_IF_FALSE", "POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_FALSE", "POP_JUMP_BACKWARD_IF_TRUE",
    "POP_JUMP_FORWARD_IF_NONE", "POP_JUMP_FORWARD_IF_NOT_NONE", "POP_JUMP_BACKWARD_IF_NONE",
    "POP_JUMP_BACKWARD_IF_NOT_NONE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE", "POP_JUMP_IF_FALSE",
    "POP_JUMP_IF_TRUE",
)
_ACTIVE = [0]
#: The fixes, by name (see the module docstring for what each one does).
FIXES = ("tensorbase", "is_impure", "bytecode", "handle_torch_function", "assert", "output_randomize")
_OLD_PREFIX = "func.__qualname__.startswith('_TensorBase')"
_NEW_PREFIX = "func.__qualname__.startswith(('_TensorBase', 'TensorBase'))"


def _modules() -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.common.concrete_trace_utils import concrete_proxy, concrete_tracer
    return concrete_tracer, concrete_proxy


def _patched_trace(ct: Any) -> Callable[..., Any]:
    """``ConcreteTracer.trace`` recompiled from NNI's source, accepting ``TensorBase`` methods (cause 1)."""
    src = textwrap.dedent(inspect.getsource(ct.ConcreteTracer.trace))
    if _OLD_PREFIX not in src:
        raise RuntimeError("this NNI version's ConcreteTracer.trace is not the one the compatibility layer knows (NNI 3.0)")
    src = src.replace(_OLD_PREFIX, _NEW_PREFIX)
    namespace: dict[str, Any] = {}
    exec(compile(src, ct.__file__, "exec"), ct.__dict__, namespace)  # NNI's own code, one expression changed
    fn: Callable[..., Any] = namespace["trace"]
    return fn


def _instructions_by_code_unit(code: types.CodeType, *args: Any, **kwargs: Any) -> list[Any]:
    """``dis`` instructions indexed by 2-byte code unit, caches included (cause 3)."""
    if sys.version_info < (3, 13):
        insts = list(dis.get_instructions(code, show_caches=True))
    else:  # pragma: no cover - 3.13 lists no caches; the slots below are filled
        insts = list(dis.get_instructions(code))
    n = len(code.co_code) // 2
    out: list[Any] = [None] * n
    for inst in insts:
        if 0 <= inst.offset // 2 < n:
            out[inst.offset // 2] = inst
    for i in range(1, n):  # a cache slot points at its instruction
        out[i] = out[i] if out[i] is not None else out[i - 1]
    return out


def _dis_shim() -> types.SimpleNamespace:
    shim = types.SimpleNamespace(**{k: getattr(dis, k) for k in dir(dis) if not k.startswith("__")})
    shim.get_instructions = _instructions_by_code_unit
    return shim


@contextlib.contextmanager
def speedup_compat(fixes: Collection[str] = FIXES) -> Iterator[None]:
    """Patch NNI 3.0's tracer for torch >= 2.2 while the block runs; restore everything afterwards.

    ``fixes`` selects which of the fixes (:data:`FIXES`) to apply: all by default. Leaving
    one out reproduces that crash (the tests do this to show each fix is needed).

    Example::

        from mixmatch_plugin.adapters.nni import speedup_compat, mask_updaters
        from nni.compression.speedup import ModelSpeedup
        with speedup_compat():
            ModelSpeedup(model, dummy_input, masks, customized_mask_updaters=mask_updaters()).speedup_model()
        model.eval()
    """
    if unknown := set(fixes) - set(FIXES):
        raise MixMatchError(f"unknown fix {sorted(unknown)[0]!r}; fixes are {', '.join(FIXES)}")
    ct, cp = _modules()
    saved: list[tuple[Any, str, Any]] = []

    def setp(obj: Any, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        if "tensorbase" in fixes:  # 1
            setp(ct.ConcreteTracer, "trace", _patched_trace(ct))
        if "is_impure" in fixes:  # 2: Node.is_impure(self, impure_random=True)
            original_impure = ct.node_is_impure_wrapper

            def node_is_impure_wrapper(node: Any, *args: Any, **kwargs: Any) -> bool:
                return bool(original_impure(node))

            setp(ct, "node_is_impure_wrapper", node_is_impure_wrapper)
        if "bytecode" in fixes:  # 3: Python 3.11 caches and jump names
            setp(cp, "dis", _dis_shim())
            jumps = tuple(dis.opmap[n] for n in _JUMPS_311 if n in dis.opmap)
            setp(cp.ConcreteProxy, "jump_opcodes", tuple(dict.fromkeys((*cp.ConcreteProxy.jump_opcodes, *jumps))))
        if "handle_torch_function" in fixes:  # 4: dispatch, do not record as a leaf
            import torch.overrides as overrides

            leaf = dict(ct.ConcreteTracer.default_autowrap_leaf_function)
            for f in (overrides.handle_torch_function, overrides.has_torch_function,
                      overrides.has_torch_function_unary, overrides.has_torch_function_variadic):
                leaf.pop(f, None)
            setp(ct.ConcreteTracer, "default_autowrap_leaf_function", leaf)
        if "assert" in fixes:  # 5: torch._assert on proxies
            original_assert = torch._assert

            def _assert(condition: Any, message: Any) -> None:
                while isinstance(condition, cp.ConcreteProxy):
                    condition = condition.value
                return original_assert(condition, message)

            for mod in list(sys.modules.values()):
                d = getattr(mod, "__dict__", None)
                if isinstance(d, dict) and d.get("_assert") is original_assert:
                    setp(mod, "_assert", _assert)
        if "output_randomize" in fixes:  # 6
            from nni.compression.speedup import mask_updater as mu

            def direct_update_process(self: Any, model_speedup: Any, node: Any) -> None:
                info = model_speedup.node_infos[node]
                info.output_masks = mu.tree_map_zip(lambda t: None, info.output_origin)
                for gone in model_speedup.user_to_last_uses.get(node, []) if model_speedup.garbage_collect_values else []:
                    model_speedup.node_infos[gone].output_randomize = None

            setp(mu.NoMaskUpdater, "direct_update_process", direct_update_process)
        _ACTIVE[0] += 1
        try:
            yield
        finally:
            _ACTIVE[0] -= 1
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def is_active() -> bool:
    """Whether a :func:`speedup_compat` block is running."""
    return _ACTIVE[0] > 0


def _layer_norm_updater_class() -> type:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nni.compression.speedup.mask_updater import DefaultMaskUpdater

    class LayerNormMaskUpdater(DefaultMaskUpdater):
        """LayerNorm passes masks through unchanged (NNI would empty them; see the module docstring)."""

        def detect(self, model_speedup: Any, node: Any) -> bool:
            if node.op == "call_function":
                return node.target in (torch.nn.functional.layer_norm, torch.layer_norm)
            if node.op == "call_module":
                return isinstance(model_speedup.fetch_attr(node.target), torch.nn.LayerNorm)
            return False

        def direct_update_process(self, model_speedup: Any, node: Any) -> None:
            info = model_speedup.node_infos[node]
            out = info.output_origin
            shape = list(out.shape)
            shape[model_speedup.batch_dim] = 1
            info.output_masks = torch.ones(shape, dtype=torch.float32, device=out.device)

        def indirect_update_process(self, model_speedup: Any, node: Any) -> None:
            from torch.fx.node import Node

            info = model_speedup.node_infos[node]
            info.output_masks = model_speedup.indirect_calc_mask(info.output_grad, info.output_masks)
            input_node = node.args[0] if node.args else node.kwargs.get("input")
            if isinstance(input_node, Node):
                origin = model_speedup.node_infos[input_node].output_origin
                dummy = torch.rand_like(origin)
                dummy.grad = torch.ones_like(origin)
                model_speedup.indirect_pass_grad(input_node, dummy)

    return LayerNormMaskUpdater


def mask_updaters() -> list[Any]:
    """Mask updaters for ``ModelSpeedup(customized_mask_updaters=...)``: :class:`LayerNormMaskUpdater`."""
    return [_layer_norm_updater_class()()]


def plain_timm_layers(model: torch.nn.Module) -> list[str]:
    """Replace timm's ``BatchNormAct2d`` by ``Sequential(BatchNorm2d, drop, act)`` and timm's ``Linear`` by
    ``nn.Linear`` (same weights; call before pruning, the names change); return the replaced BatchNorms' names."""
    nn = torch.nn
    renamed: list[str] = []
    for name, parent in list(model.named_modules()):
        for child_name, c in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(c, nn.Linear) and type(c) is not nn.Linear and type(c).__name__ == "Linear":
                new: nn.Module = nn.Linear(c.in_features, c.out_features, c.bias is not None)
                new.load_state_dict(c.state_dict())
            elif isinstance(c, nn.BatchNorm2d) and type(c).__name__ == "BatchNormAct2d":
                bn = nn.BatchNorm2d(c.num_features, c.eps, c.momentum, c.affine, c.track_running_stats)
                bn.load_state_dict(c.state_dict(), strict=False)
                rest: Any = (c.drop, c.act)
                new = nn.Sequential(bn, *rest)
                renamed.append(full)
            else:
                continue
            setattr(parent, child_name, new.train(c.training))
    return renamed
