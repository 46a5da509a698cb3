"""Dense training with a checkpoint cache keyed on the configuration (for the demo and the benchmark).

:func:`train_cached` trains a model from a :class:`TrainConfig` once and stores the state dict,
the configuration and the measured metrics under ``cache_dir/<name>-<hash>.pt`` (atomically); the
same configuration loads from the cache afterwards. The model is selected on the *validation*
split; the test accuracy is measured once, at the end, for the report. A training that is
interrupted (Ctrl-C, a lost machine) continues from its last finished epoch when started again
(``<name>-<hash>.resume.pt`` next to the checkpoint), with the weights an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixmatch_plugin.app.data import Splits, loader
from mixmatch_plugin.batches import model_device
from mixmatch_plugin.errors import MixMatchError, first_line
from mixmatch_plugin.evaluation import evaluate
from mixmatch_plugin.io import atomic_torch_save, safe_torch_load
from mixmatch_plugin.models import build_model
from mixmatch_plugin.progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(os.environ.get("MIXMATCH_CACHE", "~/.cache/mixmatch")).expanduser()


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained checkpoint (its hash names the cache file)."""

    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: bool = True
    warmup_steps: int = 200
    seed: int = 0
    max_train: int | None = None  # subsample the training split (quick runs)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding by reflection)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = 2
    xp = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    return xp[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


def train(
    model: nn.Module,
    splits: Splits,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resume: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW, warmup and cosine decay; keep the best validation epoch.

    With ``resume`` (a file path), the whole training state (weights, optimizer, schedule, random
    generators, history, best epoch) is written there atomically after every epoch, and a training
    started again with the same ``cfg`` continues after the last finished epoch instead of from
    scratch; it ends with the same weights as an uninterrupted run. The file is the caller's to
    remove once the result is stored (:func:`train_cached` does).
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = splits.train
    if cfg.max_train is not None and cfg.max_train < len(train_ds):
        from mixmatch_plugin.app.data import subset

        train_ds = subset(train_ds, cfg.max_train, cfg.seed)
    tl = loader(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed)
    vl = loader(splits.val, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(tl)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    best: dict[str, Any] = {"val_accuracy": -1.0}
    history: list[dict[str, float]] = []
    first, before = 0, 0.0  # epochs and seconds done by an interrupted earlier run
    state = _load_resume(resume, cfg) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["augment_rng"])
        tl.generator.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        history, best, first, before = list(state["history"]), dict(state["best"]), int(state["epoch"]), float(state["seconds"])
        logger.info("resuming %s after epoch %d of %d (from %s)", cfg.model, first, cfg.epochs, resume)
    t0 = time.time() - before
    device = model_device(model)  # the batches follow the model (augmented on the CPU, with the CPU generator)
    for epoch in range(first, cfg.epochs):
        model.train()
        running = 0.0
        for x, y in progress_bar(tl, f"train {epoch + 1}/{cfg.epochs}", enable=progress):
            if cfg.augment:
                x = _augment(x, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        m = evaluate(model, vl)
        row = {"epoch": epoch + 1, "train_loss": running / len(tl), "val_accuracy": m.accuracy, "val_loss": m.loss,
               "seconds": time.time() - t0}
        history.append(row)
        logger.info("epoch %d: val accuracy %.4f", epoch + 1, m.accuracy)
        if m.accuracy > best["val_accuracy"]:
            best = {"val_accuracy": m.accuracy, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        if resume is not None and epoch + 1 < cfg.epochs:
            atomic_torch_save(resume, {
                "config": asdict(cfg), "epoch": epoch + 1, "seconds": time.time() - t0, "history": history, "best": best,
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "augment_rng": gen.get_state(), "order_rng": tl.generator.get_state(), "torch_rng": torch.get_rng_state(),
            })
        if on_epoch:
            on_epoch(epoch, row)
    model.load_state_dict(best.pop("state"))
    return {"history": history, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
            "train_seconds": time.time() - t0}


def checkpoint_path(cfg: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`train_cached` keeps the checkpoint for ``cfg``: ``cache_dir/<factory>-<hash>.pt``."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    return cache / f"{cfg.model.split(':')[-1]}-{cfg.key()}.pt"


def resume_path(cfg: TrainConfig, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`train_cached` keeps an unfinished training of ``cfg`` (removed once the checkpoint is written)."""
    ckpt = checkpoint_path(cfg, cache_dir)
    return ckpt.with_name(f"{ckpt.stem}.resume.pt")


def train_cached(
    cfg: TrainConfig, splits: Splits, *, cache_dir: str | Path | None = None, progress: bool = True,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Return the trained model for ``cfg`` from the cache, training (and caching) it if needed.

    The model is on ``device`` (default: the CPU), and so is its training; the checkpoint holds CPU
    tensors whatever the device. The cache key does not name the device: a checkpoint trained on a
    GPU has other weights than one trained on the CPU, and the benchmark tells them apart by their hash.
    """
    path = checkpoint_path(cfg, cache_dir)
    model = build_model(cfg.model, model_kwargs=cfg.model_kwargs).to(device or "cpu")
    if path.exists():
        try:
            blob = safe_torch_load(path)
            model.load_state_dict(blob["state_dict"])
            info = dict(blob["info"])
        except (MixMatchError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            # the cache is ours to rebuild: an unusable entry (another torch version, edited by hand) is trained again
            logger.warning("cached checkpoint %s is unusable (%s): training again", path, first_line(exc))
            model = build_model(cfg.model, model_kwargs=cfg.model_kwargs).to(device or "cpu")
        else:
            logger.info("loaded cached checkpoint %s", path)
            return model.eval(), info
    resume = resume_path(cfg, cache_dir)  # an interrupted training continues from its last finished epoch
    info = train(model, splits, cfg, progress=progress, resume=resume)
    info.update(test_accuracy=evaluate(model, loader(splits.test, 512)).accuracy, config=asdict(cfg), checkpoint=str(path))
    atomic_torch_save(path, {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "info": info})
    resume.unlink(missing_ok=True)
    return model.eval(), info


_RESUME_KEYS = frozenset({"config", "epoch", "seconds", "history", "best", "model", "optimizer", "scheduler", "augment_rng",
                          "order_rng", "torch_rng"})


def _load_resume(path: str | Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The state an interrupted :func:`train` left at ``path`` for ``cfg``, or ``None`` (start from scratch)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = safe_torch_load(path)
        if not isinstance(state, dict) or _RESUME_KEYS - state.keys():
            raise ValueError(f"it lacks {', '.join(sorted(_RESUME_KEYS - set(state) if isinstance(state, dict) else _RESUME_KEYS))}")
        usable = state["config"] == asdict(cfg) and 0 < int(state["epoch"]) < cfg.epochs
    except (MixMatchError, KeyError, TypeError, ValueError) as exc:
        logger.warning("interrupted-training state %s is unusable (%s): training from scratch", path, first_line(exc))
        return None
    if not usable:
        logger.warning("interrupted-training state %s belongs to another configuration: training from scratch", path)
        return None
    return state
