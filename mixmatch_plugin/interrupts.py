"""Interrupts that wait for a bookkeeping step to finish.

A Ctrl-C (or SIGTERM) that lands while a search is writing a trial's state (Optuna's ``ask``, ``tell``
or the heartbeat thread's shutdown) would leave the trial RUNNING in the storage, a half-written record
that only a later heartbeat check can clear. Inside :func:`deferred` the ``mixmatch`` command's signal
handlers hold the interrupt instead of raising it; it is raised when the section ends, or as soon as
work that is safe to cut short starts again (:func:`undeferred`). A second signal while one is held is
raised at once, so two Ctrl-Cs always stop the process.

Only handlers that call :func:`raise_or_defer` take part: the CLI's, and the one
:func:`sigint_defers` puts in place of Python's default for the length of a search. A host program's
own handler is left alone; an interrupt it raises inside Optuna's bookkeeping leaves the cut trial to
the search's fallback (it fails and re-queues its own trial).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

logger = logging.getLogger(__name__)

_depth = 0
_pending: BaseException | None = None
_received: BaseException | None = None  # the last interrupt a handler raised or held, for checkpoint()


def raise_or_defer(exc: BaseException) -> None:
    """Raise ``exc`` now, or hold it until the innermost :func:`deferred` section ends.

    For signal handlers. A second call while an interrupt is held raises at once. Either way the
    interrupt is remembered for :func:`checkpoint` until :func:`forget`.
    """
    global _pending, _received
    _received = exc
    if _depth == 0 or _pending is not None:
        _pending = None
        raise exc
    _pending = exc  # nothing logged here: a handler that writes could land inside a write of the same stream


def _raise_pending() -> None:
    global _pending
    exc, _pending = _pending, None
    if exc is not None:
        raise exc


def checkpoint() -> None:
    """Raise again an interrupt that a handler raised but that never ended the work.

    Code outside this project can swallow it: Cython's memoryview set-up wraps an ABC registration in a
    bare ``except: pass`` in every module that uses memoryviews (SciPy, scikit-learn, pandas,
    ``numpy.random``), so a Ctrl-C landing while one of them is imported vanishes. Long loops call this
    at every step (:func:`~mixmatch_plugin.progress.progress_bar` does), so such a Ctrl-C still stops
    the work at the next step. Inside :func:`deferred` it waits, as the interrupt itself would.
    """
    if _received is not None and _depth == 0:
        raise _received.with_traceback(None)


def forget() -> None:
    """Forget the interrupts seen so far: for whoever owns the handlers, when its work starts and ends."""
    global _received
    _received = None


class deferred:
    """Context manager: interrupts that arrive inside are raised when it ends (not when an error ends it)."""

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth, _pending
        _depth -= 1
        if _depth == 0:
            if kind is None:
                _raise_pending()
            _pending = None  # an exception already unwinds: the held interrupt is not raised on top of it


class undeferred:
    """Context manager: inside a :func:`deferred` section, work that an interrupt may cut short.

    An interrupt held before it starts is raised on entry; inside, interrupts raise at once.
    """

    def __enter__(self) -> None:
        global _depth
        self._saved, _depth = _depth, 0
        if self._saved:
            try:
                _raise_pending()
            except BaseException:
                _depth = self._saved
                raise

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        global _depth
        _depth = self._saved


def _deferring_sigint(signum: int, frame: FrameType | None) -> None:
    raise_or_defer(KeyboardInterrupt())


@contextmanager
def sigint_defers() -> Iterator[None]:
    """Inside, Ctrl-C takes part in :func:`deferred` when Python's default handler is the one in place.

    Any other handler (a host program's, the CLI's, an ignored SIGINT) is left as it is. Outside the main
    thread, where handlers cannot be set, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    forget()
    signal.signal(signal.SIGINT, _deferring_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        forget()  # the host program decides what a Ctrl-C that ended the search means for the rest
