"""``mixmatch report``: Markdown or HTML report from a plan, demo, search or bench JSON."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("report")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Report file; .html gives a self-contained page, .md Markdown (default: SOURCE with .md).")
def command(source: str, out: str | None) -> None:
    """Write a report, with plots, from a plan, demo, search or bench output.

    \b
    Example:
      mixmatch report plan.json --out plan-report.html
      mixmatch report mixmatch-demo/summary.json
    """
    from mixmatch_plugin.app.report import write_report

    path = write_report(source, out or Path(source).with_suffix(".md"))
    click.echo(f"wrote {path}")
