"""``python -m mixmatch_plugin`` is the ``mixmatch`` command."""

from mixmatch_plugin.app.cli import run

run()
