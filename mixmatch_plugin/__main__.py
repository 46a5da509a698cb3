"""``python -m mixmatch_plugin`` is the ``mixmatch`` command."""

from .cli import main

main(prog_name="mixmatch")
