"""Sensitivity signals: per-weight scores and their per-layer aggregates.

* ``magnitude``: ``|w|``
* ``gradient``: the mean over calibration batches of ``|dL/dw|`` (one gradient per batch)
* ``product``: ``|w| * gradient`` (first-order Taylor saliency, as SNIP)
* ``wanda``: ``|w|`` times the L2 norm of its input channel over the calibration data (Wanda,
  arXiv 2306.11695); collected by forward hooks in the same pass. Layers other than ``Linear`` and
  ``Conv*d`` score by magnitude.

One forward+backward pass over the calibration data gives all four; the paper's three
(:data:`DEFAULT_SIGNALS`) are what a plan builds rule strategies for unless asked otherwise.
Gradients are taken with
``torch.autograd.grad``, in eval mode, so the user's model is not changed: no ``.grad`` is written,
no BatchNorm statistic moves, and ``requires_grad`` flags are restored.

``grasp`` (``w * Hg``, GraSP's keep-score) needs a Hessian-vector product, here a finite difference
of gradients: one more pass, computed only for the GraSP baseline and the paper's empirical ranges
(:func:`compute_grasp`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from .batches import LossFn, chunk_batch, default_loss, is_oom, iterate, model_device, to_device
from .errors import MixMatchError, SignalError, first_line
from .layers import Layer, check_prunable, inventory, weight_of
from .progress import progress_bar

logger = logging.getLogger(__name__)

SignalName = Literal["magnitude", "gradient", "product", "wanda"]
SIGNALS: tuple[SignalName, ...] = get_args(SignalName)
#: The paper's three: the signals a plan builds its rule strategies for by default.
DEFAULT_SIGNALS: tuple[SignalName, ...] = ("magnitude", "gradient", "product")
#: Signals a strategy may mask by: the four, GraSP, and ``progressive`` (:mod:`mixmatch_plugin.progressive`).
ALL_SIGNALS = (*SIGNALS, "grasp", "progressive")


@dataclass
class Signals:
    """Per-weight scores, keyed by layer name (the tensor is ``<name>.weight``).

    ``product`` is derived on demand from ``magnitude`` and ``gradient``. Higher score means more
    important: masks remove the lowest-scoring weights of each layer.
    """

    magnitude: dict[str, torch.Tensor]
    gradient: dict[str, torch.Tensor] | None = None
    grasp: dict[str, torch.Tensor] | None = None
    wanda: dict[str, torch.Tensor] | None = None
    progressive: dict[str, torch.Tensor] | None = None  # computed for one target: PlanOptions(progressive=...)
    mean_gradient: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # signed, for compute_grasp
    batches: int = 0
    samples: int = 0
    _cache: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def available(self) -> tuple[str, ...]:
        have = ["magnitude"]
        if self.gradient is not None:
            have += ["gradient", "product"]
        if self.wanda is not None:
            have.append("wanda")
        if self.grasp is not None:
            have.append("grasp")
        if self.progressive is not None:
            have.append("progressive")
        return tuple(have)

    def score(self, name: str, signal: str) -> torch.Tensor:
        """The per-weight score tensor of layer ``name`` under ``signal``."""
        if signal not in ALL_SIGNALS:
            raise MixMatchError(f"unknown signal {signal!r}; signals are {', '.join(ALL_SIGNALS)}")
        if signal not in self.available:
            need = {"grasp": "compute_grasp(...)", "progressive": "the plan's progressive scores: plan.apply(model, strategy, calib=...) recomputes them"}.get(
                signal, "calibration data (compute_signals(model, calib))")
            raise MixMatchError(f"signal {signal!r} is not available: it needs {need}")
        if name not in self.magnitude:
            raise MixMatchError(f"no scores for layer {name!r}; the signals were computed on a different model")
        if signal == "magnitude":
            return self.magnitude[name]
        if signal in ("grasp", "wanda", "progressive"):
            scores: dict[str, torch.Tensor] = getattr(self, signal)
            return scores[name] if name in scores else self.magnitude[name]  # progressive: layers kept dense
        assert self.gradient is not None
        if signal == "gradient":
            return self.gradient[name]
        key = (name, signal)
        if key not in self._cache:
            self._cache[key] = self.magnitude[name] * self.gradient[name]
        return self._cache[key]

    def _sampled(self, name: str, signal: str, idx: torch.Tensor | None) -> torch.Tensor:
        """Scores of layer ``name`` at flat positions ``idx`` (all when None), without materialising products."""
        if idx is None:
            return self.score(name, signal).flatten()
        if signal == "product":
            self.score(name, "gradient")  # validates availability
            assert self.gradient is not None
            return self.magnitude[name].flatten()[idx] * self.gradient[name].flatten()[idx]
        return self.score(name, signal).flatten()[idx]

    def layer_means(self, signal: str) -> dict[str, float]:
        """Per-layer aggregate: the mean score of each layer."""
        if signal == "product":
            self.score(next(iter(self.magnitude)), "gradient")  # validates availability
            assert self.gradient is not None
            return {n: float((self.magnitude[n] * self.gradient[n]).float().mean()) for n in self.magnitude}
        return {n: float(self.score(n, signal).float().mean()) for n in self.magnitude}

    def damage(self, signal: str, ratios: dict[str, float], *, sample: int = 8192, seed: int = 0) -> dict[str, float]:
        """Fraction of each layer's score mass that pruning it at ``ratios[name]`` would remove.

        Scale-free per layer, so it ranks layers by how much they lose, for every signal. Layers
        larger than ``sample`` weights are estimated on a fixed random subsample (deterministic).
        """
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for name, r in ratios.items():
            n = self.magnitude[name].numel()
            idx = torch.randint(0, n, (sample,), generator=gen) if n > sample else None
            s = self._sampled(name, signal, idx).float().abs()
            total = float(s.sum())
            k = round(r * s.numel())
            if total <= 0 or k == 0:
                out[name] = 0.0
                continue
            out[name] = float(torch.topk(s, k, largest=False).values.sum()) / total
        return out


@contextmanager
def _grad_mode(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Eval mode and requires_grad on ``params`` for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)


def _params(model: nn.Module, layers: Sequence[Layer]) -> list[torch.Tensor]:
    return [weight_of(model, layer.name, leaf=True) for layer in layers]


def _grads(
    model: nn.Module, batch: Any, params: Sequence[torch.Tensor], loss_fn: LossFn, index: int, parts: int
) -> list[torch.Tensor]:
    """Gradient of the batch's mean loss, summed over ``parts`` micro-batches weighted by their size."""
    from .batches import batch_size

    n = batch_size(batch)
    total: list[torch.Tensor] | None = None
    for chunk in chunk_batch(batch, parts) if parts > 1 else [batch]:
        loss = loss_fn(model, chunk)
        if not torch.isfinite(loss):
            raise SignalError(
                f"the loss is {float(loss)} on calibration batch {index}; check the inputs and the model "
                "(a diverged checkpoint?) before computing signals"
            )
        weight = batch_size(chunk) / n if parts > 1 else 1.0  # mean over the batch = size-weighted mean of the parts
        raw = torch.autograd.grad(loss * weight, params, allow_unused=True)
        del loss
        gs = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(raw, params, strict=True)]
        del raw
        total = gs if total is None else [t.add_(g) for t, g in zip(total, gs, strict=True)]
    assert total is not None
    return total


def _batch_grads(
    model: nn.Module, batch: Any, params: Sequence[torch.Tensor], loss_fn: LossFn, index: int
) -> list[torch.Tensor]:
    """Gradient of the mean loss over ``batch``; split into micro-batches if it does not fit in memory.

    An allocation failure (CUDA out of memory, the CPU allocator's error, ``std::bad_alloc``,
    ``MemoryError``) halves the micro-batch size until one sample at a time fails too, which is a
    :class:`MixMatchError`. The failed attempt's graph is released before the retry.
    """
    from .batches import batch_size

    parts = 1
    while True:
        try:
            return _grads(model, batch, params, loss_fn, index, parts)
        except (RuntimeError, MemoryError) as exc:
            if not is_oom(exc):
                raise
            last = first_line(exc)
        # outside the except block: the traceback, and with it the failed attempt's tensors, are gone
        n = batch_size(batch)
        if parts >= n:
            raise MixMatchError(
                f"computing gradients ran out of memory even one sample at a time ({last}); use a smaller "
                "model input, fewer layers, or a machine with more memory"
            )
        parts = min(n, parts * 2)
        logger.warning("calibration batch %d did not fit in memory: retrying in %d micro-batches", index, parts)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextmanager
def _input_norms(model: nn.Module, layers: Sequence[Layer]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward pre-hooks summing the squared input of every ``Linear`` and ``Conv*d`` layer per input channel."""
    sq: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        dims = [d for d in range(x.dim()) if d != (1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1)]
        s = x.pow(2).sum(dim=dims)
        sq[name] = sq[name] + s if name in sq else s

    for layer in layers:
        module = model.get_submodule(layer.name)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            hooks.append(module.register_forward_pre_hook(lambda m, a, name=layer.name: hook(name, m, a)))
    try:
        yield sq
    finally:
        for h in hooks:
            h.remove()


def _wanda(model: nn.Module, magnitude: dict[str, torch.Tensor], sq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|w|`` times its input channel's norm; magnitude where no input was seen."""
    out = dict(magnitude)
    for name, s in sq.items():
        w, norm = magnitude[name], s.sqrt()
        groups = getattr(model.get_submodule(name), "groups", 1)
        if w.dim() > 2:  # conv: weight [out, in / groups, *kernel]; output o reads input channel (o // (out / g)) * in_g + j
            cout, cin = w.shape[:2]
            idx = (torch.arange(cout, device=w.device) // (cout // groups)).view(-1, 1) * cin + torch.arange(cin, device=w.device)
            norm = norm.to(w.device)[idx].view(cout, cin, *([1] * (w.dim() - 2)))
        out[name] = w * norm.to(w.device, w.dtype)
    return out


def _check_finite(scores: dict[str, torch.Tensor], what: str) -> None:
    bad = [n for n, t in scores.items() if not torch.isfinite(t).all()]
    if bad:
        raise SignalError(
            f"{what} contain NaN or inf in {len(bad)} layer(s) ({', '.join(bad[:4])}); check the model's weights "
            "and the calibration data, or use the magnitude signal only"
        )


def compute_signals(
    model: nn.Module,
    calib: Iterable[Any] | None = None,
    *,
    layers: Sequence[Layer] | None = None,
    signals: Sequence[SignalName] = DEFAULT_SIGNALS,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> Signals:
    """Score every weight of every layer under the requested signals, in one pass over ``calib``.

    Args:
        model: the trained model; left unchanged.
        calib: iterable of batches (see :mod:`mixmatch_plugin.batches`). Not needed for ``magnitude`` alone.
        layers: the inventory to score (default: ``inventory(model)``).
        signals: any of ``magnitude``, ``gradient``, ``product``, ``wanda``; every one but magnitude
            needs ``calib``, and one pass gives them all.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default cross-entropy on ``(inputs, labels)``.
        max_batches: stop after this many batches.
        progress: show a progress bar.

    Raises:
        MixMatchError: empty loader, malformed batches, unknown signal.
        SignalError: NaN or inf in the loss or the scores.
    """
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        raise MixMatchError(f"unknown signal {unknown[0]!r}; signals are {', '.join(SIGNALS)}")
    layers = list(layers) if layers is not None else inventory(model)
    check_prunable(layers)
    params = _params(model, layers)
    magnitude = {layer.name: p.detach().abs() for layer, p in zip(layers, params, strict=True)}  # abs() copies
    _check_finite(magnitude, "the weights")
    if set(signals) <= {"magnitude"}:
        return Signals(magnitude=magnitude)
    if calib is None:
        raise MixMatchError("the gradient, product and wanda signals need calibration data: pass calib=<DataLoader>")

    loss_fn = loss_fn or default_loss
    device = model_device(model)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    signed = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    batches = samples = 0
    from .batches import batch_size

    with _grad_mode(model, params), _input_norms(model, layers) as sq:
        for batch in progress_bar(iterate(calib, max_batches), "signals", enable=progress, total=max_batches):
            batch = to_device(batch, device)
            for a, sg, g in zip(acc, signed, _batch_grads(model, batch, params, loss_fn, batches), strict=True):
                a.add_(g.abs())
                sg.add_(g)
            batches += 1
            samples += batch_size(batch)
    gradient = {layer.name: a.div_(batches) for layer, a in zip(layers, acc, strict=True)}
    _check_finite(gradient, "the gradients")
    dead = [layer.name for layer in layers if layer.kind != "norm" and float(gradient[layer.name].abs().sum()) == 0.0]
    if dead:
        logger.warning("no gradient reached %d layer(s) (%s): their gradient score is 0. On an untrained timm model this is "
                       "expected: timm zero-initialises the last BatchNorm of each residual block, which blocks the gradient "
                       "of the layers before it; train the model (or load its weights) first", len(dead), ", ".join(dead[:4]))
    logger.info("signals from %d calibration batches (%d samples)", batches, samples)
    return Signals(magnitude=magnitude, gradient=gradient, wanda=_wanda(model, magnitude, sq),
                   mean_gradient={x.name: sg.div_(batches) for x, sg in zip(layers, signed, strict=True)}, batches=batches, samples=samples)


def compute_grasp(
    model: nn.Module,
    calib: Iterable[Any],
    *,
    layers: Sequence[Layer] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    temperature: float = 1.0,
    mean_gradient: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """GraSP keep-scores ``w * (H g)`` per weight (Wang et al., ICLR 2020).

    ``g`` is the mean gradient over the calibration batches and ``H g`` a finite difference of
    gradients, ``(grad L(w + eps g) - grad L(w)) / eps`` with ``eps = 1e-5 |w| / |g|``: one more
    forward+backward pass instead of a double back-propagation (no second derivatives, a fraction of
    the memory; it agrees with the exact Hessian-vector product to a correlation above 0.999).
    ``mean_gradient`` (:attr:`Signals.mean_gradient`, from :func:`compute_signals` on the same
    batches) saves the pass that computes ``g``. The authors divide the logits by ``temperature``
    200 for the default loss; 1 (the default) is the loss the signals use, so their gradient is reused.
    GraSP removes the weights with the *highest* ``-w * Hg``, i.e. the lowest score returned here.
    """
    layers = list(layers) if layers is not None else inventory(model)
    params = _params(model, layers)
    device = model_device(model)
    if loss_fn is None and temperature != 1.0:
        from .batches import forward, split_batch

        def loss_fn(m: nn.Module, b: Any) -> torch.Tensor:
            x, y = split_batch(b)
            return nn.functional.cross_entropy(forward(m, x) / temperature, y)

    loss = loss_fn or default_loss
    batches = [to_device(b, device) for b in iterate(calib, max_batches)]

    def mean_grad() -> list[torch.Tensor]:
        g = [torch.zeros_like(p) for p in params]
        for i, b in enumerate(progress_bar(batches, "grasp", enable=progress)):
            for a, gi in zip(g, _batch_grads(model, b, params, loss, i), strict=True):
                a.add_(gi, alpha=1.0 / len(batches))
        return g

    with _grad_mode(model, params):
        reuse = mean_gradient is not None and loss_fn is None
        g = [mean_gradient[x.name].to(p) for x, p in zip(layers, params, strict=True)] if reuse and mean_gradient else mean_grad()
        g_norm = math.sqrt(sum(float((gi.double() ** 2).sum()) for gi in g))
        w_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in params))
        eps = 1e-5 * w_norm / g_norm if g_norm > 0 else 0.0
        originals = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, gi in zip(params, g, strict=True):
                    p.add_(gi, alpha=eps)
            moved = mean_grad() if eps > 0 else g
        finally:
            with torch.no_grad():
                for p, o in zip(params, originals, strict=True):
                    p.copy_(o)
    scores = {x.name: o * ((m - gi) / eps if eps > 0 else torch.zeros_like(o)) for x, o, m, gi in zip(layers, originals, moved, g, strict=True)}
    _check_finite(scores, "the GraSP scores")
    return scores
