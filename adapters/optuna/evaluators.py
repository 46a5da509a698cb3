"""Evaluators: strategy -> validation metrics (masked, fine-tuned, or a user callback), and sparse MACs."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from mixmatch_plugin.batches import LossFn
from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.evaluation import evaluate, hold_batches, reestimate_bn
from mixmatch_plugin.finetuning import FinetuneOptions, finetune_steps
from mixmatch_plugin.layers import Layer, inventory
from mixmatch_plugin.masks import Masker
from mixmatch_plugin.signals import Signals
from mixmatch_plugin.strategies import Strategy

logger = logging.getLogger(__name__)


# ============================================================================ evaluators
@runtime_checkable
class Evaluator(Protocol):
    """Scores one strategy: returns metrics with at least ``"accuracy"`` (a fraction) and ideally ``"loss"``.

    Implementations must read only training and validation data. Extra metrics are stored in the
    trial's ``user_attrs["metrics"]``.
    """

    def __call__(self, strategy: Strategy) -> Mapping[str, float]: ...


class _MaskingEvaluator:
    """Shared state of the built-in evaluators: the core's :class:`~mixmatch_plugin.masks.Masker`."""

    deterministic = True

    def __init__(self, model: nn.Module, signals: Signals | None) -> None:
        self.masker = Masker(model, signals)
        self.layers, self.signals, self.work = self.masker.layers, self.masker.signals, self.masker.work

    def _masked(self, strategy: Strategy) -> dict[str, torch.Tensor]:
        return self.masker(strategy)[1]


class ProxyEvaluator(_MaskingEvaluator):
    """The cheap proxy of the core: prune a working copy, optionally re-estimate BatchNorm, evaluate on validation.

    Args:
        model: the trained model (copied; never changed).
        val_loader: the *validation* loader.
        signals: per-weight scores (``plan.signals`` or :func:`~mixmatch_plugin.compute_signals`);
            magnitude only when omitted.
        bn_loader, bn_batches: re-estimate BatchNorm statistics on that many *training* batches after
            masking (EagleEye's adaptive BN); ``bn_batches=0`` switches it off. The batches are drawn
            from ``bn_loader`` at the first call and kept, so every trial is re-estimated on the same
            ones (a shuffled loader would give every trial other batches, and the objective that noise).
        loss_fn, max_batches: see :func:`~mixmatch_plugin.evaluate`.
    """

    name = "proxy"

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any],
        *,
        signals: Signals | None = None,
        bn_loader: Iterable[Any] | None = None,
        bn_batches: int = 0,
        loss_fn: LossFn | None = None,
        max_batches: int | None = None,
    ) -> None:
        if bn_batches < 0:
            raise MixMatchError(f"bn_batches must be 0 or more, got {bn_batches}")
        if bn_batches and bn_loader is None:
            raise MixMatchError("BatchNorm re-estimation needs bn_loader=<training loader> (never validation or test)")
        super().__init__(model, signals)
        self.val_loader, self.bn_loader, self.bn_batches = val_loader, bn_loader, bn_batches
        self._bn_held: list[Any] | None = None
        self.loss_fn, self.max_batches = loss_fn, max_batches

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        self._masked(strategy)
        if self.bn_batches and self.bn_loader is not None:
            if self._bn_held is None:
                self._bn_held = hold_batches(self.bn_loader, self.bn_batches)
            reestimate_bn(self.work, self._bn_held, self.bn_batches)
        m = evaluate(self.work, self.val_loader, loss_fn=self.loss_fn, max_batches=self.max_batches)
        return {"accuracy": m.accuracy, "loss": m.loss}


class FinetuneEvaluator(_MaskingEvaluator):
    """A short fine-tune that keeps the masks (:func:`~mixmatch_plugin.finetune`), then validation.

    Each call restarts from the original weights with the same seed, and re-seeds the training
    loader's generator when it has one, so a strategy always gets the same score.

    Args:
        model: the trained model (copied; never changed).
        train_loader: *training* batches for the fine-tune.
        val_loader: the *validation* loader for the score.
        signals: per-weight scores, as for :class:`ProxyEvaluator`.
        steps: optimizer steps per evaluation.
        lr, options: see :func:`~mixmatch_plugin.finetune` (``options.loss_fn`` also scores validation).
        max_batches: validation batches to score on (default: all).
        seed: torch seed set before every fine-tune.
    """

    name = "finetune"

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any],
        *,
        signals: Signals | None = None,
        steps: int = 100,
        lr: float = 1e-4,
        options: FinetuneOptions | None = None,
        max_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise MixMatchError(f"fine-tune steps must be at least 1, got {steps}")
        super().__init__(model, signals)
        self.train_loader, self.val_loader, self.steps, self.lr = train_loader, val_loader, steps, lr
        self.options, self.max_batches, self.seed = options or FinetuneOptions(), max_batches, seed

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        masks = self._masked(strategy)
        res = finetune_steps(self.work, masks, self.train_loader, self.steps, lr=self.lr, seed=self.seed, options=self.options)
        m = evaluate(self.work, self.val_loader, loss_fn=self.options.loss_fn, max_batches=self.max_batches)
        return {"accuracy": m.accuracy, "loss": m.loss, "realized_sparsity": res.global_sparsity, "steps": float(res.steps)}


class CallbackEvaluator:
    """Wraps a user function ``fn(strategy)`` returning the accuracy (a float) or a metrics mapping."""

    name = "callback"

    def __init__(self, fn: Callable[[Strategy], float | Mapping[str, float]], *, deterministic: bool = False) -> None:
        if not callable(fn):
            raise MixMatchError(f"the evaluation callback must be callable, got {type(fn).__name__}")
        self.fn, self.deterministic = fn, deterministic

    def __call__(self, strategy: Strategy) -> dict[str, float]:
        out = self.fn(strategy)
        return {str(k): float(v) for k, v in out.items()} if isinstance(out, Mapping) else {"accuracy": float(out)}


# ================================================================================== MACs
@dataclass(frozen=True)
class MacsProfile:
    """Dense multiply-accumulates per inventory layer for one input sample, measured once with forward hooks.

    ``layer_macs[name]`` = output positions x weight elements (for a convolution: output spatial size x
    kernel MACs x output channels; for a linear layer: tokens x in x out). Normalization and embedding
    layers count 0. A strategy's *sparse-MACs count* is ``sum_l (1 - ratio_l) * layer_macs[l]``, the
    MACs left when every pruned weight's multiplications are skipped (unstructured sparsity).
    """

    layer_macs: dict[str, float]

    @classmethod
    def measure(
        cls, model: nn.Module, input_shape: Sequence[int] | None = None, *, example: torch.Tensor | None = None,
        layers: Sequence[Layer] | None = None,
    ) -> MacsProfile:
        """Run one forward pass of ``example`` (or zeros of ``(1, *input_shape)``) and record every layer's MACs."""
        if example is None:
            if input_shape is None:
                raise MixMatchError("measuring MACs needs input_shape=(C, H, W) or an example input")
            example = torch.zeros(1, *(int(v) for v in input_shape))
        layers = list(layers) if layers is not None else inventory(model)
        macs: dict[str, float] = {layer.name: 0.0 for layer in layers}

        def hook(name: str, module: nn.Module, _inp: Any, out: Any) -> None:
            w = getattr(module, "weight", None)
            out_t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(w, torch.Tensor) or w.dim() < 2 or not isinstance(out_t, torch.Tensor) or isinstance(module, nn.Embedding):
                return
            macs[name] += out_t.numel() / max(int(example.shape[0]), 1) / int(w.shape[0]) * w.numel()

        hooks = [model.get_submodule(mod_name).register_forward_hook(functools.partial(hook, layer.name))
                 for layer in layers for mod_name in (layer.name, *layer.aliases)]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                p = next(model.parameters(), None)
                model(example.to(p.device if p is not None else "cpu"))
        except RuntimeError as exc:
            raise MixMatchError(
                f"measuring MACs failed on an input of shape {tuple(example.shape)} ({first_line(exc)}); "
                "check the input shape"
            ) from None
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        if unused := [layer.name for layer in layers if macs[layer.name] == 0 and layer.kind in ("conv", "linear")]:
            logger.info("%d weight layer(s) did not run in the MACs pass (%s): counted as 0 MACs", len(unused), ", ".join(unused[:4]))
        return cls(macs)

    @property
    def dense(self) -> float:
        """Total dense MACs of the weight layers, per sample."""
        return float(sum(self.layer_macs.values()))

    def sparse(self, strategy: Strategy) -> float:
        """The strategy's sparse-MACs count per sample: ``sum_l (1 - ratio_l) * MACs_l``."""
        return float(sum((1.0 - strategy.ratios.get(n, 0.0)) * m for n, m in self.layer_macs.items()))

    def reduction(self, strategy: Strategy) -> float:
        """Fraction of the dense weight-layer MACs that the strategy's zeros remove, in [0, 1)."""
        dense = self.dense
        return 0.0 if dense <= 0 else 1.0 - self.sparse(strategy) / dense
