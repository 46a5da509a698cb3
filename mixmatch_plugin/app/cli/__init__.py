"""The ``mixmatch`` command.

Each subcommand lives in its own module and is registered below. Errors a user can cause print one
line (``error: ...``) and exit with status 2; anything unexpected prints one line and exits 1, and
``-v`` shows the traceback. Ctrl-C prints ``error: interrupted`` and exits 130; SIGTERM is raised as
:class:`Interrupted` too (a ``KeyboardInterrupt``), so it unwinds the same way (temp files removed, a
running trial marked failed) and exits 143.

:func:`run` is the ``mixmatch`` executable; :func:`main` is the click group, for tests and host programs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import click

from mixmatch_plugin._version import __version__
from mixmatch_plugin.errors import MixMatchError
from mixmatch_plugin.progress import set_progress

# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning made small models' steps
# ten times slower. Set before torch loads OpenMP (no module above imports torch); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised by :func:`run`'s handlers; ``status`` is 128 + the signal number.

    A subclass on purpose: CPython ends a ``python -m`` process by SIGINT (status -2), whatever it did
    next, once a plain ``KeyboardInterrupt`` escaped an ``exec`` of a string (a dataclass being created).
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.status = 128 + int(signum)


def _on_signal(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def guarded(ctx: click.Context, work: Callable[[], Any]) -> Any:
    """Run ``work``, turning every exception into one line on stderr and an exit status (see the module doc)."""
    def verbose() -> bool:  # read when it is needed: the group's callback sets it inside work()
        obj = ctx.find_root().obj
        return bool(isinstance(obj, dict) and obj.get("verbose"))

    try:
        return work()
    except click.BadParameter as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(2)
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except KeyboardInterrupt as exc:
        _exit_interrupted(exc)
    except MixMatchError as exc:
        if verbose():
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if (cut := _interrupt_behind(exc)) is not None:  # a library's cleanup failed as the Ctrl-C unwound it
            _exit_interrupted(cut)  # (Optuna 5.1's _run_trial: UnboundLocalError when it lands in its tell)
        if verbose():
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: unexpected {type(exc).__name__}: {msg} (rerun with -v for the traceback)", err=True)
        sys.exit(1)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The interrupt that ``exc`` was raised while handling, if any (its ``__context__`` chain)."""
    seen: set[int] = set()
    cause = exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None


def _exit_interrupted(exc: KeyboardInterrupt) -> None:
    status = getattr(exc, "status", 130)
    click.echo("error: terminated (SIGTERM)" if status == 128 + signal.SIGTERM else "error: interrupted", err=True)
    sys.exit(status)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        return guarded(ctx, lambda: super(_Group, self).invoke(ctx))


def setup_logging(verbose: int, quiet: bool) -> None:
    """``-v``/``-vv`` log levels on stderr, and ``--quiet`` progress bars."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mixmatch_plugin").setLevel(level)
    set_progress(not quiet)
    warnings.showwarning = _show_warning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Python warnings (a plan's collapsed strategies, pinned weights, moved ranges) as one ``warning:`` line each."""
    click.echo(f"warning: {message}", err=True)


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
    setup_logging(verbose, quiet)


def _register() -> None:
    from mixmatch_plugin.app.cli import (
        demo_cmd,
        inspect_cmd,
        plan_cmd,
        prune_cmd,
        prune_dw_cmd,
        report_cmd,
        search_cmd,
    )

    for mod in (inspect_cmd, plan_cmd, prune_cmd, search_cmd, demo_cmd, report_cmd, prune_dw_cmd):
        main.add_command(mod.command)


_register()


def run(command: click.Command | None = None, prog_name: str = "mixmatch") -> None:
    """The ``mixmatch`` executable (``command``: another one run the same way): Ctrl-C and SIGTERM raise :class:`Interrupted`."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT (nohup) stays ignored
        signal.signal(signal.SIGINT, _on_signal)
    try:
        (command or main)(prog_name=prog_name)
    except SystemExit as exc:
        if exc.code in (128 + signal.SIGINT, 128 + signal.SIGTERM) and any(
                t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            # An interrupt that lands while a library starts a worker thread (Optuna's trial heartbeat starts
            # one and stops it in a `with` block's exit) leaves it running with nothing to stop it, and Python
            # would wait for it forever at exit. The unwinding is done: end the process with the status.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)
        raise
    finally:  # the work is done: a late signal must not turn its status into a kill (CPython resets our handlers
        for signum in (signal.SIGINT, signal.SIGTERM):  # to SIG_DFL while it shuts down; an ignored one stays ignored)
            signal.signal(signum, signal.SIG_IGN)
