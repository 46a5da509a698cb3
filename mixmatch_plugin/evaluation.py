"""Evaluation on a loader, BatchNorm re-estimation, and cheap ranking of strategies on validation data.

Ranking prunes a working copy with each strategy (no fine-tuning), optionally re-estimates BatchNorm
statistics on a few *training* batches (as EagleEye does), and measures accuracy and loss on the
*validation* loader. Pass the validation split here, never the test split. ``key="cka"`` ranks by the
linear CKA (debiased, minibatch) of the masked model's penultimate features to the dense model's
instead (see :mod:`mixmatch_plugin.cka`).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from .batches import LossFn, forward, iterate, model_device, split_batch, to_device
from .cka import cka_to_parent, collect_features
from .errors import MixMatchError
from .masks import Masker
from .progress import progress_bar
from .signals import Signals
from .strategies import Strategy, twins

logger = logging.getLogger(__name__)

RankKey = Literal["accuracy", "loss", "cka"]


@dataclass(frozen=True)
class Metrics:
    """Accuracy (fraction correct), mean loss, and how many samples they cover."""

    accuracy: float
    loss: float
    samples: int


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[Any], *, loss_fn: LossFn | None = None, max_batches: int | None = None
) -> Metrics:
    """Accuracy and mean loss of ``model`` on ``loader`` (eval mode; the mode is restored)."""
    was = model.training
    model.eval()
    device = model_device(model)
    correct = seen = 0
    loss_sum = 0.0
    try:
        for batch in iterate(loader, max_batches, what="evaluation"):
            batch = to_device(batch, device)
            x, y = split_batch(batch)
            if loss_fn is None:
                logits = forward(model, x)
                loss = nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(1) == y).sum())
            else:
                loss = float(loss_fn(model, batch)) * len(y)
                correct += int((forward(model, x).argmax(1) == y).sum())
            loss_sum += loss
            seen += len(y)
    finally:
        model.train(was)
    return Metrics(correct / seen, loss_sum / seen, seen)


_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader: Iterable[Any], batches: int = 10,
                  run: Callable[[nn.Module, Any], Any] | None = None) -> int:
    """Recompute BatchNorm running statistics from ``batches`` batches of ``loader`` (cumulative average).

    Only BatchNorm layers switch to train mode; dropout and the rest stay in eval. ``run(model, batch)``
    runs one batch as it comes (default: the inputs of an ``(inputs, labels)`` batch, on the model's
    device). Returns the number of BatchNorm layers updated (0 means the model has none and nothing ran).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    was = model.training
    model.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = model_device(model)
    try:
        for batch in iterate(loader, batches, what="BatchNorm re-estimation"):
            if run is not None:
                run(model, batch)
            else:
                forward(model, split_batch(to_device(batch, device))[0])
    finally:
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        model.train(was)
    return len(bns)


@torch.no_grad()
def latencies(models: Sequence[nn.Module], run: Callable[[nn.Module], Any], reps: int = 7) -> list[float]:
    """Median seconds of ``run(model)`` for each model (eval mode, no gradients), after two warm-up calls.

    The models are timed in alternation, one call each per round, so that a change of load on the machine
    hits all of them alike: ratios of the results are steadier than the times themselves. Example::

        dense_s, pruned_s = latencies([model, pruned], lambda m: m(x))
    """
    if reps < 1:
        raise MixMatchError(f"reps must be at least 1, got {reps}")
    modes = [m.training for m in models]
    times: list[list[float]] = [[] for _ in models]
    try:
        for m in models:
            m.eval()
            for _ in range(2):
                run(m)
        for _ in range(reps):
            for m, t in zip(models, times, strict=True):
                t0 = time.perf_counter()
                run(m)
                t.append(time.perf_counter() - t0)
    finally:
        for m, was in zip(models, modes, strict=True):
            m.train(was)
    return [statistics.median(t) for t in times]


def hold_batches(loader: Iterable[Any], batches: int, what: str = "BatchNorm re-estimation") -> list[Any]:
    """The first ``batches`` batches of ``loader``, drawn once and kept in memory.

    A shuffled loader draws a new order on every pass, so re-estimating BatchNorm from the loader
    itself gives every strategy other batches, and part of the difference between two strategies is
    then which batches they drew. Re-estimate from the held list instead: every strategy sees the same ones.
    """
    if batches < 1:
        raise MixMatchError(f"the number of {what} batches must be at least 1, got {batches}")
    return list(iterate(loader, batches, what=what))


@dataclass(frozen=True)
class Ranked:
    """One strategy's cheap (no fine-tune) validation result; ``cka`` only with ``rank(key="cka")``."""

    strategy: str
    accuracy: float
    loss: float
    global_sparsity: float
    cka: float | None = None


def rank(
    model: nn.Module,
    strategies: Sequence[Strategy],
    val_loader: Iterable[Any],
    *,
    signals: Signals | None = None,
    bn_loader: Iterable[Any] | None = None,
    bn_batches: int = 0,
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    key: RankKey = "accuracy",
    progress: bool = False,
) -> list[Ranked]:
    """Rank strategies by masked validation accuracy (or ``key="loss"`` or ``"cka"``), best first. ``model`` is not changed.

    Args:
        key: ``accuracy`` (default), ``loss``, or ``cka``: the CKA of the masked model's penultimate
            features to the dense model's on ``val_loader`` (accuracy and loss are measured as well).
        bn_loader, bn_batches: re-estimate BatchNorm statistics on that many training batches after
            masking, before evaluating (EagleEye's adaptive BN); 0 switches it off. The batches are
            drawn from ``bn_loader`` once and every strategy is re-estimated on the same ones.
    """
    if key not in ("accuracy", "loss", "cka"):
        raise MixMatchError(f"rank(key={key!r}): key must be 'accuracy', 'loss' or 'cka'")
    masker = Masker(model, signals)
    ref = collect_features(model, val_loader, max_batches=max_batches) if key == "cka" else None
    held = hold_batches(bn_loader, bn_batches) if bn_batches and bn_loader is not None else None
    out = []
    for s in progress_bar(strategies, "rank", enable=progress):
        work, _ = masker(s)
        if held is not None:
            reestimate_bn(work, held, bn_batches)
        m = evaluate(work, val_loader, loss_fn=loss_fn, max_batches=max_batches)
        c = None if ref is None else cka_to_parent(model, work, val_loader, max_batches=max_batches, parent_features=ref)
        out.append(Ranked(s.name, m.accuracy, m.loss, s.global_sparsity, c))
    if key == "cka":
        out.sort(key=lambda r: (-(r.cka or 0.0), -r.accuracy))
    else:
        out.sort(key=(lambda r: (-r.accuracy, r.loss)) if key == "accuracy" else (lambda r: (r.loss, -r.accuracy)))
    return out



@dataclass(frozen=True)
class Choice:
    """The validation choice among a pool: the winner, both rankings, what choosing cost, and the members that
    were not evaluated because an earlier one gives the same masks (``twins``: name -> that member's name)."""

    strategy: Strategy
    screen: list[Ranked]
    finals: list[Ranked]
    evaluations: int
    seconds: float
    twins: dict[str, str] = field(default_factory=dict)


def choose(
    model: nn.Module,
    strategies: Sequence[Strategy],
    screen: Iterable[Any],
    val: Iterable[Any],
    *,
    signals: Signals | None = None,
    bn_loader: Iterable[Any] | None = None,
    bn_batches: int = 0,
    top_k: int = 5,
    masks: Sequence[str] = (),
    progress: bool = False,
) -> Choice:
    """Choose a pool's best strategy on validation data: every member on ``screen``, the ``top_k`` on ``val``.

    A member that gives the same masks as an earlier one (:func:`~mixmatch_plugin.strategies.twins`) is not
    evaluated again and takes no finalist's place; ``screen`` lists it with the earlier one's scores.
    ``masks``: signals to try the winner's allocation with as well (``"<name>@<signal>"``), on ``val``; the
    best of those and the winner is chosen. ``model`` is not changed. Pass validation splits only.
    """
    if not strategies:
        raise MixMatchError("choose() needs at least one strategy")
    t0 = time.perf_counter()
    same = twins(strategies)
    pool = [s for s in strategies if s.name not in same]
    if same:
        logger.info("choose: %d of %d strategies give the same masks as an earlier one; each is evaluated once", len(same), len(strategies))
    held = hold_batches(bn_loader, bn_batches) if bn_batches and bn_loader is not None else None  # the same for both rounds
    kw: dict[str, Any] = {"signals": signals, "bn_loader": held, "bn_batches": bn_batches}
    first = rank(model, pool, screen, progress=progress, **kw) if len(pool) > top_k else []
    by = {s.name: s for s in strategies}
    keep = [by[r.strategy] for r in first[:top_k]] if first else pool
    finals = rank(model, keep, val, **kw)
    best = by[finals[0].strategy]
    usable = [m for m in masks if m != best.signal and (signals is None or m in signals.available)]
    if usable:
        alt = [replace(best, name=f"{best.name}@{m}", signal=m, layer_signals={}) for m in usable]
        by.update({s.name: s for s in alt})
        finals = sorted([*finals, *rank(model, alt, val, **kw)], key=lambda r: (-r.accuracy, r.loss))
    seconds = time.perf_counter() - t0
    n = len(first) + len(keep) + len(usable)
    logger.info("chose %s from %d strategies: %d evaluations, %.1f s", finals[0].strategy, len(strategies), n, seconds)
    listed = [x for r in first for x in (r, *(replace(r, strategy=t) for t, o in same.items() if o == r.strategy))]  # twins after theirs
    return Choice(by[finals[0].strategy], listed, finals, n, seconds, same)
