"""The application layer: the ``mixmatch`` command, the demo, training recipes, data loading, plots and reports.

It sits on top of the core (:mod:`mixmatch_plugin`) and the adapters (:mod:`mixmatch_plugin.adapters`)
and may import both; neither imports anything from here.
"""
