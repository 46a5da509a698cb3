"""How the plugin reads a batch and computes a loss, shared by signals, evaluation and fine-tuning.

A batch is ``(inputs, targets, ...)`` (a tuple or list, as a ``DataLoader`` over a
``TensorDataset`` yields) or a mapping with ``"input"``/``"inputs"`` and ``"label"``/``"target"``.
The default loss is cross-entropy; pass ``loss_fn(model, batch) -> scalar tensor`` for anything else.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MixMatchError, first_line

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(inputs, targets)`` of a supervised batch, or raise a clear error."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("input", "inputs", "x", "image", "images") if k in batch), None)
        y = next((batch[k] for k in ("label", "labels", "target", "targets", "y") if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise MixMatchError(
            "a batch must be (inputs, labels) tensors or a dict with 'input' and 'label'; "
            f"got {type(batch).__name__}: pass a loss_fn(model, batch) for other batch formats"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise MixMatchError(
            f"labels must be integer class indices for the default cross-entropy loss, got dtype {y.dtype}; "
            "convert them with .long() or pass a loss_fn"
        )
    if not x.dtype.is_floating_point:
        raise MixMatchError(f"inputs must be floating point tensors, got dtype {x.dtype}; convert them with .float()")
    if x.dim() == 0 or x.shape[0] == 0:
        raise MixMatchError(f"a batch holds no samples (inputs of shape {tuple(x.shape)}); drop empty batches from the loader")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise MixMatchError(
            f"labels of shape {tuple(y.shape)} do not fit inputs of shape {tuple(x.shape)}: the default loss expects "
            "one class index per sample, shape (batch,); pass a loss_fn for other targets"
        )
    return x, y


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``spec`` as a torch device (``None``: the CPU), or a clear error when it is unknown or not on this machine."""
    try:
        device = torch.device(spec if spec is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise MixMatchError(f"unknown device {spec!r} ({str(exc).splitlines()[0]}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MixMatchError(f"device {spec!r}: this torch build or machine has no CUDA GPU; run on the CPU (omit --device)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MixMatchError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA GPU(s) here (cuda:0 to "
                                f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise MixMatchError(f"device {spec!r}: only cpu and cuda devices are supported")
    return device


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the model, turning shape errors into a one-line hint."""
    try:
        out = model(x)
    except (RuntimeError, AssertionError) as exc:  # timm asserts the input size (``_assert``)
        if is_oom(exc):
            raise
        first = first_line(exc)
        if (p := next(model.parameters(), None)) is not None and p.dtype.is_floating_point and x.dtype != p.dtype:
            raise MixMatchError(
                f"the model could not run a batch of dtype {x.dtype} ({first}); its weights are {p.dtype}: "
                f"convert the inputs with .to({p.dtype})"
            ) from None
        raise MixMatchError(
            f"the model could not run a batch of shape {tuple(x.shape)} ({first}); "
            "check the input shape (--input-shape C,H,W) and the number of channels"
        ) from None
    if isinstance(out, (tuple, list)):  # DeiT-distilled in train mode, aux heads
        out = out[0]
    return out


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of ``model(inputs)`` against integer ``labels``."""
    x, y = split_batch(batch)
    logits = forward(model, x)
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise MixMatchError(
            f"model output of shape {tuple(logits.shape)} does not fit labels of shape {tuple(y.shape)}; "
            "the default loss expects (batch, classes) logits: pass a loss_fn"
        )
    if int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
        raise MixMatchError(
            f"labels range over [{int(y.min())}, {int(y.max())}] but the model has {logits.shape[1]} outputs; "
            "set num_classes to match the data"
        )
    return F.cross_entropy(logits, y.long())  # int32/uint8 class indices are fine too


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return next((batch_size(v) for v in batch.values() if isinstance(v, torch.Tensor)), 1)
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    return 1


def chunk_batch(batch: Any, parts: int) -> list[Any]:
    """Split a batch into ``parts`` micro-batches along dimension 0 (used when a batch does not fit in memory)."""
    n = batch_size(batch)
    bounds = [round(i * n / parts) for i in range(parts + 1)]

    def take(obj: Any, a: int, b: int) -> Any:
        if isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == n:
            return obj[a:b]
        if isinstance(obj, Mapping):
            return {k: take(v, a, b) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return type(obj)(take(v, a, b) for v in obj)
        return obj

    return [take(batch, a, b) for a, b in itertools.pairwise(bounds) if b > a]


def iterate(loader: Iterable[Any], max_batches: int | None = None, what: str = "calibration") -> Iterator[Any]:
    """Yield at most ``max_batches`` batches; raise if the loader yields nothing at all."""
    if max_batches is not None and max_batches < 1:
        raise MixMatchError(f"max_batches must be at least 1, got {max_batches}")
    if not isinstance(loader, Iterable) or isinstance(loader, (str, bytes, torch.Tensor, Mapping)):
        raise MixMatchError(
            f"the {what} data must be an iterable of batches such as a DataLoader, got {type(loader).__name__}"
        )
    empty = True
    for batch in itertools.islice(loader, max_batches):
        empty = False
        yield batch
    if empty:
        raise MixMatchError(f"the {what} loader yielded no batches; pass a non-empty DataLoader")


#: How allocation failures read: CUDA, the CPU allocator (POSIX and Windows), C++ ``new``, and oneDNN
#: (the CPU convolution backend reports a failed scratchpad allocation as "could not create a primitive").
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory", "bad_alloc", "could not create a primitive")


def is_oom(exc: BaseException) -> bool:
    """True for an allocation failure: ``torch.OutOfMemoryError``, ``MemoryError``, or a ``RuntimeError``
    whose message is one of :data:`_OOM_TEXT` (found by running signals under an address-space limit)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(s in str(exc).lower() for s in _OOM_TEXT)
