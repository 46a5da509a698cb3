"""``python -m benchmarks`` runs :func:`benchmarks.cli.command`."""

from benchmarks.cli import main

main()
