"""``python -m benchmarks``: the real-data comparison on Fashion-MNIST (formerly ``mixmatch bench``).

Errors and interrupts end it as they end a ``mixmatch`` command: one line, status 2 for bad input,
130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from mixmatch_plugin.app.cli import guarded, run, setup_logging


class _Command(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        return guarded(ctx, lambda: super(_Command, self).invoke(ctx))


@click.command("bench", cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug) and tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--quick", is_flag=True, help="Reduced sizes (tiny models, 2 seeds, subsets): a few minutes, for CI.")
@click.option("--models", default=None,
              help="Comma-separated subset of the models (resnet18, vit, swin; quick: resnet, swin), or, named only, the larger "
                   "resnet50 (meant for a GPU: --device cuda), mobilenetv3 and regnetx (families outside the three, to check "
                   "that the gains carry over).")
@click.option("--seeds", default=None, help="Comma-separated seeds (default 0,1,2; quick 0,1).")
@click.option("--sparsities", default=None,
              help="Comma-separated sparsities for every chosen model, replacing its defaults (resnet18: 0.7,0.9,0.95,0.98; "
                   "vit, swin, mobilenetv3: 0.5,0.7,0.8; regnetx: 0.5,0.7,0.8,0.9,0.95; levit: 0.8,0.9,0.95). Only sparsities without results are run; results at other sparsities are kept.")
@click.option("--out", type=click.Path(file_okay=False), default="benchmarks/results", show_default=True,
              help="Folder for the results JSON and the plots.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None, help="Folder with Fashion-MNIST IDX files.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Checkpoint cache (default ~/.cache/mixmatch).")
@click.option("--update-readme", type=click.Path(dir_okay=False), default=None,
              help="Regenerate the tables between <!-- bench:start --> and <!-- bench:end --> in this file (benchmarks/RESULTS.md), "
                   "and the README's one-table summary between <!-- results:start --> and <!-- results:end -->.")
@click.option("--section", default=None,
              help="With --update-readme: the marker of the section to regenerate in that file (<!-- SECTION:start -->), "
                   "so that results of another --out keep a section of their own (default: bench, or bench-one-shot).")
@click.option("--fresh", is_flag=True, help="Ignore earlier partial results instead of resuming them.")
@click.option("--no-structured", is_flag=True, help="Skip the structured (Torch-Pruning) rows.")
@click.option("--one-shot", is_flag=True, help="No fine-tuning (one-shot rows only), into OUT/one-shot.json: a third of the time.")
@click.option("--from-one-shot", is_flag=True,
              help="Start or extend OUT/full.json with the cells (model, seed, sparsity) of OUT/one-shot.json that it lacks: "
                   "their kept rows are checked and only the fine-tuned rows and mm+search are added.")
@click.option("--tables-only", is_flag=True,
              help="Run nothing: regenerate the tables, plots and --update-readme section from OUT's results.")
@click.option("--device", default=None,
              help="Train and measure on this torch device (cpu, cuda, cuda:N; default cpu). The README's tables are CPU runs; "
                   "the device is recorded with the results.")
@click.option("--tiny", is_flag=True, hidden=True,
              help="Seconds-sized smoke configuration (OUT/tiny.json), for the interruption tests; not a benchmark.")
@click.pass_context
def command(ctx: click.Context, verbose: int, quiet: bool, quick: bool, models: str | None, seeds: str | None, sparsities: str | None, out: str, data_dir: str | None, cache_dir: str | None,
            update_readme: str | None, section: str | None, fresh: bool, no_structured: bool, one_shot: bool, from_one_shot: bool, tables_only: bool, device: str | None,
            tiny: bool) -> None:
    """Compare Mix-and-Match with uniform, global magnitude, SNIP, GraSP, LAMP and ERK on real
    Fashion-MNIST, at exactly matched sparsity, one-shot and after the same fine-tune, over seeds.

    \b
    Example:
      python -m benchmarks --quick                             # about 5 minutes, smoke-sized
      python -m benchmarks --update-readme benchmarks/RESULTS.md           # the full run; trains dense models once (cached)
      python -m benchmarks --tables-only --update-readme benchmarks/RESULTS.md   # tables and plots again, from the saved results
      python -m benchmarks --models resnet18 --sparsities 0.99   # adds 99 %, keeps the rest
    Resumes an interrupted run from OUT/full.json (or quick.json) unless --fresh; results it has
    to replace (--fresh, another configuration, other presets, a dense model trained again with
    other weights, rows of an older benchmark protocol) are first copied to OUT/full.json.before-<time>.
    A model without BatchNorm measured under an older protocol keeps its one-shot rows (they do not
    depend on the protocol's batches) and has only its fine-tuned rows measured again.
    """
    ctx.obj = {"verbose": verbose}
    setup_logging(verbose, quiet)
    from benchmarks import tables
    from benchmarks.run import BenchConfig, results_path, run
    from mixmatch_plugin.errors import MixMatchError

    if update_readme:  # checked before hours of work, not after
        readme = Path(update_readme)
        marker = section or ("bench-one-shot" if one_shot else "bench")
        if not readme.is_file() or f"<!-- {marker}:start -->" not in readme.read_text(encoding="utf-8", errors="replace"):
            raise MixMatchError(f"--update-readme {update_readme}: no such file with <!-- {marker}:start --> / <!-- {marker}:end --> markers")
    cfg = BenchConfig.tiny() if tiny else BenchConfig.quick() if quick else BenchConfig.full()
    if models:
        from benchmarks.configs import LARGER, OUTSIDE

        known = cfg.models if quick or tiny else {**cfg.models, **LARGER, **OUTSIDE}  # the others only when named
        wanted = [m.strip() for m in models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise MixMatchError(f"unknown benchmark model {unknown[0]!r}; choose from {', '.join(known)}")
        cfg.models = {m: known[m] for m in wanted}
    if seeds:
        try:
            cfg.seeds = tuple(int(s) for s in seeds.split(","))
        except ValueError:
            raise MixMatchError(f"--seeds {seeds!r} must be comma-separated integers") from None
    if sparsities:
        levels = _sparsities(sparsities)
        cfg.sparsities = {m: levels for m in cfg.models}
    if no_structured:
        cfg.structured = False
    if one_shot:
        cfg.finetune_methods = ()
    name = "tiny" if tiny else "one-shot" if one_shot else None
    cmd = "python -m benchmarks" + (" --tiny" if tiny else " --quick" if quick else "") + (f" --models {models}" if models else "") + (
        f" --sparsities {','.join(map(str, cfg.sparsities[next(iter(cfg.models))]))}" if sparsities else "") + (
        " --one-shot" if one_shot else "") + (f" --out {out}" if Path(out) != Path("benchmarks/results") else "")
    if tables_only:
        path = results_path(out, quick=quick, name=name)
        doc = _saved(path, list(cfg.models))
        files = tables.plots(doc, Path(out), prefix="one-shot-" if one_shot else "")
        md = tables.markdown(doc, command=cmd + " --tables-only")
    else:
        if from_one_shot:
            from benchmarks.run import adopt_one_shot

            if one_shot or quick or tiny:
                raise MixMatchError("--from-one-shot fills the full run's file: drop --one-shot/--quick")
            click.echo(f"copied from one-shot.json: {', '.join(adopt_one_shot(cfg, out)) or 'nothing'}", err=True)
        res = run(cfg, out, quick=quick, data_dir=data_dir, cache_dir=cache_dir, fresh=fresh, name=name, device=device)
        files = tables.plots(res.doc, Path(out), prefix="one-shot-" if one_shot else "")
        md = tables.markdown(res.doc, command=cmd)
        res.doc["markdown"] = md
        res.doc["plots"] = files
        doc = res.doc
        from mixmatch_plugin.io import atomic_write_json

        atomic_write_json(res.path, res.doc)
        path = res.path
    click.echo(md)
    click.echo(f"\nresults: {path}; plots: {', '.join(files.values())}")
    if update_readme:
        here = Path(update_readme).resolve().parent  # image links relative to the file they are written into
        text = md + "\n\n" + "\n".join(f"![{k}]({Path(os.path.relpath(Path(v).resolve(), here)).as_posix()})" for k, v in files.items())
        marker = section or (f"bench-{name}" if name else "bench")  # --one-shot results have a section of their own
        if not tables.update_readme(update_readme, text, marker=marker):
            raise MixMatchError(f"{update_readme} has no <!-- {marker}:start --> / <!-- {marker}:end --> markers")
        click.echo(f"updated {update_readme}")
        readme = Path(update_readme).resolve().parent.parent / "README.md"  # benchmarks/RESULTS.md -> the README's summary
        if readme.is_file() and tables.update_readme(readme, tables.verdict_table(doc), marker="results"):
            click.echo(f"updated the results table in {readme}")


def _saved(path: Path, models: list[str]) -> dict[str, Any]:
    """The saved results at ``path``, restricted to ``models`` (those that have results); the file is not changed."""
    from mixmatch_plugin.errors import MixMatchError
    from mixmatch_plugin.io import read_json

    if not path.is_file():
        raise MixMatchError(f"--tables-only: no results at {path}; run `python -m benchmarks` first (or point --out at them)")
    doc = read_json(path, "benchmark results")
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise MixMatchError(f"{path} is not a benchmark results file (no 'models'); rerun `python -m benchmarks`")
    shown = {k: doc["models"][k] for k in models if doc["models"].get(k, {}).get("runs")}  # in the order asked for
    if not shown:
        raise MixMatchError(f"{path} has no results for {', '.join(models)}; run `python -m benchmarks` first")
    return {**doc, "models": shown}


def _sparsities(text: str) -> tuple[float, ...]:
    """``--sparsities`` as sorted distinct ratios in (0, 1), or a :class:`MixMatchError` naming the bad entry."""
    from mixmatch_plugin.errors import MixMatchError
    from mixmatch_plugin.ranges import validate_ratio

    levels = {validate_ratio(part.strip(), "each --sparsities entry") for part in text.split(",")}
    if 0.0 in levels:
        raise MixMatchError("--sparsities: 0 prunes nothing; give ratios such as 0.7,0.9,0.95")
    return tuple(sorted(levels))


def main() -> None:
    """``python -m benchmarks``: :func:`command`, with SIGTERM handled as the ``mixmatch`` command handles it."""
    run(command, prog_name="python -m benchmarks")
