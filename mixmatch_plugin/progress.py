"""Progress bars for long work (tqdm on stderr), switched off globally by ``--quiet``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .interrupts import checkpoint

T = TypeVar("T")

_ENABLED = os.environ.get("MIXMATCH_QUIET", "") not in ("1", "true", "yes")


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the plugin on or off."""
    global _ENABLED
    _ENABLED = enabled


def progress_bar(it: Iterable[T], desc: str, *, enable: bool = True, total: int | None = None) -> Iterator[T]:
    """Wrap ``it`` in a tqdm bar when both ``enable`` and the global switch are on.

    Every step is also an interrupt checkpoint (:func:`~mixmatch_plugin.interrupts.checkpoint`): a
    Ctrl-C that other code swallowed stops the loop at its next step.
    """
    if enable and _ENABLED:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)
    for item in it:
        checkpoint()
        yield item
