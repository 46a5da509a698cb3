"""The pruned-model file written by ``mixmatch prune``: weights plus enough to rebuild the model.

``mixmatch.pruned/1`` is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"format": "mixmatch.pruned/1", "backend": "torch" | "nni" | "tp",
     "model": {"model": "<spec>", "model_kwargs": {...}, "input_shape": [C, H, W]},
     "strategy": {...},            # the strategy, as in the plan JSON
     "state_dict": {...},          # the pruned weights
     "tp": {"history": [[module, is_out, [indices]], ...], "num_heads": {...}},   # tp only
     "report": {...}}              # what the backend reported

For ``torch`` and ``nni`` the architecture is unchanged (pruned weights are zeros), so the model is
rebuilt from its spec and the state dict loaded. For ``tp`` the channels are gone: the original
model is rebuilt and Torch-Pruning's pruning history re-applied before the weights are loaded.
The model is rebuilt from the file's spec only for ``timm:NAME`` and this package's factories; for
any other factory pass the original model yourself (``load_pruned(path, model=...)``): a file may
not choose which code runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.io import atomic_torch_save, safe_torch_load

FORMAT = "mixmatch.pruned/1"
BACKENDS = ("torch", "nni", "tp")


def save_pruned(
    path: str | Path,
    model: nn.Module,
    *,
    backend: str,
    model_spec: Mapping[str, Any],
    strategy: Mapping[str, Any],
    report: Mapping[str, Any] | None = None,
    tp_history: list[list[Any]] | None = None,
    num_heads: Mapping[str, int] | None = None,
) -> Path:
    """Write the pruned model atomically (see the module docstring for the layout)."""
    if backend not in BACKENDS:
        raise MixMatchError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tp" and tp_history is None:
        raise MixMatchError("a tp artifact needs the pruning history (TPResult.history)")
    obj: dict[str, Any] = {"format": FORMAT, "backend": backend, "model": dict(model_spec), "strategy": dict(strategy),
                           "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                           "report": _plain(report or {})}
    if backend == "tp":
        obj["tp"] = {"history": tp_history, "num_heads": dict(num_heads or {})}
    return atomic_torch_save(path, obj)


def _plain(obj: Any) -> Any:
    """Only containers, str, numbers, bools and None (``weights_only`` loading accepts them)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def load_pruned(path: str | Path, model: nn.Module | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the pruned model from a ``mixmatch prune`` file; return ``(model, metadata)``.

    Args:
        path: the file.
        model: the *original* (unpruned) model to load into, built by you. Needed when the file
            names a factory other than ``timm:NAME`` or ``mixmatch_plugin.models:NAME``: a file may not
            choose which code runs, so such a factory is not imported from it. The model is changed
            in place (for ``tp`` its channels are removed) and returned.

    The model comes back in eval mode. Raises :class:`MixMatchError` for files of another format or
    malformed ones, or when the model cannot be rebuilt (a history or weights that do not fit it).
    """
    from mixmatch_plugin.models import build_model, check_recorded_spec

    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise MixMatchError(f"{path} is not a pruned-model file written by `mixmatch prune` (format {FORMAT})")
    try:
        spec, backend, state = obj["model"], obj["backend"], obj["state_dict"]
        if backend not in BACKENDS or not isinstance(spec, Mapping) or not isinstance(state, Mapping):
            raise TypeError("backend, model or state_dict")
        kwargs = spec.get("model_kwargs") or {}
        if isinstance(kwargs, str):
            kwargs = json.loads(kwargs)
        if not isinstance(kwargs, Mapping):
            raise TypeError("model_kwargs")
        history = obj["tp"]["history"] if backend == "tp" else []
        if not isinstance(history, list):
            raise TypeError("tp history")
        num_heads = (obj["tp"].get("num_heads") or {}) if backend == "tp" else {}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise MixMatchError(f"{path} is a malformed pruned-model file ({type(exc).__name__}: {exc}); write it again with `mixmatch prune`") from None
    if model is None:
        name = check_recorded_spec(spec.get("model"), str(path), "build the original model yourself and pass it: "
                                   "load_pruned(path, model=<your factory>(**kwargs))")
        model = build_model(name, model_kwargs=kwargs)
    if backend == "tp":
        from .torch_pruning import rebuild

        if not (shape := spec.get("input_shape")):
            raise MixMatchError(f"{path} has no input_shape; it is needed to trace the model for rebuilding")
        model.eval()
        rebuild(model, history, torch.zeros(1, *[int(v) for v in shape]), num_heads)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MixMatchError(f"the weights in {path} do not fit the rebuilt model ({first_line(exc)})") from None
    return model.eval(), {k: v for k, v in obj.items() if k != "state_dict"}
