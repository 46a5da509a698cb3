"""``python -m mixmatch_plugin`` is the ``mixmatch`` command."""

from .cli import run

run()
