"""Rerun a model on fixed inputs with a few modules changed, skipping the calls that ran before them.

Measuring one layer's (or one channel group's) damage reruns the whole model, yet every module call that
finished before the first changed module ran gives exactly the dense output again. :class:`PrefixCache`
records the dense run once (the call tree, and the outputs of the calls that can be skipped for some change,
shallowest first, up to a memory cap), and :meth:`PrefixCache.run` returns those outputs instead of computing
them. The results are bit-identical to a full run; on a ViT or a ResNet about half the work goes.

A call is skipped only when its module is called exactly once per run (so the call is unambiguous), it ended
before the first call of any changed module, and no call enclosing it was skipped. Outputs are cloned when
recorded and when returned, so in-place operations downstream (``ReLU(inplace=True)``) cannot alter them. The model must be deterministic between
runs on the same inputs (eval mode, or BatchNorm in batch-statistics mode with momentum 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Most bytes of outputs kept per cache (all inputs together); calls beyond it are recomputed.
CACHE_BYTES = 1 << 30


@dataclass
class _Call:
    name: str
    start: int
    end: int
    parent: int | None
    nbytes: int | None = None


def _nbytes(out: Any) -> int | None:
    """Bytes of an output made of tensors (in tuples, lists, dicts); None for anything else, which is not cached."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    parts = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else None
    sizes = [_nbytes(p) for p in parts] if parts else [None]
    return None if any(n is None for n in sizes) else sum(n for n in sizes if n is not None)


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return type(out)((k, _clone(v)) for k, v in out.items())
    items = [_clone(o) for o in out]
    return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a namedtuple, or a tuple/list


class PrefixCache:
    """The dense run of ``run(model, x)`` for each of ``inputs``, for reruns where only the modules of one of
    ``changes`` differ (names of ``model``'s modules; a changed parameter's owner module).

    Example::

        cache = PrefixCache(model, batches, lambda m, x: m(x), changes=[{"blocks.3.mlp.fc1"}])
        with torch.no_grad():
            model.blocks[3].mlp.fc1.weight.zero_()
            outs = [cache.run(model, i, {"blocks.3.mlp.fc1"}) for i in range(len(batches))]
    """

    def __init__(self, model: nn.Module, inputs: Sequence[Any], run: Callable[[nn.Module, Any], Any],
                 changes: Collection[Collection[str]], max_bytes: int = CACHE_BYTES) -> None:
        self.inputs, self.fn = list(inputs), run
        self.outputs: list[Any] = []
        self.calls: list[list[_Call]] = []
        self.cached: list[dict[str, Any]] = []
        for x in self.inputs:
            calls, kept = self._record(model, x, set())  # the call tree and output sizes, nothing kept
            once = self._once(calls)
            wanted = {i for ch in changes for i in self._frontier(calls, once, ch, cached=None)}
            budget, keep = max_bytes // max(len(self.inputs), 1), set()
            for i in sorted(wanted, key=lambda i: (self._depth(calls, i), i)):
                size = calls[i].nbytes
                if size is not None and size <= budget:
                    keep.add(calls[i].name)
                    budget -= size
            if keep:  # a second run keeps what fits
                calls, kept = self._record(model, x, keep)
            self.calls.append(calls)
            self.outputs.append(kept.pop(""))
            self.cached.append(kept)

    def _record(self, model: nn.Module, x: Any, keep: set[str]) -> tuple[list[_Call], dict[str, Any]]:
        """One run: its calls in order, and the outputs of the ``keep`` modules (the model's own under "")."""
        calls: list[_Call] = []
        kept: dict[str, Any] = {}
        stack: list[int] = []
        clock = [0]

        def pre(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any) -> None:
                calls.append(_Call(name, clock[0], -1, stack[-1] if stack else None))
                stack.append(len(calls) - 1)
                clock[0] += 1
            return hook

        def post(module: nn.Module, args: Any, out: Any) -> None:
            c = calls[stack.pop()]
            c.end, c.nbytes = clock[0], _nbytes(out)
            if c.name in keep:
                kept[c.name] = _clone(out)  # before an in-place op downstream changes it
            clock[0] += 1

        handles = [h for n, m in model.named_modules() if n
                   for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post))]
        try:
            kept[""] = self.fn(model, x)
        finally:
            for h in handles:
                h.remove()
        return calls, kept

    @staticmethod
    def _once(calls: list[_Call]) -> set[str]:
        seen: dict[str, int] = {}
        for c in calls:
            seen[c.name] = seen.get(c.name, 0) + 1
        return {n for n, k in seen.items() if k == 1}

    @staticmethod
    def _depth(calls: list[_Call], i: int) -> int:
        d, p = 0, calls[i].parent
        while p is not None:
            d, p = d + 1, calls[p].parent
        return d

    @staticmethod
    def _frontier(calls: list[_Call], once: set[str], changed: Collection[str], cached: dict[str, Any] | None) -> list[int]:
        """The outermost calls that may be skipped when ``changed`` modules differ (and are cached, if given)."""
        hit = [c.start for c in calls if c.name in changed or any(c.name.startswith(n + ".") for n in changed if n)]
        if "" in changed or not hit:
            return []  # the root itself changed (a parameter of its own), or nothing changed that runs
        first = min(hit)
        skip: list[int] = []
        skipped: set[int] = set()
        for i, c in enumerate(calls):
            if c.parent is not None and c.parent in skipped:
                skipped.add(i)  # inside a skipped call: never runs
            elif c.end < first and c.name in once and (cached is None or c.name in cached):
                skip.append(i)
                skipped.add(i)
        return skip

    def run(self, model: nn.Module, index: int, changed: Collection[str]) -> Any:
        """``run(model, inputs[index])`` on ``model`` (the recorded one, or a copy with the same module names)
        where only the ``changed`` modules differ, with the unchanged prefix taken from the cache."""
        calls, cached = self.calls[index], self.cached[index]
        skip = [calls[i].name for i in self._frontier(calls, set(cached), changed, cached)]
        with _replaced(model, {n: cached[n] for n in skip}):
            return self.fn(model, self.inputs[index])


@contextlib.contextmanager
def _replaced(model: nn.Module, outputs: dict[str, Any]) -> Iterator[None]:
    """Each named module returns a clone of its recorded output instead of running."""
    mods = [model.get_submodule(n) for n in outputs]
    before = [m.__dict__.get("forward") for m in mods]  # a forward set on the instance (rare) comes back after
    for m, out in zip(mods, outputs.values(), strict=True):
        m.__dict__["forward"] = lambda *a, _o=out, **k: _clone(_o)
    try:
        yield
    finally:
        for m, f in zip(mods, before, strict=True):
            if f is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = f
