"""Structured rows of the benchmark (Torch-Pruning adapter): uniform vs Mix-and-Match at matched MACs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def structured_rows(cfg: Any, splits: Any, *, cache_dir: str | Path | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Filled in once the Torch-Pruning adapter is available; returns no rows until then."""
    try:
        from ..adapters import torch_pruning  # noqa: F401
    except ImportError:
        logger.warning("structured rows skipped: the Torch-Pruning adapter is not available")
        return []
    return []
