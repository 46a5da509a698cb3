"""Train (or load from the cache) the benchmark's dense models and print their accuracy.

    python benchmarks/train_dense.py [resnet18 vit swin]
"""

from __future__ import annotations

import logging
import sys

import torch

from benchmarks.configs import FULL
from mixmatch_plugin.app import data
from mixmatch_plugin.app.train import train_cached

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(int(__import__("os").environ.get("MIXMATCH_THREADS", "2")))
    splits = data.fashion_mnist()
    for name in sys.argv[1:] or list(FULL):
        model, info = train_cached(FULL[name], splits, progress=False)
        print(f"{name}: val {info['val_accuracy']:.4f} test {info['test_accuracy']:.4f} "
              f"best epoch {info['best_epoch']} train {info['train_seconds'] / 60:.1f} min", flush=True)
