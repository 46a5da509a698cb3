"""Dense training with a checkpoint cache keyed on the configuration (for the demo and the benchmark).

:func:`train_cached` trains a model from a :class:`TrainConfig` once and stores the state dict,
the configuration and the measured metrics under ``cache_dir/<name>-<hash>.pt`` (atomically); the
same configuration loads from the cache afterwards. The model is selected on the *validation*
split; the test accuracy is measured once, at the end, for the report.
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

from .data import Splits, loader
from .errors import MixMatchError
from .evaluate import evaluate
from .io import atomic_torch_save, safe_torch_load
from .models import build_model
from .progress import progress_bar

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
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


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
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW, warmup and cosine decay; keep the best validation epoch."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = splits.train
    if cfg.max_train is not None and cfg.max_train < len(train_ds):
        from .data import subset

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
    history = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        running = 0.0
        for x, y in progress_bar(tl, f"train {epoch + 1}/{cfg.epochs}", enable=progress):
            if cfg.augment:
                x = _augment(x, gen)
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
        if on_epoch:
            on_epoch(epoch, row)
        if m.accuracy > best["val_accuracy"]:
            best = {"val_accuracy": m.accuracy, "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best.pop("state"))
    return {"history": history, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
            "train_seconds": time.time() - t0}


def train_cached(
    cfg: TrainConfig, splits: Splits, *, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Return the trained model for ``cfg`` from the cache, training (and caching) it if needed."""
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    path = cache / f"{cfg.model.split(':')[-1]}-{cfg.key()}.pt"
    model = build_model(cfg.model, model_kwargs=cfg.model_kwargs)
    if path.exists():
        try:
            blob = safe_torch_load(path)
            model.load_state_dict(blob["state_dict"])
            info = dict(blob["info"])
        except (MixMatchError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            # the cache is ours to rebuild: an unusable entry (another torch version, edited by hand) is trained again
            logger.warning("cached checkpoint %s is unusable (%s): training again", path, str(exc).splitlines()[0][:160])
            model = build_model(cfg.model, model_kwargs=cfg.model_kwargs)
        else:
            logger.info("loaded cached checkpoint %s", path)
            model.eval()
            return model, info
    info = train(model, splits, cfg, progress=progress)
    info["test_accuracy"] = evaluate(model, loader(splits.test, 512)).accuracy
    info["config"] = asdict(cfg)
    info["checkpoint"] = str(path)
    atomic_torch_save(path, {"state_dict": model.state_dict(), "info": info})
    model.eval()
    return model, info
