"""The real-data benchmark and the studies behind the README's numbers; run it with ``python -m benchmarks``.

Not part of the installed package: it imports the core, the adapters and the application
(:mod:`mixmatch_plugin.app`), and nothing in the package imports it. Run from the repository root.
"""
