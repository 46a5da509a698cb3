"""Fine-tuning that keeps the masks.

The original Mix-and-Match code applied the mask *before* the optimizer step and did not mask
gradients, so Adam revived pruned weights and the evaluated models were not sparse. Here:

1. a gradient hook multiplies every masked weight's gradient by its mask, so optimizer state
   (Adam's moments) of pruned weights stays exactly zero, and
2. the mask is re-applied right *after* every ``optimizer.step()``, so nothing (weight decay,
   momentum, a custom optimizer) can move a pruned weight away from exactly 0.0.

Early stopping and checkpoint selection use the *validation* loader only.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .batches import LossFn, default_loss, model_device, to_device
from .errors import MixMatchError
from .evaluation import Metrics, evaluate
from .layers import inventory, weight_of
from .masks import sparsity_of
from .progress import progress_bar

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass
class FinetuneResult:
    """Steps run, the best validation metrics, the per-evaluation history, and the sparsity realized
    after fine-tuning (exact zeros per inventory layer, and over the whole inventory)."""

    steps: int
    best: Metrics | None
    history: list[dict[str, float]] = field(default_factory=list)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    global_sparsity: float = 0.0


OptimizerName = Literal["adam", "adamw", "sgd"]


@dataclass(frozen=True)
class FinetuneOptions:
    """The optimizer and early-stopping settings of :func:`finetune`.

    Attributes:
        optimizer: ``adam`` (default, as in the paper), ``adamw``, ``sgd`` (momentum 0.9), or a factory
            ``params -> torch.optim.Optimizer``.
        weight_decay: for the named optimizers.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for training and validation (default: cross-entropy
            on ``(inputs, labels)`` batches).
        patience: evaluations without improvement before stopping (the paper uses 3).
        eval_every: evaluate every this many steps (default: once per epoch).
    """

    optimizer: OptimizerName | OptimizerFactory = "adam"
    weight_decay: float = 0.0
    loss_fn: LossFn | None = None
    patience: int = 3
    eval_every: int | None = None

    def make(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        kind, wd = self.optimizer, self.weight_decay
        if callable(kind):
            return kind(params)
        if kind in ("adam", "adamw"):
            return (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(params, lr=lr, weight_decay=wd)
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        raise MixMatchError(f"unknown optimizer {kind!r}; choose adam, adamw or sgd, or pass a factory")


def finetune(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    train_loader: Iterable[Any],
    *,
    val_loader: Iterable[Any] | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float = 1e-4,
    options: FinetuneOptions | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` in place while every weight outside its keep-mask stays exactly zero.

    Args:
        model: the pruned model (changed in place).
        masks: keep-masks by layer name, as :func:`~mixmatch_plugin.apply` returns them.
        train_loader: training batches; iterated once per epoch.
        val_loader: validation batches for early stopping and for keeping the best weights.
        epochs, max_steps: stop after whichever comes first.
        lr: the learning rate.
        options: optimizer, weight decay, loss, patience, evaluation interval (see :class:`FinetuneOptions`).
    """
    o = options or FinetuneOptions()
    patience, eval_every = o.patience, o.eval_every
    if epochs < 1:
        raise MixMatchError(f"epochs must be at least 1, got {epochs}")
    loss_fn = o.loss_fn or default_loss
    device = model_device(model)
    pairs = []
    for name, keep in masks.items():
        w = weight_of(model, name)
        if keep.shape != w.shape:
            raise MixMatchError(f"mask for {name!r} has shape {tuple(keep.shape)}, weight has {tuple(w.shape)}")
        pairs.append((w, keep.to(device=w.device, dtype=w.dtype)))
    with torch.no_grad():
        for w, m in pairs:
            w.mul_(m)
    hooks = [w.register_hook(lambda g, m=m: g * m) for w, m in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = o.make(params, lr)

    best: Metrics | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    bad = steps = 0
    stop = False
    was = model.training

    def check() -> bool:
        nonlocal best, best_state, bad
        if val_loader is None:
            return False
        m = evaluate(model, val_loader, loss_fn=o.loss_fn)
        history.append({"step": steps, "val_accuracy": m.accuracy, "val_loss": m.loss})
        if best is None or (m.accuracy, -m.loss) > (best.accuracy, -best.loss):
            best, bad = m, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        return bad >= patience

    try:
        model.train()
        for _epoch in range(epochs):
            n = len(train_loader) if hasattr(train_loader, "__len__") else None  # type: ignore[arg-type]
            total = n if max_steps is None else max_steps - steps if n is None else min(n, max_steps - steps)
            for batch in progress_bar(train_loader, "fine-tune", enable=progress, total=total):
                batch = to_device(batch, device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise MixMatchError(f"fine-tuning diverged (loss {float(loss)} at step {steps}); lower the learning rate")
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for w, m in pairs:
                        w.mul_(m)
                steps += 1
                if eval_every and steps % eval_every == 0:
                    stop = check()
                    model.train()
                if stop or (max_steps is not None and steps >= max_steps):
                    stop = True
                    break
            if not eval_every:
                stop = check() or stop
                model.train()
            if stop:
                break
        if eval_every and (not history or history[-1]["step"] != steps):
            check()
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if best_state is not None:
        model.load_state_dict(best_state)
    logger.info("fine-tuned %d steps; best validation accuracy %s", steps, f"{best.accuracy:.4f}" if best else "n/a")
    return FinetuneResult(steps, best, history, *sparsity_of(model, inventory(model), masks))


def finetune_steps(
    model: nn.Module, masks: Mapping[str, torch.Tensor], train_loader: Iterable[Any], steps: int, *, lr: float, seed: int,
    options: FinetuneOptions | None = None,
) -> FinetuneResult:
    """Exactly ``steps`` optimizer steps of :func:`finetune` (no validation), the same every time for a ``seed``.

    Torch and the loader's generator (a ``DataLoader``'s, when it has one) are reseeded first, so two
    candidates or two trials fine-tuned with the same seed see the same batches in the same order.
    """
    torch.manual_seed(seed)
    gen = getattr(train_loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    try:
        per_epoch = len(train_loader) if isinstance(train_loader, Sized) else steps
    except TypeError:  # a DataLoader over an IterableDataset has __len__ but no length
        per_epoch = steps
    return finetune(model, masks, train_loader, epochs=max(1, math.ceil(steps / max(per_epoch, 1))), max_steps=steps, lr=lr,
                    options=options)
