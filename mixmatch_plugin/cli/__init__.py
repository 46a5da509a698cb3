"""The ``mixmatch`` command.

Each subcommand lives in its own module and is registered below. Errors a user can cause print one
line (``error: ...``) and exit with status 2; anything unexpected prints one line and exits 1, and
``-v`` shows the traceback. Ctrl-C prints ``error: interrupted`` and exits 130; SIGTERM unwinds the
same way (temp files removed, a running trial marked failed) and exits 143.

:func:`run` is the ``mixmatch`` executable; :func:`main` is the click group, for tests and host programs.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from typing import Any

import click

from .._version import __version__
from ..errors import MixMatchError
from ..interrupts import deferred, forget, raise_or_defer
from ..progress import set_progress

logger = logging.getLogger(__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that it unwinds like Ctrl-C: temp files are removed and a
    running Optuna trial is marked failed, instead of the process vanishing mid-write."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C. A subclass on purpose: CPython 3.11 remembers a plain ``KeyboardInterrupt`` that escapes
    any ``exec`` of a string (a dataclass being created during a lazy import, say) and, under
    ``python -m``, then ends the process by SIGINT instead of with the status we chose (130)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise_or_defer(Terminated())


def _on_sigint(signum: int, frame: object) -> None:
    raise_or_defer(Interrupted())


_OWNS_PROCESS = "owns_process"


def _work_over(ctx: click.Context) -> None:
    """In a process of its own, once the command's work is over, ignore Ctrl-C until the process ends.

    A late Ctrl-C would otherwise land in click's exit path (``Aborted!``, status 1) or in the interpreter's
    teardown, where CPython has put SIGINT back to the system default and the process dies by the signal
    (status -2) although its files are complete. Ignored, the command's own status stands. A late SIGTERM
    ends the process at once, by the signal, as it would any program (nothing is left to unwind). In a
    host program (``main`` called in-process) the handlers are restored instead.
    """
    if isinstance(ctx.obj, dict) and ctx.obj.get(_OWNS_PROCESS) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Group(click.Group):
    """A click group that turns exceptions into one clear line and a non-zero exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                return super().invoke(ctx)
            finally:
                _work_over(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Terminated:
            click.echo("error: terminated (SIGTERM)", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except MixMatchError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Exception as exc:  # the last line of defence: one line, not a traceback
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {msg} (rerun with -v for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug) and tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(__version__, prog_name="mixmatch")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Mix-and-Match pruning: decide how sparse each layer of a network should be.

    \b
    Start here:
      mixmatch demo                      train a small model, build 30 strategies, rank, prune, report
      mixmatch inspect --model timm:resnet18
      mixmatch plan --model timm:resnet18 --calib digits --input-shape 1,28,28 \\
                    --model-kwargs '{"in_chans": 1, "num_classes": 10}' --target 0.8 --out plan.json

    Every subcommand has --help with an example.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    forget()  # a Ctrl-C of an earlier command in this process (a host's) is not this one's
    if not ctx.obj.get(_OWNS_PROCESS):
        ctx.call_on_close(forget)  # nor is this one's the host's business once the command has ended
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # leave a host's own handler alone
            signal.signal(signal.SIGINT, _on_sigint)
            if not ctx.obj.get(_OWNS_PROCESS):  # else _work_over leaves it ignored
                ctx.call_on_close(lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mixmatch_plugin").setLevel(level)
    set_progress(not quiet)


def _torch_first(command: click.Command) -> click.Command:
    """Make ``command`` import torch, with interrupts held, before it does anything else.

    Every command needs torch. Its C++ start-up swallows an exception raised while it loads NumPy and goes
    on with NumPy half-imported, so a Ctrl-C landing there would surface later as an unrelated
    ``ImportError`` (status 1). Held, the Ctrl-C is raised as soon as torch is whole (a few seconds at
    most); a second one still stops the process at once.
    """
    callback = command.callback
    assert callback is not None  # our own commands all have one

    @functools.wraps(callback)
    def with_torch(*args: Any, **kwargs: Any) -> Any:
        with deferred():
            import torch  # noqa: F401
        return callback(*args, **kwargs)

    command.callback = with_torch
    return command


def _register() -> None:
    from . import inspect_cmd, plan_cmd

    for mod in (inspect_cmd, plan_cmd):
        main.add_command(_torch_first(mod.command))
    for name in ("prune_cmd", "search_cmd", "bench_cmd", "demo_cmd", "report_cmd", "prune_dw_cmd"):
        try:
            mod = __import__(f"{__name__}.{name}", fromlist=["command"])
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        main.add_command(_torch_first(mod.command))


_register()


def run() -> None:
    """The ``mixmatch`` executable: :func:`main` in a process of its own (see :func:`_work_over`)."""
    main(prog_name="mixmatch", obj={_OWNS_PROCESS: True})
