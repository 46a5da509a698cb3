"""Progress bars for long work (tqdm on stderr), switched off globally by ``--quiet``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_ENABLED = os.environ.get("MIXMATCH_QUIET", "") not in ("1", "true", "yes")


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the plugin on or off."""
    global _ENABLED
    _ENABLED = enabled


def progress_enabled() -> bool:
    """Whether progress bars are on globally (off under ``--quiet`` or ``MIXMATCH_QUIET=1``)."""
    return _ENABLED


def progress_bar(it: Iterable[T], desc: str, *, enable: bool = True, total: int | None = None) -> Iterable[T]:
    """``it`` wrapped in a tqdm bar when both ``enable`` and the global switch are on, else ``it`` itself."""
    if not (enable and _ENABLED):
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
