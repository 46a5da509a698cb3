"""Which trained Fashion-MNIST model the depth-width benchmark and the CKA-proxy measurement use.

``resnet18`` is the lead's full checkpoint (``FULL["resnet18"]``) when it is in the cache. Otherwise a
smaller ResNet with the same layout (timm ``resnet18``, two BasicBlocks per stage, channels
24/48/96/192, default 64-channel stem) is trained for 2 epochs with ``train_cached`` and the output
says so. ``--quick`` trains that smaller one on a 6,000-image subsample. ``swin`` and ``vit`` are used
only when their full checkpoints are cached (they are never trained here).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from torch import nn

from benchmarks.configs import FULL
from mixmatch_plugin.app.data import Splits
from mixmatch_plugin.app.train import TrainConfig, checkpoint_path, train_cached

logger = logging.getLogger(__name__)

FALLBACK = TrainConfig(model="timm:resnet18",
                       model_kwargs={"num_classes": 10, "in_chans": 1, "channels": [24, 48, 96, 192]},
                       epochs=2, lr=3e-3, warmup_steps=50)
QUICK = replace(FALLBACK, max_train=6000, warmup_steps=20)


def trained_model(name: str, splits: Splits, *, quick: bool) -> tuple[nn.Module, dict[str, Any], str] | None:
    """``(model, train info, description)`` for ``name``, or None when it is not available."""
    if quick:
        cfg, note = QUICK, "QUICK: resnet18 layout at channels 24-192, 2 epochs on 6,000 images"
    elif name in FULL and checkpoint_path(FULL[name]).exists():
        cfg, note = FULL[name], f"full {name} from the cache ({checkpoint_path(FULL[name]).name})"
    elif name == "resnet18":
        cfg = FALLBACK
        note = ("FALLBACK: the full ResNet18 is not cached; resnet18 layout at channels 24-192, "
                "trained 2 epochs on the 55,000 training images")
    else:
        logger.warning("%s: no cached checkpoint, skipped", name)
        return None
    model, info = train_cached(cfg, splits, progress=False)
    note += f" (val {info['val_accuracy']:.4f}, test {info['test_accuracy']:.4f})"
    return model.eval(), info, note
